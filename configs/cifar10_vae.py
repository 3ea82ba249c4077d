"""KL autoencoder of CIFAR-10 (stage 1 of a CIFAR-10 latent diffusion model): 32x32x3 -> 8x8x4
(f = 4, ``jaxrob.models.AUTOENCODER_CONFIGS["cifar10"]``, 64-128-128 channels, 2 ResBlocks
per level). For an accelerator:

    python experiments/train_ldm.py --config configs/cifar10_vae.py --workdir runs/cifar10_vae

Trains on the JPEG q75 training set (the only full training set here; a lossy domain) and
measures reconstruction on the 1000 lossless test images. 50k steps of batch 128 (L1 + 1e-6
KL, AdamW 2e-4 cosine); not run yet (no accelerator was available to the session that wrote
it; on the 2-core CPU a step of batch 128 would take seconds). Smoke variant: ``:smoke``.
"""

from configs import _common, _latent


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _latent.vae_base("cifar10_jpeg", "cifar10")
    c.data.test_name = "cifar10"  # the lossless test images
    c.train.update(batch_size=128, num_steps=50_000, learning_rate=2e-4, lr_schedule="cosine",
                   warmup_steps=1000, log_every=100, checkpoint_every=2500, keep_checkpoints=3)
    c.eval.update(num_images=1000, scaling_images=10000, batch_size=250)
    if arg == "smoke":
        _latent.vae_smoke(c)
        c.data.name = "cifar10"  # the lossless subset loads faster than decoding 60k JPEGs
    return c
