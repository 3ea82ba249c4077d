"""Distance to clean along purification on MNIST (paper Fig. 1 / S1).

    python experiments/distance_trajectory.py --config configs/mnist_distance.py \\
        --workdir runs/mnist_distance

The committed MNIST DDPM and classifier; 64 test images; DDPM purifier t* = 0.1 in 10 steps;
starts: clean, PGD-20 adversarial against the classifier alone (Linf 0.3), uniform in the same
ball. Well under a minute on the 2-core CPU. Variants: ``:eps01`` (Linf 0.1), ``:smoke``.
"""

from ml_collections import config_dict

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg, ("", "smoke", "eps01"))
    c = _common.robust_base()
    c.data.test_split = "test[:64]"
    c.study = config_dict.ConfigDict({"eps": 0.3, "pgd_steps": 20,
                                      "ssim_window": 11})
    if arg == "eps01":  # a ball of l2 size ~1.5, as the paper's 8/255 on CIFAR-10 (1.19)
        c.study.eps = 0.1
    if arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:4]"
        c.data.num_images = 0
        c.study.pgd_steps = 2
    del c.attack, c.eval, c.rows  # unused by the study
    return c
