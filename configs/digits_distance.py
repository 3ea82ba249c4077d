"""Distance to clean along purification on scikit-learn's 8x8 digits (paper Fig. 1 / S1).

    python experiments/distance_trajectory.py --config configs/digits_distance.py \\
        --workdir runs/digits_distance

The committed digits DDPM and classifier; 128 test images; DDPM purifier t* = 0.1 in 10 steps;
starts: clean, PGD-20 adversarial against the classifier alone (Linf 0.2, the digits robust
evaluation's radius), uniform in the same ball. Seconds on the 2-core CPU. Smoke: ``:smoke``.
"""

from configs import _common, mnist_distance


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    # (the smoke variant keeps its random tiny UNet, now of the digits configuration)
    c = _common.use_digits(mnist_distance.get_config(arg), "test[:128]")
    c.study.eps = 0.2
    c.study.ssim_window = 7  # 8x8 images
    if arg == "smoke":
        c.data.test_split = "test[:4]"
    return c
