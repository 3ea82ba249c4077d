"""Shared pieces of the latent-diffusion configs (``*_vae.py``, ``*_ldm.py``; not a config).

Both stages run ``experiments/train_ldm.py``; ``config.stage`` says which: ``"autoencoder"``
trains the KL autoencoder and exports it (with its code scaling factor), ``"ldm"`` trains a
DDPM on the codes of an autoencoder export and exports both as one latent diffusion model.
"""

from ml_collections import config_dict

from configs import _common

_AE_FIELDS = {"block_out_channels": tuple, "layers_per_block": int, "latent_channels": int,
              "num_groups": int}


def autoencoder_overrides(**values) -> config_dict.ConfigDict:
    """Every overridable AutoencoderKL argument as a typed field (None: the named
    configuration's value), so ``--config.autoencoder.overrides.latent_channels=8`` works."""
    unknown = set(values) - set(_AE_FIELDS)
    if unknown:
        raise ValueError(f"autoencoder_overrides: unknown argument(s) {sorted(unknown)}")
    return config_dict.ConfigDict({
        k: values[k] if values.get(k) is not None else config_dict.placeholder(t)
        for k, t in _AE_FIELDS.items()})


def _train(**kw) -> config_dict.ConfigDict:
    base = dict(batch_size=64, num_steps=2000, optimizer="adamw", learning_rate=1e-3,
                lr_schedule="cosine", warmup_steps=100, weight_decay=0.0, grad_clip=1.0,
                ema_decay=0.999, ema_warmup=True, log_every=50, checkpoint_every=250,
                keep_checkpoints=2)
    return config_dict.ConfigDict({**base, **kw})


def vae_base(dataset: str, autoencoder: str) -> config_dict.ConfigDict:
    """An autoencoder run: ``autoencoder`` names a ``jaxrob.models.AUTOENCODER_CONFIGS`` entry."""
    c = config_dict.ConfigDict()
    c.stage = "autoencoder"
    c.seed = 0
    c.data = _common.data(dataset, "train", "test")
    c.autoencoder = config_dict.ConfigDict({"config": autoencoder,
                                           "overrides": autoencoder_overrides()})
    c.train = _train(kl_weight=1e-6, recon="l1")
    c.eval = config_dict.ConfigDict({
        "num_images": 0,  # test images for the reconstruction metrics (0: the whole split)
        "scaling_images": 10000,  # training images whose codes set the scaling factor
        "batch_size": 500,
        "grid": 8,  # reconstructions.png: grid x grid tiles, originals and reconstructions
        "seed": 2,
    })
    c.mesh = _common.mesh(cpu_ynn="no_conv")
    return c


def vae_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A few steps of a tiny autoencoder on 64 images (seconds)."""
    c.autoencoder.overrides = autoencoder_overrides(block_out_channels=(4, 8, 8),
                                                    layers_per_block=1, num_groups=4)
    c.data.train_split = "train[:64]"
    c.data.test_split = "test[:16]"
    c.train.update(batch_size=16, num_steps=3, warmup_steps=1, log_every=1, checkpoint_every=2)
    c.eval.update(scaling_images=32, batch_size=16, grid=2)
    return c


def ldm_base(dataset: str, autoencoder_path: str, unet: str) -> config_dict.ConfigDict:
    """A latent DDPM run on the codes of the autoencoder export ``autoencoder_path`` (relative
    to the repository root), with the ``jaxrob.models.UNET_CONFIGS`` entry ``unet``."""
    c = config_dict.ConfigDict()
    c.stage = "ldm"
    c.seed = 0
    c.data = _common.data(dataset, "train", "test")
    c.autoencoder = config_dict.ConfigDict({"path": autoencoder_path})
    c.model = config_dict.ConfigDict({"name": "unet", "config": unet,
                                      "overrides": _common.unet_overrides()})
    c.diffusion = config_dict.ConfigDict({
        "schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02})
    c.train = _train(batch_size=128, learning_rate=5e-4, lr_schedule="constant",
                     warmup_steps=200)
    c.sample = config_dict.ConfigDict({"sampler": "ddim", "num_steps": 100, "eta": 0.0,
                                       "grid": 8, "seed": 1})
    c.eval = config_dict.ConfigDict({
        "batch_size": 500,  # images per call when encoding the training set
        # a classifier export that scores the decoded samples (None: not scored)
        "classifier": config_dict.placeholder(str),
        "seed": 2,
    })
    c.mesh = _common.mesh(cpu_ynn="no_conv")
    return c


def ldm_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A few steps of a tiny latent UNet on 64 images' codes (seconds)."""
    c.model.overrides = _common.unet_overrides(ch=8, num_res_blocks=1, attn_resolutions=(),
                                               num_groups=4, dropout=0.0)
    c.diffusion.num_steps = 50
    c.data.train_split = "train[:64]"
    c.data.test_split = "test[:16]"
    c.train.update(batch_size=16, num_steps=3, warmup_steps=1, log_every=1, checkpoint_every=2)
    c.sample.update(num_steps=5, grid=2)
    c.eval.update(batch_size=16, classifier=None)
    return c
