"""DDPM on Kuzushiji-MNIST with the "mnist" UNet: train on ``test[:8000]``, evaluate on ``test[8000:]``.

Only the 10k KMNIST *test* images exist in the data directory (the 60k train images are not
there, only their labels), so this trains on the first 8000 test images and evaluates on the
other 2000; results are not comparable to models trained on the official train split.

    python experiments/train_diffusion.py --config configs/kmnist_ddpm.py --workdir runs/kmnist_ddpm

Same model and cost as ``mnist_ddpm.py`` (~25-40 min on the 2-core CPU). Smoke variant: ``:smoke``.
"""

from configs import _common, mnist_ddpm


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = mnist_ddpm.get_config(arg)
    c.data = _common.data("kmnist", "test[:8000]", "test[8000:]")
    if arg == "smoke":
        c.data.train_split = "test[:64]"
        c.data.test_split = "test[8000:8016]"
    return c
