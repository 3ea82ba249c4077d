"""Latent DDPM of CIFAR-10 (stage 2) on the 8x8x4 codes of a ``configs/cifar10_vae.py`` export,
with ``jaxrob.models.UNET_CONFIGS["cifar10_latent"]`` (ch 128, mults 1-2-2, attention at 4x4,
dropout 0.1). For an accelerator, after stage 1:

    python experiments/train_ldm.py --config configs/cifar10_ldm.py \\
        --config.autoencoder.path=runs/cifar10_vae/export --workdir runs/cifar10_ldm

200k steps of batch 128 at lr 2e-4 (EMA 0.9999); not run yet (no accelerator was available to
the session that wrote it). Smoke variant: ``:smoke``.
"""

from configs import _common, _latent


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _latent.ldm_base("cifar10_jpeg", "runs/cifar10_vae/export", "cifar10_latent")
    c.train.update(batch_size=128, num_steps=200_000, learning_rate=2e-4,
                   lr_schedule="constant", warmup_steps=5000, ema_decay=0.9999, log_every=100,
                   checkpoint_every=5000, keep_checkpoints=3)
    if arg == "smoke":
        _latent.ldm_smoke(c)
        c.data.name = "cifar10"
        c.model.overrides.ch_mult = (1,)
        c.model.overrides.attn_resolutions = ()
    return c
