"""DDPM on MNIST (60k train / 10k test IDX files in the data dir) with the "mnist" UNet.

    python experiments/train_diffusion.py --config configs/mnist_ddpm.py --workdir runs/mnist_ddpm

The "mnist" UNet configuration narrowed to ch 16 (mults 1-2-2, 1 res block, attention at 7x7;
280,177 parameters; the overrides come from ``_common.ddpm_base``) so that purification
attacks with exact gradients through every reverse step stay affordable on 2 CPU cores. The
default 6000 steps of batch 64 took 40 min (2.5 steps/s, the CPU shared with other jobs; ~4.5
steps/s alone) plus ~15 s of sampling (64 samples, DDIM 100 steps) and evaluation (2000 test
images at t* = 0.1, 0.3); the export is committed as ``checkpoints/mnist_ddpm``. On an
accelerator raise ``train.num_steps`` (``--config.train.num_steps=50000``) or the width
(``--config.model.overrides.ch=32``). Smoke variant: ``:smoke``.
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
