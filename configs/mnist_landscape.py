"""Loss landscapes and attack trajectories on MNIST, stochastic vs DW-box (ADDT paper).

    python experiments/addt_landscape.py --config configs/mnist_landscape.py:small \\
        --workdir runs/mnist_landscape_small

The committed MNIST DDPM (``checkpoints/mnist_ddpm``) and classifier; DDPM purifier t* = 0.1
in 10 reverse steps with exact gradients; PGD Linf eps 0.3 (the MNIST robust evaluation's
radius), 20 iterations, EoT 4 in the stochastic setting and 1 under DW-box (ADDT's settings,
scaled down); trajectories scored under 8 fresh keys per iterate; landscapes on a 21 x 21 grid
in [-2 eps, 2 eps] (stochastic: the mean over 2 keys); 32 test images. Models: the base DDPM
only (no MNIST ADDT fine-tune is committed: add a row ``{"name": "addt", "ddpm": {"path":
...}}`` to ``models`` when one exists; rows whose export is missing are skipped).

Variants: ``:small`` (sized for the shared 2-core CPU, a few minutes: 8 images, PGD-10, a
11 x 11 grid, EoT 2 / 4 / 4), ``:smoke`` (random tiny UNet, 4 images, 2 PGD steps, a 3 x 3 grid,
two random models: seconds). The full variant is the digits config's settings on 784
dimensions: many times its cost (see configs/digits_landscape.py), meant for an accelerator.
"""

from ml_collections import config_dict

from configs import _common

VARIANTS = ("", "smoke", "small")


def study() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({
        "randomness": ("stochastic", "fixed"),
        "grid_points": 21,  # per axis
        "grid_radius": 2.0,  # in eps units
        "landscape_eot": 2,  # stochastic landscape: keys averaged (the same at every point)
        "trajectory_eot": 8,  # stochastic trajectory: fresh keys per iterate
        "score_eot": 8,  # stochastic scores of the clean image and x_adv: average@score_eot
        "dwbox_eot_samples": 1,  # the attack's EoT under DW-box (one key: more is the same)
        "direction": "rademacher",  # the random direction: rademacher | gaussian
        "sign": False,  # the adversarial direction: x_adv - x (False) or its sign
        "batch_size": 16,  # images per stored chunk (a multiple of the device count)
        "eval_batch": 16,  # landscape / trajectory evaluations vmapped together (lax.map)
        "skip_missing": True,  # skip model rows whose export does not exist
    })


def smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Random tiny UNets (two models), 4 images in two chunks, 2 PGD steps, a 3 x 3 grid."""
    _common.robust_smoke(c)
    c.data.num_images = 0
    c.models = ({"name": "ddpm"}, {"name": "other", "ddpm": {"seed": 1}})
    c.study.update(grid_points=3, landscape_eot=2, trajectory_eot=2, score_eot=2,
                   batch_size=2, eval_batch=4)
    return c


def get_config(arg=None):
    arg = _common.parse_arg(arg, VARIANTS)
    c = _common.robust_base()
    c.data.test_split = "test[:32]"
    c.attack.update(num_steps=20, eot_samples=4)
    c.models = ({"name": "ddpm"},)
    c.study = study()
    if arg == "small":
        c.data.test_split = "test[:8]"
        c.attack.num_steps = 10
        c.study.update(grid_points=11, landscape_eot=2, trajectory_eot=4, score_eot=4,
                       batch_size=8)
    elif arg == "smoke":
        smoke(c)
        c.data.test_split = "test[:4]"
    del c.eval, c.rows  # unused by the study
    return c
