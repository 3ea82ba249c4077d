"""score_sde's NCSN++ network family in its DDPM++ form (Song et al. 2021), Flax linen, NHWC.

The VP continuous DDPM++ models of ``yang-song/score_sde(_pytorch)`` and, with
``num_res_blocks=8``, DiffPure's CIFAR-10 model (``cifar10_ddpmpp_deep_continuous``,
``checkpoint_8.pth``). What the network computes, for the configurations it accepts
(:class:`NCSNpp`'s attributes; anything else of score_sde's ``config.model`` is refused by
:func:`ncsnpp_config_from_score_sde` with the field named):

* labels ``t * 999`` -> sinusoidal embedding of width ``nf`` (score_sde's
  ``get_timestep_embedding``: frequencies ``exp(-log(10000) i / (nf/2 - 1))``, [sin, cos]) or
  Gaussian Fourier features of ``log(labels)`` -> Dense(4 nf) -> act -> Dense(4 nf);
* conv3x3 to ``nf``; per level ``num_res_blocks`` residual blocks (+ channel attention at
  ``attn_resolutions``), then a downsampling block (a BigGAN residual block with 2x2 mean
  pooling, or a DDPM stride-2 conv / average pool); middle res-attn-res; per level
  ``num_res_blocks + 1`` residual blocks on ``concat(h, skip)``, one attention layer after the
  level's blocks at ``attn_resolutions``, then an upsampling block (nearest x2); GN -> act ->
  conv3x3 to the input channels;
* residual block: GN -> act -> [resample] -> conv3 -> + Dense(act(temb)) -> GN -> act -> dropout
  -> conv3, skip through a 1x1 conv (BigGAN: ``Conv_2`` when the channels change or the block
  resamples; DDPM: ``NIN_0`` when the channels change), sum divided by sqrt(2) with
  ``skip_rescale``; GroupNorm groups ``min(C // 4, 32)``, epsilon 1e-6;
* attention: GN, 1x1 q/k/v/out projections (``NIN``), softmax(q k / sqrt(C)) over all
  positions, residual (/ sqrt(2) with ``skip_rescale``).

For the VP continuous models the output is eps-like: ``score(x, t) = -out(x, t * 999) / s(t)``
(score_sde ``get_score_fn``), so a :class:`jaxrob.models.DiffusionModel` over this module, whose
step labels are ``t * 999`` in :func:`jaxrob.diffusion.vpsde_sample` (``VPSDE.model_step``), is the
score model that every purifier (``sampler="sde"``/``"ode"``) and attack takes unchanged.

Submodule and parameter names follow the PyTorch module's registration order, so the importer
(:func:`ncsnpp_from_state_dict`) maps ``all_modules.{i}.{sub}.{weight,bias,W,b}`` one to one.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through
  Stochastic Differential Equations. ICLR 2021.
  Nie, Guo, Huang, Xiao, Vahdat, Anandkumar. Diffusion Models for Adversarial Purification.
  ICML 2022.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from jaxrob._checks import check_images
from jaxrob._types import Array, Latents, Steps
from jaxrob.models._fast_vjp_ops import upsample_nearest2x, upsample_nearest2x_plain
from jaxrob.models._torch_import import StateDict, fill_from_state_dict
from jaxrob.models._unet import _conv_impl, _group_norm

__all__ = [
    "NCSNPP_CONFIGS",
    "NCSNpp",
    "convert_score_sde",
    "count_params",
    "load_score_sde",
    "ncsnpp_config_from_score_sde",
    "ncsnpp_export_metadata",
    "ncsnpp_from_config",
    "ncsnpp_from_metadata",
    "ncsnpp_from_state_dict",
    "ncsnpp_timestep_embedding",
    "read_torch_checkpoint",
    "vp_schedule",
]

_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_nin_init = nn.initializers.variance_scaling(0.1, "fan_avg", "uniform")

ACTIVATIONS = {"swish": nn.silu, "silu": nn.silu, "elu": nn.elu, "relu": nn.relu,
               "lrelu": lambda x: nn.leaky_relu(x, 0.2)}
RESBLOCK_TYPES = ("biggan", "ddpm")
EMBEDDING_TYPES = ("positional", "fourier")

# score_sde configs/vp/cifar10_ddpmpp_continuous.py, and its "deep" variant (8 blocks per level),
# which is DiffPure's CIFAR-10 model (DiffPure configs/cifar10.yml).
_CIFAR10_DDPMPP = dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                       dropout=0.1, resamp_with_conv=True, skip_rescale=True,
                       resblock_type="biggan", embedding_type="positional", fourier_scale=16.0,
                       nonlinearity="swish", centered=True, num_channels=3, image_size=32,
                       num_scales=1000, beta_min=0.1, beta_max=20.0)
NCSNPP_CONFIGS: dict[str, dict[str, Any]] = {
    "cifar10_ddpmpp_continuous": dict(_CIFAR10_DDPMPP),
    "cifar10_ddpmpp_deep_continuous": dict(_CIFAR10_DDPMPP, num_res_blocks=8),
}


def ncsnpp_timestep_embedding(labels: Array, dim: int, max_positions: float = 10000.0) -> Array:
    """score_sde's ``get_timestep_embedding``: ``[sin(l f), cos(l f)]``,
    ``f_i = exp(-i log(max_positions) / (dim/2 - 1))``, the operations in its order (float32).

    Args:
      labels: (B,) float or int labels (``t * 999`` for the VP continuous models).
      dim: embedding width (a zero column is appended when odd).

    Returns:
      (B, dim) float32.
    """
    half = dim // 2
    scale = math.log(max_positions) / (half - 1)
    freqs_H = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-scale))
    arg_BH = labels.astype(jnp.float32)[:, None] * freqs_H[None, :]
    emb_BD = jnp.concatenate([jnp.sin(arg_BH), jnp.cos(arg_BH)], axis=-1)
    if dim % 2:
        emb_BD = jnp.pad(emb_BD, ((0, 0), (0, 1)))
    return emb_BD


def _groups(channels: int) -> int:
    return min(channels // 4, 32)


def _conv(features: int, name: str, fast_vjp: bool, *, k: int = 3, stride: int = 1,
          padding=None) -> nn.Conv:
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding,
                   kernel_init=_default_init, name=name,
                   conv_general_dilated=_conv_impl(fast_vjp))


def _mean_pool2x(x_BHWC):
    B, H, W, C = x_BHWC.shape
    return x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


class NIN(nn.Module):
    """score_sde's ``NIN``: a 1x1 projection over channels, ``x @ W + b`` (``W`` (in, out))."""

    features: int

    @nn.compact
    def __call__(self, x):
        W = self.param("W", _nin_init, (x.shape[-1], self.features), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.einsum("...c,cd->...d", x, W) + b.reshape((1,) * (x.ndim - 1) + (-1,))


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features ``[sin(2 pi x W), cos(2 pi x W)]`` (``W`` fixed at training)."""

    size: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x_B):
        W = self.param("W", nn.initializers.normal(self.scale), (self.size,), jnp.float32)
        proj_BD = x_B[:, None] * W[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(proj_BD), jnp.cos(proj_BD)], axis=-1)


class ResBlockpp(nn.Module):
    """DDPM++ residual block: ``kind="biggan"`` (``ResnetBlockBigGANpp``, may resample) or
    ``"ddpm"`` (``ResnetBlockDDPMpp``)."""

    out_ch: int
    kind: str = "biggan"
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    act: str = "swish"
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, temb_BD, train: bool):
        act = ACTIVATIONS[self.act]
        in_ch = x_BHWC.shape[-1]
        gn = lambda c, name: _group_norm(_groups(c), 1e-6, self.fast_vjp, name)
        h = act(gn(in_ch, "GroupNorm_0")(x_BHWC))
        if self.up:
            up = upsample_nearest2x if self.fast_vjp else upsample_nearest2x_plain
            h, x_BHWC = up(h), up(x_BHWC)
        elif self.down:
            h, x_BHWC = _mean_pool2x(h), _mean_pool2x(x_BHWC)
        h = _conv(self.out_ch, "Conv_0", self.fast_vjp)(h)
        h = h + nn.Dense(self.out_ch, kernel_init=_default_init, name="Dense_0")(
            act(temb_BD))[:, None, None, :]
        h = act(gn(self.out_ch, "GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, "Conv_1", self.fast_vjp)(h)
        if self.kind == "biggan":
            if in_ch != self.out_ch or self.up or self.down:
                x_BHWC = _conv(self.out_ch, "Conv_2", self.fast_vjp, k=1)(x_BHWC)
        elif in_ch != self.out_ch:
            x_BHWC = NIN(self.out_ch, name="NIN_0")(x_BHWC)
        out = x_BHWC + h
        return out / np.sqrt(2.0).astype(np.float32) if self.skip_rescale else out


class AttnBlockpp(nn.Module):
    """DDPM++ self-attention over all positions (one head, ``NIN`` projections)."""

    skip_rescale: bool = True
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        h = _group_norm(_groups(C), 1e-6, self.fast_vjp, "GroupNorm_0")(x_BHWC)
        q_BLC = NIN(C, name="NIN_0")(h).reshape(B, H * W, C)
        k_BLC = NIN(C, name="NIN_1")(h).reshape(B, H * W, C)
        v_BLC = NIN(C, name="NIN_2")(h).reshape(B, H * W, C)
        w_BQK = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q_BLC, k_BLC) * (C ** -0.5), axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", w_BQK, v_BLC).reshape(B, H, W, C)
        out = x_BHWC + NIN(C, name="NIN_3")(h)
        return out / np.sqrt(2.0).astype(np.float32) if self.skip_rescale else out


class Resample(nn.Module):
    """The DDPM-style ``Downsample`` / ``Upsample`` of ``resblock_type="ddpm"`` (FIR off)."""

    up: bool
    with_conv: bool = True
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        C = x_BHWC.shape[-1]
        if self.up:
            up = upsample_nearest2x if self.fast_vjp else upsample_nearest2x_plain
            h = up(x_BHWC)
            return _conv(C, "Conv_0", self.fast_vjp)(h) if self.with_conv else h
        if self.with_conv:  # pad one row/column of zeros on the bottom/right, stride-2 conv
            return _conv(C, "Conv_0", self.fast_vjp, stride=2, padding=((0, 1), (0, 1)))(x_BHWC)
        return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


class NCSNpp(nn.Module):
    """score_sde's NCSN++ network in its DDPM++ form (FIR off, no progressive paths), NHWC.

    Call as ``module.apply(variables, x, labels, train=False)`` with ``labels = t * 999`` for
    the VP continuous models (``train=True`` needs ``rngs={'dropout': key}``). Build from a
    named configuration with :func:`ncsnpp_from_config`; import weights with
    :func:`ncsnpp_from_state_dict` or :func:`load_score_sde`.

    Attributes (score_sde ``config.model`` / ``config.data`` names):
      nf: base channels.
      ch_mult: channel multiplier per level (``len(ch_mult) - 1`` downsamplings).
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      attn_resolutions: spatial sizes with attention.
      dropout: dropout rate (train mode only).
      resamp_with_conv: ``resblock_type="ddpm"`` resampling by conv (else pooling / plain).
      skip_rescale: residual sums divided by sqrt(2).
      resblock_type: ``"biggan"`` (DDPM++) or ``"ddpm"``.
      embedding_type: ``"positional"`` (labels) or ``"fourier"`` (of ``log(labels)``).
      fourier_scale: initial scale of the Fourier features (initialisation only).
      nonlinearity: ``"swish"``, ``"elu"``, ``"relu"`` or ``"lrelu"``.
      centered: inputs in [-1, 1] (False: [0, 1] inputs, mapped to [-1, 1] inside).
      num_channels: image channels (input and output).
      image_size: height = width the network was built for (attention placement; checked).
      num_scales: length of the ``sigmas`` buffer of the PyTorch module (import only).
      beta_min, beta_max: the VP-SDE the model was trained with (for :func:`load_score_sde`).
      fast_vjp: the convolutions' and group norms' fast input-gradient twins
        (:mod:`jaxrob.models._conv`), same parameters and values.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"
    centered: bool = True
    num_channels: int = 3
    image_size: int = 32
    num_scales: int = 1000
    beta_min: float = 0.1
    beta_max: float = 20.0
    fast_vjp: bool = False

    def layout(self) -> list[tuple[str, str]]:
        """``(flax name, kind)`` of every top-level submodule in the PyTorch module's order
        (``all_modules.{index}``)."""
        mods: list[tuple[str, str]] = []
        if self.embedding_type == "fourier":
            mods.append(("temb_fourier", "fourier"))
        mods += [("temb_dense_0", "dense"), ("temb_dense_1", "dense"), ("conv_in", "conv")]
        n = len(self.ch_mult)
        sizes = [self.image_size // 2**i for i in range(n)]
        for level in range(n):
            for b in range(self.num_res_blocks):
                mods.append((f"down_{level}_res_{b}", "res"))
                if sizes[level] in self.attn_resolutions:
                    mods.append((f"down_{level}_attn_{b}", "attn"))
            if level != n - 1:
                mods.append((f"down_{level}_resample", "res" if self.biggan else "resample"))
        mods += [("mid_res_0", "res"), ("mid_attn", "attn"), ("mid_res_1", "res")]
        for level in reversed(range(n)):
            for b in range(self.num_res_blocks + 1):
                mods.append((f"up_{level}_res_{b}", "res"))
            if sizes[level] in self.attn_resolutions:
                mods.append((f"up_{level}_attn", "attn"))
            if level != 0:
                mods.append((f"up_{level}_resample", "res" if self.biggan else "resample"))
        mods += [("norm_out", "norm"), ("conv_out", "conv")]
        return mods

    @property
    def biggan(self) -> bool:
        return self.resblock_type == "biggan"

    def _check(self, x, labels):
        if self.resblock_type not in RESBLOCK_TYPES:
            raise ValueError(f"resblock_type: expected one of {list(RESBLOCK_TYPES)}, got "
                             f"{self.resblock_type!r}")
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type: expected one of {list(EMBEDDING_TYPES)}, got "
                             f"{self.embedding_type!r}")
        if self.nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity: expected one of {sorted(ACTIVATIONS)}, got "
                             f"{self.nonlinearity!r}")
        check_images(x, "x_t", channels=self.num_channels,
                     hw=(self.image_size, self.image_size), value_range=None)
        labels = jnp.asarray(labels)
        if not (jnp.issubdtype(labels.dtype, jnp.integer)
                or jnp.issubdtype(labels.dtype, jnp.floating)) or labels.dtype == jnp.bool_:
            raise ValueError(f"labels: expected an int or float array (t * 999), got dtype "
                             f"{labels.dtype}")
        B = x.shape[0]
        if labels.ndim == 0:
            labels = jnp.broadcast_to(labels, (B,))
        if labels.shape != (B,):
            raise ValueError(f"labels: expected shape ({B},) (one label per example) or a "
                             f"scalar, got shape {tuple(labels.shape)}")
        return labels

    @nn.compact
    def __call__(self, x: Latents, labels: Steps, train: bool = False) -> Array:
        """The network output (eps-like for the VP continuous models).

        Args:
          x: (B, H, W, C) float32 diffusion-space input ([-1, 1] when ``centered``).
          labels: (B,) or scalar noise labels (``t * 999``; Fourier: positive).
          train: dropout on (needs the ``'dropout'`` rng).

        Returns:
          (B, H, W, C) float32.
        """
        labels_B = self._check(x, labels)
        act = ACTIVATIONS[self.nonlinearity]
        nf, n = self.nf, len(self.ch_mult)
        res = lambda c, name, **kw: ResBlockpp(
            c, self.resblock_type, dropout=self.dropout, skip_rescale=self.skip_rescale,
            act=self.nonlinearity, fast_vjp=self.fast_vjp, name=name, **kw)
        attn = lambda name: AttnBlockpp(self.skip_rescale, self.fast_vjp, name=name)

        if self.embedding_type == "fourier":
            temb = FourierEmbedding(nf, self.fourier_scale, name="temb_fourier")(
                jnp.log(labels_B.astype(jnp.float32)))
        else:
            temb = ncsnpp_timestep_embedding(labels_B, nf)
        temb = nn.Dense(4 * nf, kernel_init=_default_init, name="temb_dense_0")(temb)
        temb = nn.Dense(4 * nf, kernel_init=_default_init, name="temb_dense_1")(act(temb))

        if not self.centered:
            x = 2 * x - 1.0
        hs = [_conv(nf, "conv_in", self.fast_vjp)(x)]
        for level in range(n):
            for b in range(self.num_res_blocks):
                h = res(nf * self.ch_mult[level], f"down_{level}_res_{b}")(hs[-1], temb, train)
                if h.shape[2] in self.attn_resolutions:
                    h = attn(f"down_{level}_attn_{b}")(h)
                hs.append(h)
            if level != n - 1:
                name = f"down_{level}_resample"
                if self.biggan:
                    h = res(hs[-1].shape[-1], name, down=True)(hs[-1], temb, train)
                else:
                    h = Resample(False, self.resamp_with_conv, self.fast_vjp, name=name)(hs[-1])
                hs.append(h)

        h = hs[-1]
        h = res(h.shape[-1], "mid_res_0")(h, temb, train)
        h = attn("mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, temb, train)

        for level in reversed(range(n)):
            for b in range(self.num_res_blocks + 1):
                h = res(nf * self.ch_mult[level], f"up_{level}_res_{b}")(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[2] in self.attn_resolutions:
                h = attn(f"up_{level}_attn")(h)
            if level != 0:
                name = f"up_{level}_resample"
                if self.biggan:
                    h = res(h.shape[-1], name, up=True)(h, temb, train)
                else:
                    h = Resample(True, self.resamp_with_conv, self.fast_vjp, name=name)(h)
        assert not hs

        h = act(_group_norm(_groups(h.shape[-1]), 1e-6, self.fast_vjp, "norm_out")(h))
        return _conv(self.num_channels, "conv_out", self.fast_vjp)(h)


# --------------------------------------------------------------------------- configurations

_FIELDS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
           "skip_rescale", "resblock_type", "embedding_type", "fourier_scale", "nonlinearity",
           "centered", "num_channels", "image_size", "num_scales", "beta_min", "beta_max",
           "fast_vjp")


def ncsnpp_from_config(config: str | Mapping[str, Any] | NCSNpp = "cifar10_ddpmpp_deep_continuous",
                       **overrides) -> NCSNpp:
    """An :class:`NCSNpp` from a :data:`NCSNPP_CONFIGS` name or a dict of its attributes.

    Args:
      config: a name (``"cifar10_ddpmpp_deep_continuous"``: DiffPure's CIFAR-10 model), a dict
        of :class:`NCSNpp` attributes (:func:`ncsnpp_config_from_score_sde` makes one from a
        score_sde config), or a module (returned with ``overrides`` applied).
      **overrides: attributes replacing the configuration's (None values are ignored).

    Raises:
      ValueError: unknown name or attribute, or an unsupported value (named).
    """
    if isinstance(config, NCSNpp):
        base = {f: getattr(config, f) for f in _FIELDS}
    elif isinstance(config, str):
        if config not in NCSNPP_CONFIGS:
            raise ValueError(f"config: expected one of {sorted(NCSNPP_CONFIGS)} or a dict of "
                             f"NCSNpp attributes, got {config!r}")
        base = dict(NCSNPP_CONFIGS[config])
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise TypeError(f"config: expected a name, a dict or an NCSNpp, got "
                        f"{type(config).__name__}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(base) - set(_FIELDS)
    if unknown:
        raise ValueError(f"NCSNpp config: unknown attribute(s) {sorted(unknown)}; expected a "
                         f"subset of {list(_FIELDS)}")
    for key in ("ch_mult", "attn_resolutions"):
        if key in base:
            base[key] = tuple(int(v) for v in base[key])
    for key, allowed in (("resblock_type", RESBLOCK_TYPES), ("embedding_type", EMBEDDING_TYPES),
                         ("nonlinearity", tuple(ACTIVATIONS))):
        if key in base and str(base[key]).lower() not in allowed:
            raise ValueError(f"NCSNpp config: {key} must be one of {list(allowed)}, got "
                             f"{base[key]!r}")
        if key in base:
            base[key] = str(base[key]).lower()
    module = NCSNpp(**base)
    n = len(module.ch_mult)
    if module.image_size % 2 ** (n - 1):
        raise ValueError(f"NCSNpp config: image_size {module.image_size} is not divisible by "
                         f"2**(len(ch_mult)-1) = {2 ** (n - 1)}")
    for level, mult in enumerate(module.ch_mult):
        if (module.nf * mult) % 4 or (module.nf * mult) % _groups(module.nf * mult):
            raise ValueError(f"NCSNpp config: nf * ch_mult[{level}] = {module.nf * mult} does "
                             f"not split into GroupNorm's min(C // 4, 32) groups")
    return module


def _section(cfg, name):
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return cfg.get(name, {}) or {}
    return getattr(cfg, name, None) or {}


def _field(section, key, default=None):
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


# score_sde config.model fields -> the value this implementation needs (None: read, any value)
_REQUIRED = {"name": "ncsnpp", "normalization": "groupnorm", "fir": False,
             "progressive": "none", "progressive_input": "none", "scale_by_sigma": False,
             "conditional": True, "conv_size": 3, "attention_type": "ddpm"}


def ncsnpp_config_from_score_sde(config) -> dict[str, Any]:
    """:class:`NCSNpp` attributes from a score_sde config (``ml_collections`` or nested dict).

    Reads ``config.model`` (``nf``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``dropout``, ``resamp_with_conv``, ``skip_rescale``, ``resblock_type``, ``embedding_type``,
    ``fourier_scale``, ``nonlinearity``, ``num_scales``, ``beta_min``, ``beta_max``) and
    ``config.data`` (``centered``, ``num_channels``, ``image_size``). A nested dict may also be
    flat (the model fields at top level). Only the DDPM++ form is implemented: ``name='ncsnpp'``,
    ``normalization='GroupNorm'``, ``fir=False``, ``progressive='none'``,
    ``progressive_input='none'``, ``scale_by_sigma=False``, ``conditional=True``, ``conv_size=3``,
    ``attention_type='ddpm'``; the VP SDE (``training.sde='vpsde'`` when given).

    Raises:
      ValueError: a field outside that family, named with its value and what is supported
        (e.g. NCSN++'s FIR resampling of the VE models).
    """
    model = _section(config, "model")
    data = _section(config, "data")
    if not model and isinstance(config, Mapping):  # a flat dict of model fields
        model, data = config, config
    if not model:
        raise ValueError("score_sde config: expected a config with .model (and .data), or a "
                         "dict of its model fields")
    bad = []
    for key, want in _REQUIRED.items():
        got = _field(model, key, want)
        got = got.lower() if isinstance(got, str) else got
        if got != want:
            bad.append(f"model.{key}={got!r} (supported: {want!r})")
    sde = _field(_section(config, "training"), "sde", "vpsde")
    if str(sde).lower() != "vpsde":
        bad.append(f"training.sde={sde!r} (supported: 'vpsde')")
    if bad:
        raise ValueError("score_sde config: only the DDPM++ (VP) form of NCSN++ is "
                         "implemented; unsupported: " + ", ".join(bad))
    out = {}
    for key in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                "resamp_with_conv", "skip_rescale", "resblock_type", "embedding_type",
                "fourier_scale", "nonlinearity", "num_scales", "beta_min", "beta_max"):
        v = _field(model, key)
        if v is not None:
            out[key] = v
    for key in ("centered", "num_channels", "image_size"):
        v = _field(data, key)
        if v is not None:
            out[key] = v
    for key, typ in (("nf", int), ("num_res_blocks", int), ("dropout", float),
                     ("fourier_scale", float), ("num_scales", int), ("beta_min", float),
                     ("beta_max", float), ("num_channels", int), ("image_size", int),
                     ("resamp_with_conv", bool), ("skip_rescale", bool), ("centered", bool)):
        if key in out:
            out[key] = typ(out[key])
    for key in ("ch_mult", "attn_resolutions"):
        if key in out:
            out[key] = tuple(int(v) for v in out[key])
    return out


# --------------------------------------------------------------------------- weight import

# within one block, the PyTorch registration order of its submodules (= ``parameters()`` order)
_SUB_ORDER = ("GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1", "Conv_2", "NIN_0",
              "NIN_1", "NIN_2", "NIN_3")
_EMA_PARAM_KINDS = ("dense", "conv", "norm")  # top-level modules that hold weight + bias


def _expected_variables(module: NCSNpp):
    """The variables' shapes (``jax.eval_shape`` of ``init``, cached per configuration: the
    trace of the full model takes seconds). Treat the result as read-only."""
    return _expected_for(tuple((f, getattr(module, f)) for f in _FIELDS if f != "fast_vjp"))


@functools.lru_cache(maxsize=16)
def _expected_for(fields: tuple):
    module = NCSNpp(**dict(fields))
    x = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, module.num_channels),
                             jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(module.init, jr.key(0), x, labels)


def _module_keys(module: NCSNpp):
    index = {name: i for i, (name, _) in enumerate(module.layout())}

    def keys(path: tuple[str, ...]) -> list[str]:
        prefix = f"all_modules.{index[path[0]]}"
        return [prefix] if len(path) == 1 else [prefix + "." + ".".join(path[1:])]

    return keys


def _trainable_torch_names(module: NCSNpp, expected) -> list[str]:
    """The PyTorch names of the trainable parameters in ``model.parameters()`` order: the order
    of the EMA's ``shadow_params`` (the Fourier features' ``W`` is not trained)."""
    params = expected["params"]
    names = []
    for i, (name, kind) in enumerate(module.layout()):
        prefix = f"all_modules.{i}"
        if kind == "fourier":
            continue
        if kind in _EMA_PARAM_KINDS:
            names += [f"{prefix}.weight", f"{prefix}.bias"]
            continue
        for sub in sorted(params[name], key=_SUB_ORDER.index):
            leaves = ("W", "b") if "W" in params[name][sub] else ("weight", "bias")
            names += [f"{prefix}.{sub}.{leaf}" for leaf in leaves]
    return names


def _describe(module: NCSNpp) -> str:
    return (f"NCSNpp(nf={module.nf}, ch_mult={tuple(module.ch_mult)}, "
            f"num_res_blocks={module.num_res_blocks}, attn_resolutions="
            f"{tuple(module.attn_resolutions)}, resblock_type={module.resblock_type!r}, "
            f"embedding_type={module.embedding_type!r}, image_size={module.image_size})")


def _module_indices(keys) -> set[int]:
    out = set()
    for k in keys:
        parts = k.split(".")
        if len(parts) > 1 and parts[0] == "all_modules" and parts[1].isdigit():
            out.add(int(parts[1]))
    return out


def _unwrap(checkpoint: Mapping[str, Any], module: NCSNpp, expected, use_ema: bool):
    """A flat PyTorch state dict from a raw one or from score_sde's / DiffPure's training
    checkpoint ``{'model', 'ema', 'optimizer', 'step'}`` (EMA weights when ``use_ema``)."""
    model_sd = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(model_sd, Mapping):
        if use_ema and isinstance(checkpoint, Mapping) and "ema" in checkpoint:
            raise ValueError("checkpoint: has 'ema' but no 'model' state dict; expected "
                             "score_sde's {'model', 'ema', 'optimizer', 'step'}")
        return _strip_module(checkpoint)
    model_sd = _strip_module(model_sd)
    if not use_ema:
        return model_sd
    ema = checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if shadow is None:
        raise ValueError("checkpoint: expected an 'ema' entry with 'shadow_params' (score_sde's "
                         "ExponentialMovingAverage.state_dict()); pass use_ema=False to import "
                         "the raw 'model' weights")
    names = _trainable_torch_names(module, expected)
    if len(shadow) != len(names):
        found = len(_module_indices(model_sd))
        raise ValueError(
            f"checkpoint: its EMA holds {len(shadow)} tensors but {_describe(module)} has "
            f"{len(names)} trainable parameters: a checkpoint of another architecture than "
            f"the configuration asks for ('model' has {found} modules, the configuration "
            f"{len(module.layout())})")
    sd = {k: v for k, v in model_sd.items() if k not in set(names)}  # buffers, fixed params
    sd.update(zip(names, shadow, strict=True))
    return sd


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def ncsnpp_from_state_dict(checkpoint: StateDict, config: str | Mapping[str, Any] | NCSNpp =
                           "cifar10_ddpmpp_deep_continuous", *, use_ema: bool = True
                           ) -> dict[str, Any]:
    """Import score_sde / DiffPure NCSN++ (DDPM++) weights: ``{'params': ...}`` for the module.

    Args:
      checkpoint: a PyTorch state dict (``all_modules.{i}...`` names, with or without
        ``nn.DataParallel``'s ``module.`` prefix), or score_sde's training checkpoint
        ``{'model': state dict, 'ema': {'shadow_params': [...]}, 'optimizer', 'step'}`` as
        DiffPure's ``checkpoint_8.pth`` holds it. Tensors or numpy arrays.
      config: the architecture (as :func:`ncsnpp_from_config`); the default is DiffPure's
        CIFAR-10 model.
      use_ema: from a training checkpoint, the EMA weights (what score_sde samples with and
        DiffPure purifies with) rather than the raw ``'model'`` weights.

    Returns:
      ``{'params': ...}`` of float32 numpy arrays (``sigmas``, a buffer, is not used).

    Raises:
      ValueError: the weights are of another architecture than ``config`` (the module counts,
        then every missing key, unexpected key and shape mismatch listed), or the checkpoint is
        not a state dict of this family.
    """
    module = ncsnpp_from_config(config) if not isinstance(config, NCSNpp) else config
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint: expected a state dict (mapping of names to tensors) or "
                        f"score_sde's training checkpoint dict, got {type(checkpoint).__name__}")
    expected = _expected_variables(module)
    sd = _unwrap(checkpoint, module, expected, use_ema)
    found = _module_indices(sd)
    if not found:
        sample = ", ".join(sorted(sd)[:5])
        raise ValueError(f"state dict: not a score_sde NCSN++/DDPM++ model (expected keys "
                         f"'all_modules.<i>....', found e.g. {sample or 'no keys'}); the "
                         f"configuration asks for {_describe(module)}")
    n_expected = len(module.layout())
    head = ""
    if len(found) != n_expected:
        head = (f"a checkpoint of another architecture than the configuration asks for: "
                f"{_describe(module)} has {n_expected} modules, the state dict "
                f"{len(found)}. ")
    try:
        return fill_from_state_dict(sd, expected, _module_keys(module),
                                    what=f"score_sde {_describe(module)}",
                                    extra_ignored=lambda k: k == "sigmas")
    except ValueError as e:
        raise ValueError(head + str(e)) from None


def read_torch_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """A score_sde / DiffPure checkpoint file as stored (``torch.load(weights_only=True)``), or
    a flat ``.npz`` / ``.safetensors`` state dict.

    Raises:
      FileNotFoundError: no such file (the message names it).
    """
    import pathlib

    from jaxrob.models._torch_import import load_state_dict_file

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such score_sde checkpoint (DiffPure's CIFAR-10 model "
                                f"is pretrained/score_sde/checkpoint_8.pth)")
    if p.suffix.lower() not in (".th", ".pt", ".pth", ".bin"):
        return load_state_dict_file(p)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{p}: reading a PyTorch checkpoint needs torch") from e
    return torch.load(p, map_location="cpu", weights_only=True)


def vp_schedule(module: NCSNpp):
    """The discrete chain of the model's VP SDE: ``beta_n = beta(n / (N-1)) / N``, linear from
    ``beta_min / N`` to ``beta_max / N`` (DiffPure's ``discrete_betas``)."""
    from jaxrob.diffusion import linear_schedule

    n = int(module.num_scales)
    return linear_schedule(n, beta_start=module.beta_min / n, beta_end=module.beta_max / n)


def load_score_sde(path: str | os.PathLike,
                   config: str | Mapping[str, Any] | NCSNpp = "cifar10_ddpmpp_deep_continuous",
                   *, use_ema: bool = True, fast_vjp: bool = False):
    """One call on the PyTorch file: a score_sde DDPM++ checkpoint as a ready
    :class:`jaxrob.models.DiffusionModel` (``model(x_t, t * 999) -> eps``, with the VP chain).

    ``jaxrob.purify.diffpure(model, t_star=0.1, num_steps=100, sampler="sde")`` is then
    DiffPure's CIFAR-10 purifier (score ``-model(x, t * 999) / s(t)``).

    Args:
      path: ``checkpoint_8.pth`` (score_sde training checkpoint, EMA used by default), a raw
        PyTorch state dict file, or an ``.npz`` of one.
      config: the architecture (default: DiffPure's CIFAR-10 model).
      use_ema: see :func:`ncsnpp_from_state_dict`.
      fast_vjp: build the reverse-mode twin (attacks on CPU).

    Raises:
      FileNotFoundError: no such file. ValueError: see :func:`ncsnpp_from_state_dict`.
    """
    from jaxrob.models._loaded import DiffusionModel

    module = ncsnpp_from_config(config, fast_vjp=fast_vjp or None)
    variables = ncsnpp_from_state_dict(read_torch_checkpoint(path), module, use_ema=use_ema)
    variables = jax.tree.map(jnp.asarray, variables)
    return DiffusionModel(module, variables, vp_schedule(module))


def ncsnpp_export_metadata(module: NCSNpp) -> dict[str, Any]:
    """The metadata of a ``jaxrob.checkpoint.save_params`` export of this model, so that
    ``jaxrob.models.load(export)`` rebuilds it (``kind="ddpm"``, ``model.name="ncsnpp"``)."""
    cfg = {f: getattr(module, f) for f in _FIELDS if f != "fast_vjp"}
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    n = int(module.num_scales)
    return {"kind": "ddpm", "model": {"name": "ncsnpp", "config": cfg},
            "diffusion": {"schedule": "linear", "num_steps": n,
                          "beta_start": module.beta_min / n, "beta_end": module.beta_max / n}}


def ncsnpp_from_metadata(model: Mapping[str, Any]) -> NCSNpp:
    """The module described by an export's ``{"name": "ncsnpp", "config": ...}``."""
    return ncsnpp_from_config(model.get("config", "cifar10_ddpmpp_deep_continuous"),
                              **dict(model.get("overrides") or {}))


def count_params(variables) -> int:
    """Number of scalars in a variables tree."""
    return int(sum(np.size(x) for x in jax.tree.leaves(variables)))




def convert_score_sde(path: str | os.PathLike, export_dir: str | os.PathLike,
                      config: str | Mapping[str, Any] | NCSNpp =
                      "cifar10_ddpmpp_deep_continuous", *, use_ema: bool = True,
                      overwrite: bool = False):
    """Convert a score_sde PyTorch checkpoint to a jaxrob export that
    ``jaxrob.models.load(export_dir)`` returns as a :class:`jaxrob.models.DiffusionModel`
    (no torch needed afterwards).

    Returns:
      The export directory.
    """
    from jaxrob.checkpoint import save_params

    model = load_score_sde(path, config, use_ema=use_ema)
    meta = ncsnpp_export_metadata(model.module)
    meta.update(source={"path": str(path), "use_ema": bool(use_ema)},
                num_params=count_params(model.variables))
    return save_params(export_dir, model.variables, meta, overwrite=overwrite)
