"""KL autoencoder of MNIST (stage 1 of the MNIST latent diffusion model): 28x28x1 -> 7x7x4 codes.

    python experiments/train_ldm.py --config configs/mnist_vae.py --workdir runs/mnist_vae

Why 7x7x4 (f = 4): the autoencoder halves height and width once per level after the first, and
28 halves evenly twice (28 -> 14 -> 7) but not three times, so f = 4 is the largest factor
without padding; 4 channels as in Rombach et al.'s f = 4 models (LDM-4) and Stable Diffusion
give 196 code entries per 784-pixel image (4x fewer), a compression the decoder can still
invert sharply. The latent UNet then runs on 7x7 (odd, so without downsampling, attention at
7x7: ``jaxrob.models.UNET_CONFIGS["mnist_latent"]``). Loss: L1 + 1e-6 KL (the SD recipe without
the perceptual and GAN terms). Timing on the 2-core CPU: see ``checkpoints/README.md``.
Smoke variant: ``:smoke``.
"""

from configs import _common, _latent


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _latent.vae_base("mnist", "mnist")
    c.train.update(batch_size=32, num_steps=700, learning_rate=2e-3, lr_schedule="cosine",
                   warmup_steps=100, log_every=50, checkpoint_every=250)
    if arg == "smoke":
        _latent.vae_smoke(c)
    return c
