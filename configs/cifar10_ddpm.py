"""DDPM on CIFAR-10 with the Ho et al. (2020) UNet (35.7 M params, dropout 0.1): accelerators only.

    python experiments/train_diffusion.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm

Ho et al. train 800k steps of batch 128 at lr 2e-4 (warm-up 5000, EMA 0.9999, grad clip 1).
Data: the full training set exists here only as JPEG q75 (``cifar10_jpeg``, a lossy domain);
the 1000 lossless test images (``cifar10``, ``test``) are used for the denoising evaluation.
On the 2-core CPU one step of batch 32 takes ~7 s (PERF_NOTES §7), i.e. this is out of reach
there; its accelerator throughput has not been measured yet (no accelerator was available to the
session that wrote this config). Set ``--config.mesh.num_devices`` / batch size for the host.
The smoke variant swaps in a tiny UNet and runs in well under a minute on CPU:
``--config configs/cifar10_ddpm.py:smoke``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.ddpm_base()
    c.data = _common.data("cifar10_jpeg", "train", "test")
    c.data.test_name = "cifar10"  # evaluate on the lossless test images
    c.model.config = "cifar10"
    c.model.overrides = _common.unet_overrides(dropout=0.1)
    c.train.update(batch_size=128, num_steps=800_000, learning_rate=2e-4, lr_schedule="constant",
                   warmup_steps=5000, ema_decay=0.9999, log_every=100, checkpoint_every=5000,
                   keep_checkpoints=3)
    c.sample.update(sampler="ddim", num_steps=100)
    c.eval.update(num_images=1000, batch_size=250)
    if arg == "smoke":
        _common.ddpm_smoke(c)
        c.data.name = "cifar10"  # the lossless subset loads faster than decoding 60k JPEGs
        c.data.train_split = "train[:64]"
        c.data.test_split = "test[:16]"
    return c
