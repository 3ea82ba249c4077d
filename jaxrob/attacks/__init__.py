"""Attacks on (possibly randomised) classifiers: losses, FGSM, PGD, APGD, C&W-L2, EAD, DeepFool,
Square, FAB, AutoAttack, EoT, DiffAttack's loss, and the detection-aware attack on a scoring
reconstruction defence (:class:`DetectionAwareModel` + :func:`detection_aware_loss`).

Every attack is a pure function ``attack(model, x, y, key, **options) -> AttackResult`` with
keyword-only hyper-parameters, jitted with its loops inside (``lax.scan`` / ``fori_loop`` /
``while_loop``).
``model`` is what the attack attacks, ``logits_fn(x, key) -> (B, K)`` (a
:class:`jaxrob.purify.DefendedModel`, a :class:`jaxrob.models.Classifier`, or any function;
deterministic models ignore the key); the loss maximised is named by ``loss=`` (``"ce"``,
``"cw"``, ``"dlr"``) or given as ``loss(logits, y) -> (B,)``, or is a loss on the inputs
(:class:`InputLoss`): :func:`diffattack_loss` adds DiffAttack's deviated-reconstruction term on
the purifier's reverse-chain states to CE / DLR / C&W; PGD and APGD take a ``target=``
(classes, or ``"least_likely"``) and then maximise the targeted form of the loss. Square (Linf,
L2, L1) is query-based (no gradients) and reports its per-example query count. Pytree models
are traced, not baked in: attacking new parameters of the same shapes reuses the compilation.

* ``pgd`` (Linf, L2), ``apgd`` (Linf, L2, L1: APGD-L1 with sparse steps and AutoAttack's
  ``use_largereps`` schedule), ``cw_l2`` and ``deepfool`` (both with ``eot_samples``).
* ``project`` / ``project_l1``: projection onto the eps-ball intersected with [0, 1]^d (L1: the
  exact Euclidean projection onto that intersection).
* ``fab``: FAB / FAB-T, steps onto the linearised decision boundary, the closest point kept
  within eps (Linf, L2, L1).
* ``projection_linf`` / ``projection_l2`` / ``projection_l1``: FAB's projection onto a
  hyperplane inside the box [0, 1]^d.
* ``autoattack``: AutoAttack's ensemble (standard / plus / rand / custom; Linf, L2, and L1:
  the original's L1 standard version, APGD-CE and APGD-T with ``use_largereps``, FAB-T, L1
  Square), each attack on the still-robust examples, per-example keys; returns an
  ``AutoAttackResult``.
* ``AutoAttackResult``: x_adv, per-example robust flags and breaking attack, the accuracy after
  each attack, the original's checks (randomised defence, consistency, Square).
* ``AA_ATTACKS`` / ``AA_VERSIONS`` / ``FAB_NORMS`` / ``APGD_NORMS``: the names
  :func:`autoattack`, :func:`fab` and :func:`apgd` accept.

Protective perturbations against diffusion-based editing (``attack(model, x, ..., key) ->
AttackResult``, Linf sign steps, last iterate, per-example keys; an LDM is ``encode_fn`` +
an eps-model on its latents, a PDM a pixel eps-model):

* ``advdm``: AdvDM(+/-), sign steps up (down) the Monte-Carlo diffusion training loss.
* ``sds``: SDS(+/-), the score-distillation gradient (encoder VJP of ``eps_hat - eps``, no
  UNet Jacobian), optionally with a texture target.
* ``photoguard``: PhotoGuard's encoder attack (latent pulled toward a target's).
* ``mist``: Mist, texture loss toward a target plus the weighted AdvDM loss.
* ``edit_attack``: end-to-end attack through any ``edit_fn(x, key)`` with exact gradients;
  ``sdedit_attack`` through SDEdit, ``pdm_pure_attack`` through PDM-Pure then an LDM edit.
* ``diffusion_loss`` / ``advdm_loss`` / ``sds_loss``: the losses; ``PROTECT_MODES``: ``"+"``,
  ``"-"``.
"""

from jaxrob.attacks._apgd import APGD_LOSSES as APGD_LOSSES
from jaxrob.attacks._apgd import APGD_NORMS as APGD_NORMS
from jaxrob.attacks._apgd import apgd as apgd
from jaxrob.attacks._apgd import apgd_checkpoints as apgd_checkpoints
from jaxrob.attacks._autoattack import AA_ATTACKS as AA_ATTACKS
from jaxrob.attacks._autoattack import AA_VERSIONS as AA_VERSIONS
from jaxrob.attacks._autoattack import AutoAttackResult as AutoAttackResult
from jaxrob.attacks._autoattack import autoattack as autoattack
from jaxrob.attacks._common import NORMS as NORMS
from jaxrob.attacks._common import AttackResult as AttackResult
from jaxrob.attacks._common import project as project
from jaxrob.attacks._common import project_l1 as project_l1
from jaxrob.attacks._cw import cw_l2 as cw_l2
from jaxrob.attacks._deepfool import deepfool as deepfool
from jaxrob.attacks._detection_aware import DetectionAwareLoss as DetectionAwareLoss
from jaxrob.attacks._detection_aware import DetectionAwareModel as DetectionAwareModel
from jaxrob.attacks._detection_aware import detection_aware_loss as detection_aware_loss
from jaxrob.attacks._diffattack import DiffAttackLoss as DiffAttackLoss
from jaxrob.attacks._diffattack import diffattack_loss as diffattack_loss
from jaxrob.attacks._ead import ead as ead
from jaxrob.attacks._eot import eot_grad as eot_grad
from jaxrob.attacks._eot import eot_value_and_grad as eot_value_and_grad
from jaxrob.attacks._fab import FAB_NORMS as FAB_NORMS
from jaxrob.attacks._fab import fab as fab
from jaxrob.attacks._fab import projection_l1 as projection_l1
from jaxrob.attacks._fab import projection_l2 as projection_l2
from jaxrob.attacks._fab import projection_linf as projection_linf
from jaxrob.attacks._losses import LOSSES as LOSSES
from jaxrob.attacks._losses import TARGETED_LOSSES as TARGETED_LOSSES
from jaxrob.attacks._losses import InputLoss as InputLoss
from jaxrob.attacks._losses import LogitsFn as LogitsFn
from jaxrob.attacks._losses import LogitsLoss as LogitsLoss
from jaxrob.attacks._losses import LossFn as LossFn
from jaxrob.attacks._losses import ce_loss as ce_loss
from jaxrob.attacks._losses import ce_loss_targeted as ce_loss_targeted
from jaxrob.attacks._losses import cw_loss as cw_loss
from jaxrob.attacks._losses import cw_loss_targeted as cw_loss_targeted
from jaxrob.attacks._losses import dlr_loss as dlr_loss
from jaxrob.attacks._losses import dlr_loss_targeted as dlr_loss_targeted
from jaxrob.attacks._losses import loss_from_logits as loss_from_logits
from jaxrob.attacks._pgd import fgsm as fgsm
from jaxrob.attacks._pgd import pgd as pgd
from jaxrob.attacks._protect import PROTECT_MODES as PROTECT_MODES
from jaxrob.attacks._protect import advdm as advdm
from jaxrob.attacks._protect import advdm_loss as advdm_loss
from jaxrob.attacks._protect import diffusion_loss as diffusion_loss
from jaxrob.attacks._protect import edit_attack as edit_attack
from jaxrob.attacks._protect import mist as mist
from jaxrob.attacks._protect import pdm_pure_attack as pdm_pure_attack
from jaxrob.attacks._protect import photoguard as photoguard
from jaxrob.attacks._protect import sdedit_attack as sdedit_attack
from jaxrob.attacks._protect import sds as sds
from jaxrob.attacks._protect import sds_loss as sds_loss
from jaxrob.attacks._square import square as square
