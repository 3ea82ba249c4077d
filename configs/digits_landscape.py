"""Loss landscapes and attack trajectories on scikit-learn's 8x8 digits, stochastic vs DW-box,
for the base DDPM and the three committed ADDT fine-tunes (the ADDT paper's analysis).

    python experiments/addt_landscape.py --config configs/digits_landscape.py \\
        --workdir runs/digits_landscape

Models: ``checkpoints/digits_ddpm`` and its fine-tunes ``digits_addt`` (CGPO + RBGM),
``digits_addt_no_rbgm`` and ``digits_addt_no_cgpo`` (the Gaussian-noise control), behind
``checkpoints/digits_classifier``; DDPM purifier t* = 0.1 in 10 reverse steps, exact gradients.
32 test images; PGD Linf eps 0.2 (the digits robust evaluation's radius), 20 iterations, EoT 4
(stochastic) / 1 (DW-box); trajectories under 4 fresh keys per iterate; landscapes on a 13 x 13
grid in [-2 eps, 2 eps] (steps of eps / 3; stochastic: the mean over 2 keys). Eight units, about
21 minutes in all on the shared 2-core CPU (docs/addt_landscape.md has the measured time; the
landscape is most of it); resumable per unit and chunk.

Variants: ``:fine`` (a 21 x 21 grid, 8 trajectory keys, 64 images: about 5x the cost, for an
idle machine or an accelerator); ``:smoke`` (random tiny UNets, two models, seconds of compute).
"""

from configs import _common, mnist_landscape

MODELS = ({"name": "ddpm"},
          {"name": "addt", "ddpm": {"path": "checkpoints/digits_addt"}},
          {"name": "addt_no_rbgm", "ddpm": {"path": "checkpoints/digits_addt_no_rbgm"}},
          {"name": "addt_no_cgpo", "ddpm": {"path": "checkpoints/digits_addt_no_cgpo"}})


def get_config(arg=None):
    arg = _common.parse_arg(arg, ("", "smoke", "fine"))
    # (the smoke variant keeps its random tiny UNets, now of the digits configuration)
    c = _common.use_digits(mnist_landscape.get_config(arg if arg == "smoke" else None),
                           "test[:32]")
    c.attack.eps = 0.2
    c.study.update(grid_points=13, trajectory_eot=4)
    if arg == "fine":
        c.data.test_split = "test[:64]"
        c.study.update(grid_points=21, trajectory_eot=8)
    if arg == "smoke":
        c.study.update(grid_points=3, trajectory_eot=2)
        c.data.test_split = "test[:4]"
    else:
        c.models = MODELS
    return c
