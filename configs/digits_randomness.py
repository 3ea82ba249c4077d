"""Randomness decomposition of purification on scikit-learn's 8x8 digits (paper Fig. 2).

    python experiments/randomness_study.py --config configs/digits_randomness.py \\
        --workdir runs/digits_randomness

The committed digits DDPM (``checkpoints/digits_ddpm``), DDPM purifier t* = 0.1 in 10 reverse
steps; 64 test images, 100 samples per mode in an L2 ball of radius 0.5 (64 dimensions: the
same radius per pixel as MNIST's unit ball within a factor 2). Well under a minute on the
2-core CPU. Smoke variant: ``:smoke``.
"""

from configs import _common, mnist_randomness


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    # (the smoke variant keeps its random tiny UNet, now of the digits configuration)
    c = _common.use_digits(mnist_randomness.get_config(arg), "test[:64]")
    c.study.eps = 0.5
    if arg == "smoke":
        c.data.test_split = "test[:2]"
    return c
