"""Training the KL autoencoder of a latent diffusion model, and what its latent DDPM needs.

Loss of a batch of [0, 1] images ``x`` (Rombach et al.'s first stage without the perceptual and
adversarial terms), with the posterior ``q(u|x) = N(mean, diag(exp(logvar)))`` and one draw
``u ~ q(u|x)`` per image::

    L = mean_b [ sum_pixels |x_hat(u) - x|  (or squared)  +  kl_weight * KL(q(u|x) || N(0, I)) ]
        / (H * W * C)

i.e. their objective divided by the number of pixel values, so that the reconstruction term is a
per-pixel error in [0, 1] units and ``kl_weight`` means what it does there (1e-6 for the
Stable Diffusion autoencoders: the codes are barely regularised, hence the scaling factor).
The latent DDPM is then trained on ``z = scaling_factor * u`` with ``scaling_factor = 1 /
std(u)`` over training images (Sec. 4.3.2, App. D.1).

References:
  Rombach, Blattmann, Lorenz, Esser, Ommer. High-Resolution Image Synthesis with Latent
  Diffusion Models. CVPR 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images
from jaxrob._keys import LATENT_SAMPLE, VAE_TRAIN_SAMPLE
from jaxrob._types import Array, Images, Key
from jaxrob.training._state import (
    TrainState,
    batched_apply,
    check_ema_decay,
    create_train_state,
    ema_update,
    jit_train_step,
    normal_noise,
)

RECON_LOSSES = ("l1", "l2")


def autoencoder_loss(params, images01: Images, key: Key, *, module, kl_weight: float,
                     recon: str = "l1") -> tuple[Array, dict]:
    """The KL autoencoder's loss (module docstring) and its parts.

    Args:
      params: the :class:`jaxrob.models.AutoencoderKL`'s params.
      images01: (B, H, W, C) float32 images in [0, 1].
      key: the posterior draw's randomness (``fold_in(key, VAE_TRAIN_SAMPLE)``).
      module: the :class:`jaxrob.models.AutoencoderKL`.
      kl_weight: weight of the KL term (>= 0).
      recon: ``"l1"`` or ``"l2"`` reconstruction error.

    Returns:
      ``(loss, parts)``: ``parts`` has ``recon`` (mean per-pixel error), ``kl`` (mean KL per
      image, nats) and ``mse`` (mean squared per-pixel error of the clipped reconstruction).
    """
    from jaxrob.models._autoencoder import LOGVAR_RANGE

    variables = {"params": params}
    c = module.latent_channels
    moments = module.apply(variables, jd.to_model_space(images01), method="encode")
    mean, logvar = moments[..., :c], jnp.clip(moments[..., c:], *LOGVAR_RANGE)
    u = mean + jnp.exp(0.5 * logvar) * normal_noise(jr.fold_in(key, VAE_TRAIN_SAMPLE),
                                                     mean.shape)
    x_hat = jd.from_model_space(module.apply(variables, u, method="decode"), clip=False)
    axes = tuple(range(1, images01.ndim))
    err = x_hat - images01
    rec = jnp.abs(err) if recon == "l1" else jnp.square(err)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                       axis=tuple(range(1, mean.ndim)))
    pixels = float(np.prod(images01.shape[1:]))
    loss = jnp.mean(jnp.sum(rec, axis=axes) + kl_weight * kl) / pixels
    mse = jnp.mean(jnp.square(jnp.clip(x_hat, 0.0, 1.0) - images01))
    return loss, {"recon": jnp.mean(rec), "kl": jnp.mean(kl), "mse": mse}


def init_autoencoder_state(module, key: Key, image_shape: tuple[int, int, int],
                           tx: optax.GradientTransformation, *, ema: bool = True) -> TrainState:
    """Initialise an :class:`AutoencoderKL` and its :class:`TrainState` (jit friendly).

    Args:
      module: the autoencoder.
      key: the run's seed key; split into an init key and the training base key.
      image_shape: ``(H, W, C)``.
      tx: optimizer.
      ema: keep EMA params.
    """
    k_init, k_train = jr.split(key)
    variables = module.init(k_init, jnp.zeros((1, *image_shape), jnp.float32))
    return create_train_state(variables, tx, k_train, ema=ema)


def make_autoencoder_train_step(module, tx: optax.GradientTransformation, *,
                                kl_weight: float = 1e-6, recon: str = "l1",
                                ema_decay: float | None = 0.999, ema_warmup: bool = True,
                                lr_fn: optax.Schedule | None = None,
                                mesh: jax.sharding.Mesh | None = None,
                                jit: bool = True) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for the KL autoencoder.

    The step's randomness is ``fold_in(state.key, state.step)`` (the posterior draw folds
    ``VAE_TRAIN_SAMPLE`` into it); ``batch["image"]`` holds float32 NHWC images in [0, 1].

    Args:
      module: the :class:`jaxrob.models.AutoencoderKL`.
      tx: optimizer.
      kl_weight: weight of the KL term (>= 0; Rombach et al.'s f = 4 / 8 models: 1e-6).
      recon: ``"l1"`` or ``"l2"``.
      ema_decay: EMA decay (None: keep ``state.ema_params`` unchanged).
      ema_warmup: ramp the EMA decay up over the first steps.
      lr_fn: learning-rate schedule, only to report ``lr``.
      mesh: the ``data`` mesh (default: all devices).
      jit: return the jitted, sharded, state-donating step (False: the plain function).

    Returns:
      The train step. Metrics: ``loss``, ``recon``, ``kl``, ``mse``, ``grad_norm``, ``lr``.

    Raises:
      ValueError: negative ``kl_weight`` or unknown ``recon``.
    """
    check_choice(recon, RECON_LOSSES, "recon")
    kl_weight = float(kl_weight)
    if not kl_weight >= 0.0:
        raise ValueError(f"kl_weight: expected a number >= 0, got {kl_weight!r}")
    ema_decay = check_ema_decay(ema_decay)
    loss_grad = jax.value_and_grad(autoencoder_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, parts), grads = loss_grad(state.params, batch["image"], state.step_key(),
                                         module=module, kl_weight=kl_weight, recon=recon)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, state.step, decay=ema_decay, warmup=ema_warmup)
        metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema), metrics

    return jit_train_step(train_step, mesh) if jit else train_step


def reconstruction_metrics(autoencoder, images01: Images, *, batch_size: int = 256,
                           mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
    """Reconstruction quality of an :class:`jaxrob.models.Autoencoder` through the posterior
    mean (``decode(encode_latent(x))``, clipped to [0, 1]).

    Returns:
      ``mse`` and ``l1`` (mean per pixel), ``psnr`` (mean over images of ``10 log10(1 /
      mse_i)``, dB), ``psnr_of_mse`` (``10 log10(1 / mse)``) and ``num_images``.
    """
    check_images(images01, "images01")

    def per_example(x, index):
        del index
        x_hat = autoencoder.decode(autoencoder.encode_latent(x))
        axes = tuple(range(1, x.ndim))
        return {"mse": jnp.mean(jnp.square(x_hat - x), axis=axes),
                "l1": jnp.mean(jnp.abs(x_hat - x), axis=axes)}

    out = batched_apply(per_example, images01, batch_size=batch_size, mesh=mesh)
    mse_i = np.maximum(out["mse"], 1e-12)
    mse = float(np.mean(out["mse"]))
    return {"mse": mse, "l1": float(np.mean(out["l1"])),
            "psnr": float(np.mean(10.0 * np.log10(1.0 / mse_i))),
            "psnr_of_mse": float(10.0 * np.log10(1.0 / max(mse, 1e-12))),
            "num_images": int(images01.shape[0])}


def encode_dataset(autoencoder, images01: Images, key: Key | None = None, *,
                   batch_size: int = 256,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scaled latent codes of many images, in fixed-size chunks over the mesh.

    Args:
      autoencoder: the :class:`jaxrob.models.Autoencoder`.
      images01: (N, H, W, C) float32 images in [0, 1] (host or device array).
      key: None for the posterior means; a key for one posterior sample per image, image
        ``i``'s drawn exactly as ``encode_latent(x, keys)`` draws it for the per-example keys
        ``keys[i] = fold_in(key, i)`` (so independent of ``batch_size`` and devices).
      batch_size: images per compiled call.
      mesh: the ``data`` mesh (default: all devices).

    Returns:
      ``(z, z_std)`` host arrays (N, h, w, c): the scaled codes, ``(u - shift) * scale``, and
      the scaled posterior standard deviations ``exp(logvar / 2) * scale``; ``z_mean + z_std *
      normal()`` is a draw of the posterior in code space.
    """
    check_images(images01, "images01")
    ae = autoencoder

    def per_example(x, index):
        mean, logvar = ae.encode(x)
        std = jnp.exp(0.5 * logvar)
        if key is not None:
            keys = jax.vmap(lambda i: jr.fold_in(key, i))(index)
            noise = jax.vmap(lambda k: jr.normal(jr.fold_in(k, LATENT_SAMPLE),
                                                 mean.shape[1:]))(keys)
            mean = mean + std * noise
        return {"z": (mean - ae.shift_factor) * ae.scaling_factor,
                "std": std * ae.scaling_factor}

    out = batched_apply(per_example, images01, batch_size=batch_size, mesh=mesh)
    return out["z"], out["std"]


def latent_scaling_factor(autoencoder, images01: Images, key: Key, *, batch_size: int = 256,
                          mesh: jax.sharding.Mesh | None = None) -> float:
    """``1 / std`` of the unscaled codes of posterior samples of ``images01`` (all entries
    pooled, about their overall mean), as Rombach et al. set it: the factor that gives the
    latent DDPM codes of unit variance. ``autoencoder``'s own scale and shift are ignored.
    """
    unscaled = autoencoder.replace(scaling_factor=1.0, shift_factor=0.0)
    z, _ = encode_dataset(unscaled, images01, key, batch_size=batch_size, mesh=mesh)
    std = float(np.std(z.astype(np.float64)))
    if not np.isfinite(std) or std <= 0.0:
        raise ValueError(f"latent_scaling_factor: the codes have standard deviation {std}")
    return 1.0 / std
