"""SDEdit on pixel and latent diffusion models, PDM-Pure, and the JPEG / crop-and-resize baselines.

SDEdit (Meng et al.) edits an image by diffusing it to a fraction ``strength`` of the forward
process and running the reverse process back: exactly what a DiffPure-style purifier does. So
the pixel path *is* :func:`jaxrob.purify.diffpure` (a :class:`Purifier` with
``t_star = strength``), wrapped; the latent path runs the same chain (the same truncated,
respaced schedule, the same key convention: forward noise ``fold_in(key, PURIFY_FORWARD)``,
reverse noise ``fold_in(fold_in(key, PURIFY_REVERSE), n)``) on ``encode_fn(x)`` and decodes the
result. With ``encode_fn = 2x - 1`` and ``decode_fn = (z + 1) / 2`` the latent path is the pixel
path (a test checks it).

An LDM is three things here: ``encode_fn(x) -> z`` ([0, 1] NHWC images to the scaled latent,
differentiable), ``decode_fn(z) -> x`` and a diffusion model on the latents (``ddpm(z_t, step)
-> eps`` with its ``.schedule``, e.g. a :class:`jaxrob.models.DiffusionModel`). A PDM is a pixel
diffusion model.

PDM-Pure (Xue & Chen) uses a pixel diffusion model as the purifier in front of an LDM edit:
SDEdit with the PDM at a small strength (paper: t* = 0.1 of the chain in 10 steps) removes the
protective perturbations that fool the LDM's encoder. :func:`pdm_pure` builds that purifier;
:class:`PurifyThenEdit` chains a purifier and an editor into one ``edit(x, key)`` that the
adaptive attacks differentiate through (:func:`jaxrob.attacks.pdm_pure_attack`).

References:
  Meng, He, Song, Song, Wu, Zhu, Ermon. SDEdit: Guided Image Synthesis and Editing with
  Stochastic Differential Equations. ICLR 2022.
  Xue, Chen. Pixel is a Barrier: Diffusion Models Are More Adversarially Robust Than We Think.
  arXiv:2404.13320, 2024.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int
from jaxrob._keys import fold
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Images
from jaxrob.purify._diffpure import (
    Purifier,
    _check_keys,
    _is_key_batch,
    _model_and_schedule,
    diffpure,
)

SDEDIT_SAMPLERS = ("ddpm", "ddim")


def check_strength(strength, name: str = "strength") -> float:
    """``strength`` as a float after checking it lies in [0, 1] (0: no edit)."""
    if isinstance(strength, bool):
        raise ValueError(f"{name}: expected a number in [0, 1], got {strength!r}")
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number in [0, 1], got {strength!r}") from None
    if math.isnan(s) or not 0.0 <= s <= 1.0:
        raise ValueError(f"{name}: expected a fraction of the forward process in [0, 1] "
                         f"(0 returns the input; SDEdit's usual 0.1-0.7), got {strength!r}")
    return s


def _check_codec(encode_fn, decode_fn) -> None:
    if (encode_fn is None) != (decode_fn is None):
        raise ValueError("encode_fn, decode_fn: expected both (a latent diffusion model) or "
                         "neither (a pixel diffusion model), got only "
                         f"{'encode_fn' if decode_fn is None else 'decode_fn'}")
    for f, n in ((encode_fn, "encode_fn"), (decode_fn, "decode_fn")):
        if f is not None and not callable(f):
            raise TypeError(f"{n}: expected a callable, got {type(f).__name__}")


@pytree_dataclass
class SDEdit:
    """SDEdit as a pytree ``edit(x, key) -> x_edited`` (build it with :func:`sdeditor`).

    Pixel models hold a :class:`Purifier` (``purifier``); latent models the diffusion model,
    its truncated chain and the codec (``ddpm``, ``chain``, ``encode_fn``, ``decode_fn``).
    Parameters are leaves, so an attack jitted over an editor compiles once per architecture.

    Attributes:
      purifier: the pixel path's purifier (None for a latent model or ``strength == 0``).
      ddpm: the latent diffusion model ``ddpm(z_t, step) -> eps`` (None for a pixel model).
      chain: the latent path's truncated, respaced chain (derived).
      encode_fn, decode_fn: the latent codec (None for a pixel model).
      strength: the fraction of the forward process in [0, 1].
      steps: reverse steps.
      sampler: ``"ddpm"`` or ``"ddim"``.
      eta: DDIM eta.
      remat: ``jax.checkpoint`` each reverse step (exact gradients in bounded memory).
    """

    purifier: Purifier | None
    ddpm: Callable | None
    chain: jd.Schedule | None
    encode_fn: Callable | None
    decode_fn: Callable | None
    strength: float = static_field()
    steps: int = static_field()
    sampler: str = static_field(default="ddpm")
    eta: float = static_field(default=0.0)
    remat: bool = static_field(default=True)

    @property
    def latent(self) -> bool:
        return self.encode_fn is not None

    @property
    def nfe(self) -> int:
        """Network evaluations of one edit of one image (forward only)."""
        return 0 if self.strength == 0 else self.steps

    def manifest(self) -> dict:
        return {"strength": self.strength, "steps": self.steps, "sampler": self.sampler,
                "eta": self.eta, "latent": self.latent, "nfe": self.nfe}

    def __call__(self, x: Images, key: AnyKey) -> Images:
        """Edit ``x`` ([0, 1] NHWC) with randomness ``key`` (one key, or one per example)."""
        check_images(x, "x")
        _check_keys(key, x, "key")
        if not self.latent:
            return x if self.purifier is None else self.purifier(x, key)
        if _is_key_batch(key):
            return jax.vmap(lambda xi, ki: self._latent_edit(xi[None], ki)[0])(x, key)
        return self._latent_edit(x, key)

    def _latent_edit(self, x, key):
        z = self.encode_fn(x)
        if self.strength > 0:
            z = _reverse_chain(self.ddpm, z, key, self.chain, sampler=self.sampler,
                               eta=self.eta, remat=self.remat)
        return jnp.clip(self.decode_fn(z), 0.0, 1.0)


def _reverse_chain(eps_fn, z, key, chain, *, sampler, eta, remat):
    """Diffuse ``z`` to the last position of ``chain`` and reverse it (Purifier's key
    convention)."""
    noise = jr.normal(jr.fold_in(key, tags.PURIFY_FORWARD), z.shape, z.dtype)
    k_rev = jr.fold_in(key, tags.PURIFY_REVERSE)
    z_t = jd.q_sample(z, chain.num_steps - 1, noise, chain)
    if sampler == "ddpm":
        return jd.ddpm_sample(eps_fn, z_t, k_rev, chain, remat=remat)
    return jd.ddim_sample(eps_fn, z_t, k_rev, chain, eta=eta, remat=remat)


def sdeditor(ddpm: Callable, *, strength: float, steps: int | None = None,
             sampler: str = "ddpm", encode_fn: Callable | None = None,
             decode_fn: Callable | None = None, schedule: jd.Schedule | None = None,
             eta: float = 0.0, remat: bool = True) -> SDEdit:
    """An SDEdit editor ``edit(x, key)`` for a pixel or a latent diffusion model.

    Args:
      ddpm: the diffusion model, ``ddpm(x_t, model_step) -> eps`` (a
        :class:`jaxrob.models.DiffusionModel`, which carries its schedule, or any eps_fn with
        ``schedule=``); on pixels in [-1, 1], or on the latents of ``encode_fn``.
      strength: fraction of the forward process in [0, 1] the image is diffused to (0: no
        edit; the pixel editor returns ``x``, the latent one ``decode_fn(encode_fn(x))``).
      steps: reverse steps, evenly respaced over the first ``strength`` of the chain (None:
        every step, ``round(strength * N)``).
      sampler: ``"ddpm"`` (ancestral) or ``"ddim"``.
      encode_fn: ``encode_fn(x) -> z`` for a latent diffusion model (with ``decode_fn``);
        None: a pixel model.
      decode_fn: ``decode_fn(z) -> x``; its output is clipped to [0, 1].
      schedule: the model's training schedule (None: ``ddpm.schedule``).
      eta: DDIM eta (``sampler="ddim"``).
      remat: checkpoint every reverse step (exact gradients in bounded memory).

    Returns:
      An :class:`SDEdit`.

    Raises:
      ValueError: ``strength`` outside [0, 1], a bad ``steps`` / ``sampler`` / ``eta``, or only
        one of ``encode_fn`` / ``decode_fn``.
    """
    strength = check_strength(strength)
    check_choice(sampler, SDEDIT_SAMPLERS, "sampler")
    _check_codec(encode_fn, decode_fn)
    if steps is not None:
        steps = check_positive_int(steps, "steps")
    eta = float(eta)
    if not eta >= 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    ddpm, schedule = _model_and_schedule(ddpm, schedule)
    if not callable(ddpm):
        raise TypeError(f"ddpm: expected a callable ddpm(x_t, model_step) -> eps, got "
                        f"{type(ddpm).__name__}")
    if strength == 0:
        return SDEdit(None, ddpm if encode_fn is not None else None, None, encode_fn,
                      decode_fn, 0.0, 0, sampler, eta, bool(remat))
    if steps is None:
        steps = schedule.step_for_t_star(strength) + 1
    if encode_fn is None:
        purifier = diffpure(ddpm, schedule, t_star=strength, num_steps=steps, sampler=sampler,
                            eta=eta, remat=remat)
        return SDEdit(purifier, None, None, None, None, strength, steps, sampler, eta,
                      bool(remat))
    chain = jd.truncated(schedule, strength, steps)
    return SDEdit(None, ddpm, chain, encode_fn, decode_fn, strength, steps, sampler, eta,
                  bool(remat))


def sdedit(ddpm: Callable, x: Images, strength: float, key: AnyKey, *, steps: int | None = None,
           sampler: str = "ddpm", encode_fn: Callable | None = None,
           decode_fn: Callable | None = None, schedule: jd.Schedule | None = None,
           eta: float = 0.0, remat: bool = True) -> Images:
    """SDEdit: diffuse ``x`` to ``strength`` of the forward process, reverse back to an image.

    ``sdeditor(ddpm, strength=strength, ...)(x, key)``; see :func:`sdeditor` for the arguments.
    The pixel path is :func:`jaxrob.purify.diffpure`'s purifier with ``t_star = strength`` and
    the same key; gradients through it are exact (``lax.scan`` with ``jax.checkpoint``).

    Args:
      ddpm: the pixel or latent diffusion model.
      x: (B, H, W, C) float32 images in [0, 1].
      strength: in [0, 1]; 0 returns ``x`` (pixel) or its autoencoder reconstruction (latent).
      key: one key, or a (B,) batch of keys (one per example, e.g.
        :func:`jaxrob.purify.example_keys`).
      steps, sampler, encode_fn, decode_fn, schedule, eta, remat: as :func:`sdeditor`.

    Returns:
      (B, H, W, C) edited images in [0, 1].
    """
    editor = sdeditor(ddpm, strength=strength, steps=steps, sampler=sampler,
                      encode_fn=encode_fn, decode_fn=decode_fn, schedule=schedule, eta=eta,
                      remat=remat)
    return editor(x, key)


def pdm_pure(pdm: Callable, schedule: jd.Schedule | None = None, *, t_star: float = 0.1,
             num_steps: int = 10, sampler: str = "ddpm", **kwargs) -> Purifier:
    """PDM-Pure's purifier: SDEdit with a pixel diffusion model at a small strength.

    :func:`jaxrob.purify.diffpure` with the paper's defaults (``t_star = 0.1`` of the chain in
    10 reverse steps); other keyword arguments go to :func:`diffpure` (``gradient=``,
    ``variance=``, ``eta=``, ...). Chain it before an LDM edit with :class:`PurifyThenEdit`.

    The reference pipeline (DeepFloyd IF stage II at 256^2, respacing "10,0,...", guidance 7,
    prompt "a picture", then the x4 upscaler) is a text-conditioned cascade; here the PDM is any
    unconditional pixel eps-model, at the data's resolution.

    References:
      Xue, Chen. Pixel is a Barrier: Diffusion Models Are More Adversarially Robust Than We
      Think. arXiv:2404.13320, 2024.
    """
    return diffpure(pdm, schedule, t_star=t_star, num_steps=num_steps, sampler=sampler,
                    **kwargs)


@pytree_dataclass
class PurifyThenEdit:
    """``edit(purify(x, k_p), k_e)`` as one pytree ``edit(x, key)``: PDM-Pure in front of an
    editor (e.g. a latent :class:`SDEdit`).

    The purifier's key is ``fold_in(key, PROTECT_PURIFY)``, the editor's
    ``fold_in(key, PROTECT_EDIT)`` (:mod:`jaxrob._keys`; folded into every key of a (B,) batch).

    Attributes:
      purify: ``purify(x, key) -> x_purified`` (e.g. :func:`pdm_pure`), or None (no purifier).
      edit: ``edit(x, key) -> x_edited`` (e.g. :func:`sdeditor`).
    """

    purify: Callable | None
    edit: Callable

    def __call__(self, x: Images, key: AnyKey) -> Images:
        if self.purify is not None:
            x = self.purify(x, fold(key, tags.PROTECT_PURIFY))
        return self.edit(x, fold(key, tags.PROTECT_EDIT))


# --------------------------------------------------------------------------------------------
# Baselines of the paper's comparison: JPEG (quality 65) and crop-and-resize (20%).


def jpeg(x: Images, *, quality: int = 65) -> np.ndarray:
    """JPEG compress and decompress every image (PIL, on the host; not jit-able).

    Args:
      x: (B, H, W, C) float32 images in [0, 1], C = 1 (grayscale) or 3 (RGB).
      quality: JPEG quality in [1, 95] (the paper's baseline: 65).

    Returns:
      (B, H, W, C) float32 numpy images in [0, 1] (quantised to 8 bits, then JPEG).
    """
    from PIL import Image

    check_images(x, "x")
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"x: expected 1 or 3 channels for JPEG, got shape {tuple(x.shape)}")
    if isinstance(quality, bool) or not isinstance(quality, int | np.integer) \
            or not 1 <= quality <= 95:
        raise ValueError(f"quality: expected an integer in [1, 95], got {quality!r}")
    u8 = np.clip(np.round(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)
    out = np.empty(u8.shape, np.float32)
    for b in range(u8.shape[0]):
        img = Image.fromarray(u8[b, ..., 0] if u8.shape[-1] == 1 else u8[b])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255.0
        out[b] = dec[..., None] if dec.ndim == 2 else dec
    return out


def crop_resize(x: Images, *, crop: float = 0.2) -> Images:
    """Central crop keeping ``1 - crop`` of the height and width, resized back (bilinear).

    Args:
      x: (B, H, W, C) float32 images in [0, 1].
      crop: fraction in [0, 1) of each side removed (half on each border; the paper's baseline
        crops 20%).

    Returns:
      (B, H, W, C) images in [0, 1] (jit-able).
    """
    check_images(x, "x")
    crop = float(crop)
    if not 0.0 <= crop < 1.0:
        raise ValueError(f"crop: expected a fraction in [0, 1), got {crop}")
    b, h, w, c = x.shape
    ch, cw = max(1, round(h * (1 - crop))), max(1, round(w * (1 - crop)))
    top, left = (h - ch) // 2, (w - cw) // 2
    patch = x[:, top:top + ch, left:left + cw, :]
    out = jax.image.resize(patch, (b, h, w, c), method="bilinear", antialias=False)
    return jnp.clip(out, 0.0, 1.0)


__all__ = ["SDEDIT_SAMPLERS", "PurifyThenEdit", "SDEdit", "check_strength", "crop_resize", "jpeg",
           "pdm_pure", "sdedit", "sdeditor"]
