"""Attacks on (possibly randomised) classifiers: losses, FGSM, PGD, APGD, C&W-L2, DeepFool, EoT.

Attacks are pure functions of ``(fn, x, y, key)`` with keyword-only hyper-parameters, jitted with
their loops inside (``lax.scan`` / ``fori_loop``). ``fn`` is a ``loss_fn(x, y, key) -> (B,)``
maximised by the attacker, or a ``logits_fn(x, key) -> (B, K)`` together with ``loss="ce"`` /
``"cw"`` / ``"dlr"``; deterministic models ignore the key.
"""

from jaxrob.attacks._apgd import APGD_LOSSES as APGD_LOSSES
from jaxrob.attacks._apgd import apgd as apgd
from jaxrob.attacks._apgd import apgd_checkpoints as apgd_checkpoints
from jaxrob.attacks._common import NORMS as NORMS
from jaxrob.attacks._common import AttackResult as AttackResult
from jaxrob.attacks._common import MinimumNormResult as MinimumNormResult
from jaxrob.attacks._common import project as project
from jaxrob.attacks._cw import cw_l2 as cw_l2
from jaxrob.attacks._deepfool import deepfool as deepfool
from jaxrob.attacks._eot import eot_grad as eot_grad
from jaxrob.attacks._eot import eot_value_and_grad as eot_value_and_grad
from jaxrob.attacks._losses import LOSSES as LOSSES
from jaxrob.attacks._losses import LogitsFn as LogitsFn
from jaxrob.attacks._losses import LogitsLoss as LogitsLoss
from jaxrob.attacks._losses import LossFn as LossFn
from jaxrob.attacks._losses import ce_loss as ce_loss
from jaxrob.attacks._losses import cw_loss as cw_loss
from jaxrob.attacks._losses import dlr_loss as dlr_loss
from jaxrob.attacks._losses import loss_from_logits as loss_from_logits
from jaxrob.attacks._pgd import fgsm as fgsm
from jaxrob.attacks._pgd import pgd as pgd
