"""DDPM on MNIST (60k train / 10k test IDX files in the data dir) with the "mnist" UNet.

    python experiments/train_diffusion.py --config configs/mnist_ddpm.py --workdir runs/mnist_ddpm

The "mnist" UNet (ch 32, mults 1-2-2, 1.1 M params) trains at ~1 step/s with batch 64 on the
2-core CPU, so the default 4000 steps take roughly an hour plus ~2 min of sampling (64 samples,
DDIM 100 steps) and evaluation (2000 test images at t* = 0.1, 0.3). On an accelerator raise
``train.num_steps`` (``--config.train.num_steps=50000``). Smoke variant: ``:smoke``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.ddpm_base()
    c.data = _common.data("mnist", "train", "test")
    c.model.config = "mnist"
    c.train.update(batch_size=64, num_steps=6000, learning_rate=7e-4, lr_schedule="constant",
                   warmup_steps=200, log_every=50, checkpoint_every=250)
    c.sample.update(sampler="ddim", num_steps=100)
    c.eval.update(num_images=2000, batch_size=250)
    if arg == "smoke":
        _common.ddpm_smoke(c)
        c.data.train_split = "train[:64]"
        c.data.test_split = "test[:16]"
    return c
