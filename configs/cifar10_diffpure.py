"""DiffPure's CIFAR-10 pipeline (Nie et al. 2022): score_sde DDPM++ + RobustBench WRN-28-10.

    python experiments/robust_eval.py --config configs/cifar10_diffpure.py \\
        --workdir runs/cifar10_diffpure \\
        --config.ddpm.path=/path/to/score_sde/checkpoint_8.pth \\
        --config.classifier.path=/path/to/models/cifar10/Linf/Standard.pt

The real files (nothing is downloaded here): DiffPure's ``pretrained/score_sde/checkpoint_8.pth``
(score_sde's ``vp/cifar10_ddpmpp_deep_continuous``: DDPM++ deep, 8 residual blocks per level,
106,632,579 parameters, EMA weights used as DiffPure does) and RobustBench's CIFAR-10 Linf
``Standard`` WideResNet-28-10 (``models/cifar10/Linf/Standard.pt``; a relative path is taken
from the data directory). A missing file is a ``FileNotFoundError`` naming the config field and
the path. The purifier is DiffPure's ``sde`` runner: diffuse to t* = 0.1, then 100
Euler-Maruyama steps of the reverse VP-SDE (torchsde's dt = 1e-3) with the score
``-model(x, t * 999) / s(t)``; gradients exact (``jax.checkpoint`` per step), not the adjoint.
Rows: PGD-20 EoT-10 Linf 8/255 stochastic and fixed randomness; ``:autoattack`` adds DiffPure's
own evaluation, AutoAttack ``rand`` (APGD-CE + APGD-DLR, EoT 20). Both need an accelerator: one
attack iteration is 10 x 100 network evaluations of a 107M-parameter network, twice for the
backward. ``:smoke`` runs the same code path on CPU in tens of seconds (a random tiny DDPM++,
akamaster's ResNet-20 from the data directory, 8 images, 2 steps).
"""

from configs import _common

_NCSNPP_FIELDS = {"nf": int, "ch_mult": tuple, "num_res_blocks": int, "attn_resolutions": tuple,
                  "dropout": float, "image_size": int}


def ncsnpp_overrides(**values):
    """Typed, overridable NCSNpp arguments (None keeps the named configuration's value)."""
    cd = _common.config_dict
    return cd.ConfigDict({k: values[k] if values.get(k) is not None else cd.placeholder(t)
                          for k, t in _NCSNPP_FIELDS.items()})


def get_config(arg=None):
    arg = _common.parse_arg(arg, ("", "smoke", "autoattack"))
    c = _common.robust_eval_options(_common.robust_base())
    c.data = _common.data("cifar10", "train", "test[:512]")
    c.data.num_images = 0
    c.ddpm.source = "score_sde"
    c.ddpm.path = "pretrained/score_sde/checkpoint_8.pth"
    c.ddpm.use_ema = True
    c.ddpm.model = _common.config_dict.ConfigDict({
        "name": "ncsnpp", "config": "cifar10_ddpmpp_deep_continuous",
        "overrides": ncsnpp_overrides(dropout=0.0)})
    c.classifier = _common.config_dict.ConfigDict({
        "source": "robustbench", "path": "models/cifar10/Linf/Standard.pt",
        "depth": 28, "widen_factor": 10})
    c.purifier.update(sampler="sde", t_star=0.1, num_steps=100)
    c.attack.update(eps=8 / 255, num_steps=20, eot_samples=10, step_size=2 / 255)
    c.eval.batch_size = 16
    c.rows = ({"name": "diffpure_sde_exact"},
              {"name": "diffpure_sde_fixed", "eval": {"randomness": "fixed"},
               "attack": {"eot_samples": 1}})
    if arg == "autoattack":
        c.rows = ({"name": "diffpure_aa_rand",
                   "attack": {"name": "autoattack", "num_steps": 100,
                              "autoattack": {"version": "rand"}}},)
    elif arg == "smoke":
        c.ddpm.source = "random"
        c.ddpm.model.overrides = ncsnpp_overrides(
            dropout=0.0, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
        c.classifier = _common.config_dict.ConfigDict({
            "source": "akamaster",
            "path": "pretrained_cifar10_resnet_akamaster/resnet20-12fca82f.npz"})
        c.purifier.num_steps = 2
        c.attack.update(num_steps=2, eot_samples=2)
        c.eval.update(protocols=("one_shot",), batch_size=8)
        c.data.test_split = "test[:8]"
        c.rows = ({"name": "diffpure_sde_exact"},)
    return c
