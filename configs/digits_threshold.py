"""Critical threshold along adversarial directions and fuzzy robustness on sklearn digits.

    python experiments/critical_threshold.py --config configs/digits_threshold.py \\
        --workdir runs/digits_threshold

Models: ``checkpoints/digits_ddpm`` and ``checkpoints/digits_classifier`` (8x8 images, bundled
data); DDPM purifier t* = 0.1 in 10 steps. 64 test images; adversarial direction from PGD L2
eps 1.5 (10 iterations, EoT 4, exact gradients, stochastic randomness), 2 random directions;
25 step lengths on [0, 4], 24 purifier keys per point and one fixed key; fuzzy robustness under
64 keys (about 1900 purifications per image). Measured: 5.7 minutes with the 2-core CPU
about 3x oversubscribed (331 s of chunk compute, compilation included); about 2-3 minutes when
it is not shared. Resumable: rerun the command after a kill. Smoke variant: ``:smoke``.
"""

from configs import _common
from configs.mnist_threshold import study


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.use_digits(_common.robust_base(), "test[:64]")
    c.attack.update(norm="l2", eps=1.5)
    c.study = study(random_directions=2, max_step=4.0, num_keys=24, fuzzy_keys=64,
                    batch_size=16, step_chunk=5)
    if arg == "smoke":
        _common.robust_smoke(c)
        c.ddpm.source = "export"  # the committed digits exports are small: the real path
        c.data.test_split = "test[:4]"
        c.study.update(random_directions=1, num_points=5, num_keys=3, fuzzy_keys=4,
                       batch_size=8)
    del c.eval, c.rows  # unused by the study
    return c
