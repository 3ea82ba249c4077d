"""Latent DDPM of MNIST (stage 2): a UNet on the 7x7x4 codes of ``checkpoints/mnist_vae``.

    python experiments/train_ldm.py --config configs/mnist_ldm.py --workdir runs/mnist_ldm

The UNet is ``jaxrob.models.UNET_CONFIGS["mnist_latent"]`` (7x7 is odd: one level, two
ResBlocks, attention at 7x7), linear schedule of 1000 steps as the pixel DDPMs, trained on
posterior draws of the codes scaled by the autoencoder's factor (1 / std of the codes). The
export holds the autoencoder and the UNet: ``jaxrob.models.load("checkpoints/mnist_ldm")`` is
a ``LatentDiffusionModel``. Decoded DDIM samples are scored by ``checkpoints/mnist_classifier``.
Timing on the 2-core CPU: see ``checkpoints/README.md``. Smoke variant: ``:smoke`` (point
``--config.autoencoder.path`` at a smoke autoencoder export).
"""

from configs import _common, _latent


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _latent.ldm_base("mnist", "checkpoints/mnist_vae", "mnist_latent")
    c.train.update(batch_size=64, num_steps=2000, learning_rate=1e-3, lr_schedule="constant",
                   warmup_steps=100, log_every=50, checkpoint_every=250)
    c.eval.classifier = "checkpoints/mnist_classifier"
    if arg == "smoke":
        _latent.ldm_smoke(c)
    return c
