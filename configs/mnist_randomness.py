"""Randomness decomposition of DiffPure-style purification on MNIST (paper Fig. 2).

    python experiments/randomness_study.py --config configs/mnist_randomness.py --workdir runs/mnist_randomness

The committed MNIST DDPM, DDPM purifier t* = 0.1 in 10 reverse steps; 16 test images, 100
samples per mode in an L2 ball of radius 1 (the paper's unit ball). 4800 purifications: about
a minute on the 2-core CPU. Smoke variant (random tiny UNet, 2 images, 4 samples): ``:smoke``.
"""

from ml_collections import config_dict

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_base()
    c.data.test_split = "test[:16]"
    c.study = config_dict.ConfigDict({"eps": 1.0, "norm": "l2", "num": 100,
                                      "chunk": config_dict.placeholder(int)})
    if arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:2]"
        c.data.num_images = 0
        c.study.num = 4
    del c.attack, c.eval, c.rows, c.classifier  # unused by the study
    return c
