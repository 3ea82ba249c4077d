"""Latent diffusion as pytrees: an :class:`Autoencoder` ([0, 1] images <-> scaled latent codes)
and a :class:`LatentDiffusionModel` (that autoencoder + a :class:`DiffusionModel` on its codes).

The latent DDPM is an ordinary :class:`jaxrob.models.DiffusionModel` whose UNet runs on the code
shape, with the same schedule API, so the samplers and DDPM code written for pixel models apply
unchanged to codes. Its diffusion space *is* the scaled code space: the codes are not mapped
from [0, 1] (``jaxrob.diffusion.to_model_space`` is for pixels); the scaling factor (1 / std of
the training codes, Rombach et al. Sec. 4.3.2 / App. D.1) makes them about unit variance, as
the forward process expects of x_0. A latent SDEdit is

    z0 = ldm.encode_latent(x)                       # or a posterior sample with a key
    z_t = q_sample(z0, n, noise, ldm.schedule)      # then reverse steps with ldm.diffusion
    x_hat = ldm.decode(z0_hat)

References:
  Rombach, Blattmann, Lorenz, Esser, Ommer. High-Resolution Image Synthesis with Latent
  Diffusion Models. CVPR 2022.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr

import jaxrob.diffusion as jd
from jaxrob._checks import check_images
from jaxrob._keys import LATENT_SAMPLE
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Images, LatentCodes, Latents, Steps
from jaxrob.models._autoencoder import LOGVAR_RANGE, AutoencoderKL, autoencoder_from_config
from jaxrob.models._loaded import DiffusionModel, _with_fast_vjp

__all__ = ["Autoencoder", "LatentDiffusionModel", "autoencoder_from_metadata"]


def _concrete_float(value) -> float | None:
    """``value`` as a Python float when it is concrete, else None (a tracer)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


@pytree_dataclass
class Autoencoder:
    """A KL autoencoder of [0, 1] NHWC images with scaled latent codes.

    ``z = (u - shift_factor) * scaling_factor`` for a posterior draw (or the mean) ``u``; the
    module maps images to its own [-1, 1] range inside. The codes' diffusion model sees ``z``.

    Attributes:
      module: the :class:`AutoencoderKL` network (static).
      variables: its variables (pytree leaves).
      scaling_factor: code scale (a leaf; Stable Diffusion v1: 0.18215; jaxrob's trainers: 1 /
        the std of the training codes).
      shift_factor: code shift (a leaf; 0 for SD v1/v2).
    """

    module: AutoencoderKL = static_field()
    variables: Any
    scaling_factor: Any = 1.0
    shift_factor: Any = 0.0

    def __post_init__(self):
        if not isinstance(self.module, AutoencoderKL):
            raise ValueError(f"Autoencoder.module: expected a jaxrob.models.AutoencoderKL, got "
                             f"{type(self.module).__name__}")
        s = _concrete_float(self.scaling_factor)
        if s is not None and not (math.isfinite(s) and s > 0):
            raise ValueError(f"Autoencoder.scaling_factor: expected a finite number > 0, got "
                             f"{self.scaling_factor!r}")
        b = _concrete_float(self.shift_factor)
        if b is not None and not math.isfinite(b):
            raise ValueError(f"Autoencoder.shift_factor: expected a finite number, got "
                             f"{self.shift_factor!r}")

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """The ``(h, w, c)`` code shape of ``(H, W, C)`` images (``ValueError`` if they do not
        fit: wrong channels, or a side the autoencoder cannot halve evenly)."""
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape: expected (height, width, channels), got "
                             f"{tuple(image_shape)}")
        return self.module.latent_shape(image_shape)

    def _check_images(self, x) -> None:
        check_images(x, "x")
        self.module.latent_shape(x.shape[1:])

    def encode(self, x: Images) -> tuple[LatentCodes, LatentCodes]:
        """The posterior ``q(u | x)``: unscaled ``(mean, logvar)`` (diffusers'
        ``latent_dist.mean`` / ``.logvar``; log-variance clamped to [-30, 20] as there).

        Args:
          x: (B, H, W, C) float32 images in [0, 1]; H and W divisible by the downsampling
            factor ``f``.

        Returns:
          ``mean``, ``logvar``: (B, H/f, W/f, latent_channels) each.
        """
        self._check_images(x)
        moments = self.module.apply(self.variables, jd.to_model_space(x), method="encode")
        c = self.module.latent_channels
        return moments[..., :c], jnp.clip(moments[..., c:], *LOGVAR_RANGE)

    def encode_latent(self, x: Images, key: AnyKey | None = None) -> LatentCodes:
        """Scaled latent codes ``z = (u - shift_factor) * scaling_factor`` of images.

        Args:
          x: (B, H, W, C) float32 images in [0, 1].
          key: None for the posterior mean ``u = mean``; a key for a posterior sample
            ``u = mean + exp(logvar / 2) * normal(fold_in(key, LATENT_SAMPLE))``; a (B,) batch
            of keys for one sample per example from its own key (results then do not depend
            on batch size).

        Returns:
          (B, H/f, W/f, latent_channels) codes.
        """
        if key is not None and jnp.ndim(key) == 1 and key.shape[0] != x.shape[0]:
            raise ValueError(f"key: expected one key or {x.shape[0]} keys (one per example), "
                             f"got {key.shape[0]} keys")
        mean, logvar = self.encode(x)
        if key is None:
            u = mean
        else:
            if jnp.ndim(key) == 1:
                noise = jax.vmap(lambda k: jr.normal(jr.fold_in(k, LATENT_SAMPLE),
                                                     mean.shape[1:]))(key)
            else:
                noise = jr.normal(jr.fold_in(key, LATENT_SAMPLE), mean.shape)
            u = mean + jnp.exp(0.5 * logvar) * noise
        return (u - self.shift_factor) * self.scaling_factor

    def decode(self, z: LatentCodes, *, clip: bool = True) -> Images:
        """Images of scaled latent codes: the decoder of ``z / scaling_factor + shift_factor``,
        mapped from [-1, 1] to [0, 1].

        Args:
          z: (B, h, w, latent_channels) codes.
          clip: clip to [0, 1] (False: the raw affine image of the decoder's output, e.g. for
            losses that should keep gradients outside the range).

        Returns:
          (B, h * f, w * f, C) images.
        """
        self.module.check_latents(z, "z")
        u = z / self.scaling_factor + self.shift_factor
        out = self.module.apply(self.variables, u, method="decode")
        return jd.from_model_space(out, clip=clip)

    def with_fast_vjp(self, on: bool = True) -> Autoencoder:
        """The same parameters in the network's reverse-mode (``True``) or forward-mode twin
        (see :meth:`jaxrob.models.DiffusionModel.with_fast_vjp`)."""
        return Autoencoder(_with_fast_vjp(self.module, on), self.variables, self.scaling_factor,
                           self.shift_factor)

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.variables)))


def _check_code_shape(diffusion: DiffusionModel, code: tuple[int, int, int],
                      image_shape: tuple[int, int, int]) -> None:
    """``ValueError`` unless the diffusion model's network takes and returns codes of ``code``
    shape (for a UNet: its in_ch / out_ch / image_size and its downsampling factor)."""
    h, w, c = code
    net = diffusion.module
    where = (f"LatentDiffusionModel: the autoencoder turns {image_shape[0]}x{image_shape[1]}x"
             f"{image_shape[2]} images into {h}x{w}x{c} latent codes, but the diffusion model's "
             f"{type(net).__name__}")
    in_ch, out_ch = getattr(net, "in_ch", None), getattr(net, "out_ch", None)
    size, ch_mult = getattr(net, "image_size", None), getattr(net, "ch_mult", None)
    if in_ch is not None and in_ch != c:
        raise ValueError(f"{where} takes {in_ch}-channel inputs (in_ch={in_ch})")
    if out_ch is not None and out_ch != c:
        raise ValueError(f"{where} predicts {out_ch} channels (out_ch={out_ch})")
    if size is not None and (h, w) != (size, size):
        raise ValueError(f"{where} is configured for {size}x{size} inputs (image_size={size})")
    if ch_mult is not None:
        factor = 2 ** (len(ch_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(f"{where} downsamples by {factor} (ch_mult={tuple(ch_mult)}), "
                             f"which {h}x{w} does not divide into")


@pytree_dataclass
class LatentDiffusionModel:
    """A latent diffusion model: an :class:`Autoencoder` and a :class:`DiffusionModel` on its
    scaled codes.

    ``ldm.encode(x)``, ``ldm.encode_latent(x, key=None)`` and ``ldm.decode(z)`` are the
    autoencoder's; ``ldm.diffusion`` (also ``ldm(z_t, step)`` and ``ldm.schedule``) is the
    eps-model on codes of shape ``ldm.latent_shape``. A pytree: both networks' variables, the
    schedule and the code scale are leaves.

    Attributes:
      autoencoder: the :class:`Autoencoder`.
      diffusion: the :class:`DiffusionModel` on codes.
      image_shape: ``(H, W, C)`` of the images (static); None: from the autoencoder's
        ``image_size`` and ``in_ch``.

    Raises:
      ValueError: (at construction) the diffusion model does not take the autoencoder's codes
        of ``image_shape`` images, or the images do not fit the autoencoder.
    """

    autoencoder: Autoencoder
    diffusion: DiffusionModel
    image_shape: tuple[int, int, int] | None = static_field(default=None)

    def __post_init__(self):
        if not isinstance(self.autoencoder, Autoencoder):
            raise ValueError(f"LatentDiffusionModel.autoencoder: expected a "
                             f"jaxrob.models.Autoencoder, got {type(self.autoencoder).__name__}")
        if not isinstance(self.diffusion, DiffusionModel):
            raise ValueError(f"LatentDiffusionModel.diffusion: expected a "
                             f"jaxrob.models.DiffusionModel, got {type(self.diffusion).__name__}")
        shape = self.image_shape
        if shape is None:
            ae = self.autoencoder.module
            if ae.image_size is None:
                raise ValueError("LatentDiffusionModel.image_shape: the autoencoder has no "
                                 "image_size; pass image_shape=(H, W, C)")
            shape = (ae.image_size, ae.image_size, ae.in_ch)
        shape = tuple(int(d) for d in shape)
        object.__setattr__(self, "image_shape", shape)
        _check_code_shape(self.diffusion, self.autoencoder.latent_shape(shape), shape)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(h, w, c)`` of the codes the diffusion model runs on."""
        return self.autoencoder.latent_shape(self.image_shape)

    @property
    def schedule(self) -> jd.Schedule:
        """The latent DDPM's training schedule."""
        return self.diffusion.schedule

    def _check_images(self, x) -> None:
        check_images(x, "x")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: this latent diffusion model takes images of shape "
                             f"{self.image_shape} (H, W, C), got shape {tuple(x.shape)}")

    def encode(self, x: Images) -> tuple[LatentCodes, LatentCodes]:
        """:meth:`Autoencoder.encode`: unscaled posterior ``(mean, logvar)``."""
        self._check_images(x)
        return self.autoencoder.encode(x)

    def encode_latent(self, x: Images, key: AnyKey | None = None) -> LatentCodes:
        """:meth:`Autoencoder.encode_latent`: scaled codes (mean, or a sample with ``key``)."""
        self._check_images(x)
        return self.autoencoder.encode_latent(x, key)

    def decode(self, z: LatentCodes, *, clip: bool = True) -> Images:
        """:meth:`Autoencoder.decode`: [0, 1] images of scaled codes."""
        self.autoencoder.module.check_latents(z, "z")
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z: this latent diffusion model decodes codes of shape "
                             f"{self.latent_shape}, got shape {tuple(z.shape)}")
        return self.autoencoder.decode(z, clip=clip)

    def __call__(self, z_t: Latents, step: Steps) -> Latents:
        """The latent eps-model: ``ldm.diffusion(z_t, step)``."""
        return self.diffusion(z_t, step)

    def with_fast_vjp(self, on: bool = True) -> LatentDiffusionModel:
        """Both networks' reverse-mode (``True``) or forward-mode twins, same parameters."""
        return LatentDiffusionModel(self.autoencoder.with_fast_vjp(on),
                                    self.diffusion.with_fast_vjp(on), self.image_shape)

    @property
    def num_params(self) -> int:
        return self.autoencoder.num_params + self.diffusion.num_params


def autoencoder_from_metadata(meta: Mapping[str, Any]) -> AutoencoderKL:
    """The :class:`AutoencoderKL` described by an export's ``autoencoder`` metadata,
    ``{"config": <name or dict>, "overrides": {...}, "scaling_factor": s, ...}`` (``None``
    overrides keep the named configuration's value)."""
    overrides = {k: v for k, v in dict(meta.get("overrides") or {}).items() if v is not None}
    return autoencoder_from_config(meta["config"], **overrides)
