"""Critical threshold along adversarial directions and fuzzy robustness on MNIST (Yuezhang & Wei).

    python experiments/critical_threshold.py --config configs/mnist_threshold.py \\
        --workdir runs/mnist_threshold

The committed MNIST DDPM and classifier; DDPM purifier t* = 0.1 in 10 reverse steps. 48 test
images; adversarial direction from PGD L2 eps 2 (10 iterations, EoT 4, exact gradients,
stochastic randomness), 2 random Gaussian directions as the control; 25 step lengths on
[0, 6] (L2), each classified under 16 purifier keys and the image's fixed key; fuzzy
robustness of x_adv under 32 keys. About 1300 purifications per image plus the attack:
roughly 10 minutes on the 2-core CPU when it is not shared (estimate: a 2-image probe took
54-71 s with the CPU about 3x oversubscribed). Resumable: rerun the command after a kill.
Smoke variant (random tiny UNet, 3 images): ``:smoke``.
"""

from ml_collections import config_dict

from configs import _common


def study(**overrides) -> config_dict.ConfigDict:
    """The ``config.study`` block of the critical-threshold experiment."""
    s = config_dict.ConfigDict({
        "random_directions": 2,  # Gaussian control directions per image
        "max_step": 6.0,  # step lengths linspace(0, max_step, num_points), L2
        "num_points": 25,
        "num_keys": 16,  # purifier keys per point (the stochastic curve's trials)
        "fixed_keys": 1,  # deterministic purifiers per image (step-likeness)
        "fuzzy_keys": 32,  # purifier keys scoring x_adv (fuzzy robustness)
        "flip_reference": "label",  # flip = prediction != label | != clean majority ("clean")
        "clip": True,  # classify clip(x + s u, 0, 1)
        "level": 0.95,  # confidence level of the fits
        "batch_size": 8,  # images per stored chunk (a multiple of the device count)
        "step_chunk": config_dict.placeholder(int),  # step lengths per vmap; None: all at once
    })
    s.update(overrides)
    return s


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_base()
    c.data.test_split = "test[:48]"
    c.attack.update(norm="l2", eps=2.0)
    c.study = study(step_chunk=1)
    if arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:3]"
        c.data.num_images = 0
        c.study.update(random_directions=1, num_points=5, num_keys=3, fuzzy_keys=4,
                       batch_size=8, max_step=4.0)
    del c.eval, c.rows  # unused by the study
    return c
