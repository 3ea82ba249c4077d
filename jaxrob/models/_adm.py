"""guided-diffusion's ADM UNet (Dhariwal & Nichol 2021) in Flax linen (NHWC), and its import.

The network of ``openai/guided-diffusion`` ``UNetModel`` (the unconditional 256x256 ImageNet
model that DiffPure purifies ImageNet with and that PDM-Pure starts from), rebuilt with the
same numerics and imported from the published PyTorch state dicts under their own key names
(``time_embed.N``, ``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``, ``out.N``):

* step embedding: ``[cos(s f_i), sin(s f_i)]``, ``f_i = 10000^(-i / h)`` (``h = ch // 2``),
  then Linear(4ch) -> SiLU -> Linear(4ch);
* ResBlock: GN -> SiLU -> [resample] -> conv3; ``Linear(SiLU(emb))`` either added
  (``use_scale_shift_norm=False``) or as FiLM ``GN(h) * (1 + scale) + shift`` (True); SiLU ->
  dropout -> conv3; 1x1 skip when the width changes. With ``resblock_updown`` the resolution
  changes inside ResBlocks (2x2 average pool / nearest x2 of both branches) instead of in
  stride-2 / upsample convolutions;
* attention: GN, one 1x1 ``qkv`` projection, heads of ``num_head_channels`` (or ``num_heads``
  heads), ``softmax((q / d^1/4) . (k / d^1/4))``, 1x1 ``proj_out``, residual; the channel order
  of ``qkv`` is the "legacy" per-head ``[q_h, k_h, v_h]`` unless ``use_new_attention_order``;
* GroupNorm: 32 groups, epsilon 1e-5, in float32 (``GroupNorm32``).

**Learned sigma.** With ``learn_sigma=True`` the network predicts ``2 C`` channels: ``eps`` and
``v`` in [-1, 1], the interpolation of the reverse-step log-variance between the posterior
variance and beta: ``log var = (v + 1) / 2 * log(beta_n) + (1 - v) / 2 * log(beta~_n)``
(:func:`adm_learned_log_variance`). ``output="eps"`` (default) returns only ``eps``, so a
:class:`jaxrob.models.DiffusionModel` around it is an ``eps_fn`` and the DDPM / DDIM / SDE / ODE
purifiers of :mod:`jaxrob.purify` run on it unchanged, with their own (fixed) variances: DiffPure's
VP-SDE purifier discards ``v`` the same way. ``output="eps_and_v"`` returns all ``2 C``
channels for a sampler that uses the learned variance.

Differences from the reference that change numbers: DiffPure runs the torso in float16
(``use_fp16``); here everything is float32. The published weights are stored in float32.

References:
  Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021.
  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob.diffusion as jd
from jaxrob._checks import check_images
from jaxrob._types import Array, Latents, Steps
from jaxrob.models._fast_vjp_ops import UpsampleConv, upsample_nearest2x, upsample_nearest2x_plain
from jaxrob.models._torch_import import (
    StateDict,
    fill_from_state_dict,
    load_state_dict_file,
    strip_prefix,
)
from jaxrob.models._unet import _conv3, _conv_impl, _group_norm, timestep_embedding

__all__ = [
    "ADM_CONFIGS",
    "ADMUNet",
    "adm_config_from_guided_diffusion",
    "adm_from_config",
    "adm_from_guided_diffusion_state_dict",
    "adm_from_metadata",
    "adm_learned_log_variance",
    "adm_num_params",
    "convert_guided_diffusion_checkpoint",
    "load_guided_diffusion",
]

_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_OUTPUTS = ("eps", "eps_and_v")


class _Conv1x1(nn.Module):
    """guided-diffusion's ``conv_nd(1, C, F, 1)`` on (B, T, C) tokens: ``kernel`` (1, C, F) (the
    Flax layout of a 1-D convolution, so its PyTorch weight (F, C, 1) imports as one)."""

    features: int

    @nn.compact
    def __call__(self, x_BTC):
        kernel = self.param("kernel", _default_init, (1, x_BTC.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.einsum("btc,cf->btf", x_BTC, kernel[0]) + bias[None, None, :]


def _avg_pool2(x_BHWC):
    return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


def _nearest2(x_BHWC, fast_vjp):
    return (upsample_nearest2x if fast_vjp else upsample_nearest2x_plain)(x_BHWC)


class ADMResBlock(nn.Module):
    """guided-diffusion ``ResBlock`` (``updown``: None, ``"up"`` or ``"down"``)."""

    out_ch: int
    dropout: float
    use_scale_shift_norm: bool
    updown: str | None = None
    num_groups: int = 32
    norm_eps: float = 1e-5
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, emb_BD, train: bool):
        gn = lambda name: _group_norm(self.num_groups, self.norm_eps, self.fast_vjp, name)
        h = nn.silu(gn("in_norm")(x_BHWC))
        if self.updown == "down":
            h, x_BHWC = _avg_pool2(h), _avg_pool2(x_BHWC)
        elif self.updown == "up":
            h, x_BHWC = _nearest2(h, self.fast_vjp), _nearest2(x_BHWC, self.fast_vjp)
        h = _conv3(self.out_ch, "in_conv", fast_vjp=self.fast_vjp)(h)
        width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        e_BF = nn.Dense(width, kernel_init=_default_init, name="emb")(nn.silu(emb_BD))
        e_BF = e_BF[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = e_BF[..., : self.out_ch], e_BF[..., self.out_ch :]
            h = gn("out_norm")(h) * (1.0 + scale) + shift
        else:
            h = gn("out_norm")(h + e_BF)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = _conv3(self.out_ch, "out_conv", fast_vjp=self.fast_vjp)(h)
        if x_BHWC.shape[-1] != self.out_ch:
            x_BHWC = nn.Conv(self.out_ch, (1, 1), kernel_init=_default_init, name="skip",
                             conv_general_dilated=_conv_impl(self.fast_vjp))(x_BHWC)
        return x_BHWC + h


class ADMAttention(nn.Module):
    """guided-diffusion ``AttentionBlock``: multi-head spatial self-attention, residual."""

    num_heads: int = 1
    num_head_channels: int | None = None
    new_order: bool = False
    num_groups: int = 32
    norm_eps: float = 1e-5
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        if self.num_head_channels is not None:
            if C % self.num_head_channels:
                raise ValueError(f"ADM attention: channels {C} not divisible by "
                                 f"num_head_channels {self.num_head_channels}")
            n = C // self.num_head_channels
        else:
            n = self.num_heads
            if C % n:
                raise ValueError(f"ADM attention: channels {C} not divisible by num_heads {n}")
        d = C // n
        h = _group_norm(self.num_groups, self.norm_eps, self.fast_vjp, "norm")(x_BHWC)
        qkv_BTF = _Conv1x1(3 * C, name="qkv")(h.reshape(B, H * W, C))
        if self.new_order:  # channels [q | k | v], each head-major
            qkv = qkv_BTF.reshape(B, H * W, 3, n, d)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:  # legacy: per head [q_h | k_h | v_h]
            qkv = qkv_BTF.reshape(B, H * W, n, 3, d)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        s = d**-0.25  # both factors scaled, as the reference does
        w_BNQK = jax.nn.softmax(jnp.einsum("bqnd,bknd->bnqk", q * s, k * s), axis=-1)
        o_BTC = jnp.einsum("bnqk,bknd->bqnd", w_BNQK, v).reshape(B, H * W, C)
        o_BTC = _Conv1x1(C, name="proj_out")(o_BTC)
        return x_BHWC + o_BTC.reshape(B, H, W, C)


class _Downsample(nn.Module):
    """guided-diffusion ``Downsample``: stride-2 conv3 (padding 1) ``op``, or a 2x2 average."""

    with_conv: bool
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        if not self.with_conv:
            return _avg_pool2(x_BHWC)
        return nn.Conv(x_BHWC.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                       kernel_init=_default_init, name="op",
                       conv_general_dilated=_conv_impl(self.fast_vjp))(x_BHWC)


class _Upsample(nn.Module):
    """guided-diffusion ``Upsample``: nearest x2, then conv3 ``conv`` when ``with_conv``."""

    with_conv: bool
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        if self.with_conv and self.fast_vjp:
            return UpsampleConv(x_BHWC.shape[-1], _default_init, name="conv")(x_BHWC)
        up = _nearest2(x_BHWC, self.fast_vjp)
        if self.with_conv:
            up = _conv3(x_BHWC.shape[-1], "conv", fast_vjp=self.fast_vjp)(up)
        return up


class ADMUNet(nn.Module):
    """guided-diffusion's unconditional ADM UNet, NHWC: ``apply(variables, x_t, step)``.

    Build it from a named configuration with :func:`adm_from_config` (``"imagenet256_uncond"``:
    DiffPure's ImageNet model, PDM-Pure's base) or from guided-diffusion arguments with
    :func:`adm_config_from_guided_diffusion`; import weights with
    :func:`adm_from_guided_diffusion_state_dict` or :func:`load_guided_diffusion`.

    Attributes:
      image_size: input height = width (checked; attention placement depends on it).
      in_ch: input channels.
      ch: ``model_channels``, the base width (and the step-embedding width).
      ch_mult: width multiplier per resolution level (``int(mult * ch)`` channels).
      num_res_blocks: ResBlocks per encoder level (the decoder has one more).
      attn_resolutions: spatial sizes at which ResBlocks are followed by attention
        (guided-diffusion's ``attention_resolutions="32,16,8"`` argument; its ``UNetModel`` takes
        the downsampling rates ``image_size // size`` instead).
      num_heads: attention heads when ``num_head_channels`` is None.
      num_head_channels: channels per head (None = guided-diffusion's -1: ``num_heads`` heads).
      num_heads_upsample: heads of the decoder's attention when ``num_head_channels`` is None
        (None = ``num_heads``; deprecated upstream).
      learn_sigma: the network predicts ``eps`` and the variance interpolation ``v``
        (``2 * in_ch`` output channels).
      output: ``"eps"`` (the first ``in_ch`` channels: an eps-model) or ``"eps_and_v"`` (all of
        them; needs ``learn_sigma``).
      use_scale_shift_norm: FiLM conditioning on the step embedding.
      resblock_updown: resample inside ResBlocks instead of with ``conv_resample`` layers.
      conv_resample: learned resampling convolutions (when not ``resblock_updown``).
      use_new_attention_order: split q/k/v before heads (``QKVAttention``) instead of the
        legacy per-head order (``QKVAttentionLegacy``).
      dropout: ResBlock dropout (train mode only).
      num_groups: GroupNorm groups (guided-diffusion: 32).
      norm_eps: GroupNorm epsilon (PyTorch's default 1e-5).
      fast_vjp: the reverse-mode twin (custom-VJP convolutions, GroupNorm and upsampling; same
        parameters and values, no forward mode), as :class:`jaxrob.models.UNet`.
    """

    image_size: int = 256
    in_ch: int = 3
    ch: int = 256
    ch_mult: Sequence[float] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int | None = 64
    num_heads_upsample: int | None = None
    learn_sigma: bool = True
    output: str = "eps"
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-5
    fast_vjp: bool = False

    @property
    def out_ch(self) -> int:
        """Channels the last convolution predicts (``2 * in_ch`` with ``learn_sigma``)."""
        return 2 * self.in_ch if self.learn_sigma else self.in_ch

    def _check_inputs(self, x_t, step):
        if self.output not in _OUTPUTS:
            raise ValueError(f"output: expected one of {list(_OUTPUTS)}, got {self.output!r}")
        if self.output == "eps_and_v" and not self.learn_sigma:
            raise ValueError("output='eps_and_v' needs learn_sigma=True (the network predicts "
                             "no variance otherwise)")
        check_images(x_t, "x_t", channels=self.in_ch, value_range=None)
        B, H, W, _ = x_t.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"x_t: this ADM is configured for {self.image_size}x"
                             f"{self.image_size} inputs, got shape {tuple(x_t.shape)}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if H % factor:
            raise ValueError(f"image_size {H} is not divisible by 2**(len(ch_mult)-1) = {factor}")
        step = jnp.asarray(step)
        if step.dtype == jnp.bool_ or not (jnp.issubdtype(step.dtype, jnp.integer)
                                           or jnp.issubdtype(step.dtype, jnp.floating)):
            raise ValueError(f"step: expected an int or float array of step labels, got dtype "
                             f"{step.dtype}")
        if step.ndim == 0:
            step = jnp.broadcast_to(step, (B,))
        if step.shape != (B,):
            raise ValueError(f"step: expected shape ({B},) (one step label per example) or a "
                             f"scalar, got shape {tuple(step.shape)}")
        return step

    @nn.compact
    def __call__(self, x_t: Latents, step: Steps, train: bool = False) -> Array:
        """Predict the noise in ``x_t`` (and the variance interpolation with ``eps_and_v``).

        Args:
          x_t: (B, H, W, C) float32 diffusion-space tensor (about [-1, 1]).
          step: (B,) int or float step labels 0 .. 999 (fractional allowed), or a scalar.
          train: enable dropout (needs the ``'dropout'`` rng).

        Returns:
          (B, H, W, C) eps, or (B, H, W, 2C) ``[eps, v]`` with ``output="eps_and_v"``.
        """
        step_B = self._check_inputs(x_t, step)
        ch = lambda mult: int(mult * self.ch)
        common = dict(num_groups=self.num_groups, norm_eps=self.norm_eps, fast_vjp=self.fast_vjp)
        res = lambda c, name, updown=None: ADMResBlock(
            c, self.dropout, self.use_scale_shift_norm, updown, name=name, **common)

        def attn(name, heads):
            return ADMAttention(heads, self.num_head_channels, self.use_new_attention_order,
                                name=name, **common)

        heads_up = self.num_heads if self.num_heads_upsample is None else self.num_heads_upsample

        emb = timestep_embedding(step_B, self.ch, flip_sin_to_cos=True, freq_shift=0.0)
        emb = nn.Dense(4 * self.ch, kernel_init=_default_init, name="time_embed_0")(emb)
        emb = nn.Dense(4 * self.ch, kernel_init=_default_init, name="time_embed_2")(nn.silu(emb))

        n_levels = len(self.ch_mult)
        h = nn.Conv(ch(self.ch_mult[0]), (3, 3), padding=((1, 1), (1, 1)),
                    kernel_init=_default_init, name="input_blocks_0_0",
                    conv_general_dilated=_conv_impl(self.fast_vjp))(x_t)
        hs, k = [h], 1
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = res(ch(mult), f"input_blocks_{k}_0")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"input_blocks_{k}_1", self.num_heads)(h)
                hs.append(h)
                k += 1
            if level != n_levels - 1:
                name = f"input_blocks_{k}_0"
                if self.resblock_updown:
                    h = res(h.shape[-1], name, "down")(h, emb, train)
                else:
                    h = _Downsample(self.conv_resample, self.fast_vjp, name=name)(h)
                hs.append(h)
                k += 1

        h = res(h.shape[-1], "middle_block_0")(h, emb, train)
        h = attn("middle_block_1", self.num_heads)(h)
        h = res(h.shape[-1], "middle_block_2")(h, emb, train)

        k = 0
        for level in reversed(range(n_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res(ch(self.ch_mult[level]), f"output_blocks_{k}_0")(h, emb, train)
                m = 1
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"output_blocks_{k}_1", heads_up)(h)
                    m = 2
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{k}_{m}"
                    if self.resblock_updown:
                        h = res(h.shape[-1], name, "up")(h, emb, train)
                    else:
                        h = _Upsample(self.conv_resample, self.fast_vjp, name=name)(h)
                k += 1
        assert not hs

        h = nn.silu(_group_norm(self.num_groups, self.norm_eps, self.fast_vjp, "out_0")(h))
        out = _conv3(self.out_ch, "out_2", fast_vjp=self.fast_vjp)(h)
        return out[..., : self.in_ch] if self.output == "eps" else out


# Named configurations (ADMUNet keyword arguments).
ADM_CONFIGS: dict[str, dict[str, Any]] = {
    # guided-diffusion 256x256_diffusion_uncond.pt (DiffPure configs/imagenet.yml, PDM-Pure's
    # base): 552,814,086 parameters.
    "imagenet256_uncond": dict(
        image_size=256, in_ch=3, ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attn_resolutions=(32, 16, 8), num_heads=4, num_head_channels=64, learn_sigma=True,
        use_scale_shift_norm=True, resblock_updown=True, dropout=0.0,
    ),
}

# guided-diffusion's default channel_mult per image size (script_util.create_model).
_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                 64: (1, 2, 3, 4)}


def adm_from_config(config: str | Mapping[str, Any], **overrides: Any) -> ADMUNet:
    """Build an :class:`ADMUNet` from a name in ``ADM_CONFIGS`` or a dict of its arguments.

    Args:
      config: ``"imagenet256_uncond"`` or a mapping of ADMUNet attributes.
      **overrides: attributes replacing the configuration's (e.g. ``output="eps_and_v"``).

    Returns:
      The (unbound) Flax module.
    """
    if isinstance(config, str):
        if config not in ADM_CONFIGS:
            raise ValueError(f"config: expected one of {sorted(ADM_CONFIGS)} or a dict of "
                             f"ADMUNet arguments, got {config!r}")
        config = ADM_CONFIGS[config]
    kwargs = {**dict(config), **overrides}
    fields = set(ADMUNet.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"config: unknown ADMUNet argument(s) {unknown}; expected a subset of "
                         f"{sorted(fields)}")
    for key in ("ch_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if kwargs.get("output", "eps") not in _OUTPUTS:
        raise ValueError(f"output: expected one of {list(_OUTPUTS)}, got {kwargs['output']!r}")
    return ADMUNet(**kwargs)


def _ints(value) -> tuple:
    if isinstance(value, str):
        return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
    return tuple(value)


def adm_config_from_guided_diffusion(args: Mapping[str, Any]) -> dict[str, Any]:
    """Translate guided-diffusion model arguments into :class:`ADMUNet` arguments.

    Accepts either the script arguments of ``script_util.create_model`` (``num_channels``,
    ``learn_sigma``, ``attention_resolutions="32,16,8"`` as spatial sizes, ``channel_mult=""``
    for the default of the image size, ``class_cond``; DiffPure's ``configs/imagenet.yml``
    ``model`` section) or the keyword arguments of ``UNetModel`` itself (``model_channels``,
    ``out_channels``, ``attention_resolutions`` as downsampling rates, ``num_classes``).
    Settings that do not change the function (``use_fp16``, ``use_checkpoint``, the diffusion's
    ``timestep_respacing`` ...) are ignored; class-conditional and 1-D / 3-D models raise.

    Returns:
      A dict for :func:`adm_from_config`.
    """
    a = dict(args)
    unet_kwargs = "model_channels" in a
    if a.get("class_cond") or a.get("num_classes") is not None:
        raise ValueError("guided-diffusion config: class-conditional models (class_cond / "
                         "num_classes) are not supported; jaxrob's ADMUNet is unconditional")
    if int(a.get("dims", 2)) != 2:
        raise ValueError(f"guided-diffusion config: dims={a['dims']} is not supported (2-D only)")
    if "image_size" not in a:
        raise ValueError("guided-diffusion config: image_size is required")
    size = int(a["image_size"])
    mult = a.get("channel_mult", "")
    if mult in ("", None, ()):
        if size not in _DEFAULT_MULT:
            raise ValueError(f"guided-diffusion config: no default channel_mult for image_size "
                             f"{size}; give channel_mult")
        mult = _DEFAULT_MULT[size]
    mult = _ints(mult)
    attn = _ints(a.get("attention_resolutions", "16"))
    if unet_kwargs:
        attn = tuple(size // int(ds) for ds in attn)  # UNetModel takes downsampling rates
        in_ch = int(a.get("in_channels", 3))
        out_ch = int(a["out_channels"])
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(f"guided-diffusion config: out_channels={out_ch}; expected "
                             f"{in_ch} (eps) or {2 * in_ch} (eps and learned sigma)")
        learn_sigma, ch = out_ch == 2 * in_ch, int(a["model_channels"])
    else:
        in_ch, learn_sigma, ch = 3, bool(a.get("learn_sigma", False)), int(a["num_channels"])
    head_ch = int(a.get("num_head_channels", -1))
    heads_up = int(a.get("num_heads_upsample", -1))
    return dict(
        image_size=size,
        in_ch=in_ch,
        ch=ch,
        ch_mult=mult,
        num_res_blocks=int(a["num_res_blocks"]),
        attn_resolutions=attn,
        num_heads=int(a.get("num_heads", 1)),
        num_head_channels=None if head_ch == -1 else head_ch,
        num_heads_upsample=None if heads_up == -1 else heads_up,
        learn_sigma=learn_sigma,
        use_scale_shift_norm=bool(a.get("use_scale_shift_norm", False)),
        resblock_updown=bool(a.get("resblock_updown", False)),
        conv_resample=bool(a.get("conv_resample", True)),
        use_new_attention_order=bool(a.get("use_new_attention_order", False)),
        dropout=float(a.get("dropout", 0.0)),
    )


# Flax submodule name -> guided-diffusion module suffix, inside a block.
_INNER = {
    # ResBlock
    "in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb": "emb_layers.1",
    "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection",
    # AttentionBlock
    "norm": "norm", "qkv": "qkv", "proj_out": "proj_out",
    # Downsample / Upsample
    "op": "op", "conv": "conv",
}
_TOP = re.compile(
    r"^(input_blocks|output_blocks)_(\d+)_(\d+)$|^(middle_block|time_embed|out)_(\d+)$")


def _module_keys(path: tuple[str, ...]) -> list[str]:
    m = _TOP.match(path[0])
    if m is None:
        raise ValueError(f"unknown ADM module {path[0]!r}")
    prefix = f"{m[1]}.{m[2]}.{m[3]}" if m[1] else f"{m[4]}.{m[5]}"
    return [prefix] if len(path) == 1 else [prefix + "." + ".".join(_INNER[p] for p in path[1:])]


def _architecture(sd: Mapping[str, Any]) -> dict[str, Any]:
    """What a guided-diffusion state dict says about its network (for the refusal message)."""
    blocks = lambda part: len({k.split(".")[1] for k in sd if k.startswith(part + ".")})
    out = {
        "model_channels": int(sd["time_embed.0.weight"].shape[1])
        if "time_embed.0.weight" in sd else None,
        "out_channels": int(sd["out.2.weight"].shape[0]) if "out.2.weight" in sd else None,
        "in_channels": int(sd["input_blocks.0.0.weight"].shape[1])
        if "input_blocks.0.0.weight" in sd else None,
        "input_blocks": blocks("input_blocks"),
        "output_blocks": blocks("output_blocks"),
        "class_conditional": "label_emb.weight" in sd,
    }
    return out


def _expected_shapes(model: ADMUNet):
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_ch), jnp.float32)
    step = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.clone(output="eps_and_v" if model.learn_sigma else "eps").init,
                          jr.key(0), x, step)


def adm_num_params(config: str | Mapping[str, Any] | ADMUNet) -> int:
    """Number of parameters of an ADM configuration (from shapes only; nothing is allocated)."""
    model = config if isinstance(config, ADMUNet) else adm_from_config(config)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_expected_shapes(model))))


def adm_from_guided_diffusion_state_dict(
    state_dict: StateDict, config: str | Mapping[str, Any] | ADMUNet = "imagenet256_uncond"
) -> dict[str, Any]:
    """Import a guided-diffusion ``UNetModel`` state dict (e.g. ``256x256_diffusion_uncond.pt``).

    The head width, attention order and resolutions are not stored in a state dict: they come
    from ``config``. The state dict is first compared with the configuration's architecture
    (base width, input / output channels, number of blocks, class conditioning), and a
    checkpoint of another architecture is refused naming both; then every key and shape is
    checked (``nn.DataParallel``'s ``module.`` prefixes are stripped).

    Args:
      state_dict: guided-diffusion parameter names -> numpy arrays or torch tensors.
      config: an ``ADM_CONFIGS`` name, a dict of ADMUNet arguments, or an :class:`ADMUNet`.

    Returns:
      ``{'params': ...}`` for ``ADMUNet.apply`` (float32 numpy leaves).

    Raises:
      ValueError: another architecture; or keys missing / unused (all listed) or shapes that
        differ (each with expected vs got).
    """
    model = config if isinstance(config, ADMUNet) else adm_from_config(config)
    sd = strip_prefix(state_dict)
    expected = _expected_shapes(model)
    params = expected["params"]
    blocks = lambda part: len({k.split("_")[2] for k in params if k.startswith(part + "_")})
    want = {
        "model_channels": model.ch,
        "out_channels": model.out_ch,
        "in_channels": model.in_ch,
        "input_blocks": blocks("input_blocks"),
        "output_blocks": blocks("output_blocks"),
        "class_conditional": False,
    }
    if not any(k.startswith(("input_blocks.", "output_blocks.")) for k in sd):
        raise ValueError(
            f"ADM import: not a guided-diffusion UNetModel state dict (no input_blocks.* / "
            f"output_blocks.* keys; found {len(sd)} keys such as {sorted(sd)[:5]})")
    got = _architecture(sd)
    differ = [f"{k}: checkpoint {got[k]}, configuration {want[k]}" for k in want
              if got[k] is not None and got[k] != want[k]]
    if differ:
        raise ValueError(
            "ADM import: the checkpoint is another architecture than the configuration asks for "
            "(" + "; ".join(differ) + "). Build the configuration that matches the checkpoint "
            "(adm_config_from_guided_diffusion of the arguments it was trained with).")
    return fill_from_state_dict(sd, expected, _module_keys,
                                what="ADM UNet (guided-diffusion import)")


def adm_learned_log_variance(v: Array, step: Array, schedule: jd.Schedule) -> Array:
    """The reverse-step log-variance of a learned-sigma ADM (guided-diffusion's LEARNED_RANGE).

    ``log var = f log(beta_n) + (1 - f) log(beta~_n)``, ``f = (v + 1) / 2``, with ``beta~_n``
    the posterior variance (its step-1 value at n = 0, where it is 0, as the reference clips it).

    Args:
      v: (B, H, W, C) the second half of the ``output="eps_and_v"`` prediction.
      step: (B,) integer steps of the schedule the model was trained on.
      schedule: that schedule (the 1000-step linear one for the published models).

    Returns:
      (B, H, W, C) log-variance of ``p(x_{n-1} | x_n)``.
    """
    post = jnp.concatenate([schedule.posterior_variance[1:2], schedule.posterior_variance[1:]])
    col = lambda a: a[step].reshape((-1,) + (1,) * (v.ndim - 1))
    frac = (v + 1.0) / 2.0
    return frac * col(jnp.log(schedule.betas)) + (1.0 - frac) * col(jnp.log(post))


def _diffusion_model(module: ADMUNet, variables):
    from jaxrob.models._loaded import DiffusionModel

    variables = jax.tree.map(jnp.asarray, variables)
    return DiffusionModel(module, variables, jd.linear_schedule(1000))


def load_guided_diffusion(path: str | os.PathLike,
                          config: str | Mapping[str, Any] | ADMUNet = "imagenet256_uncond", *,
                          fast_vjp: bool = False):
    """One call from the published PyTorch file to a ready :class:`jaxrob.models.DiffusionModel`.

    The model is the ADM (``output="eps"`` unless ``config`` says otherwise: the eps half of the
    learned-sigma output, see the module docstring) with guided-diffusion's linear 1000-step
    schedule (beta 1e-4 .. 0.02), so ``jaxrob.purify.diffpure(model, t_star=0.15, ...)`` works
    on it directly. A converted jaxrob export (:func:`convert_guided_diffusion_checkpoint`)
    loads faster with ``jaxrob.models.load``.

    Args:
      path: ``256x256_diffusion_uncond.pt`` (needs torch), or a ``.npz`` / ``.safetensors`` of
        the same state dict.
      config: the architecture (default: DiffPure's ImageNet model).
      fast_vjp: build the reverse-mode twin.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file holds another architecture, or keys / shapes do not match.
    """
    module = config if isinstance(config, ADMUNet) else adm_from_config(config)
    variables = adm_from_guided_diffusion_state_dict(load_state_dict_file(path), module)
    return _diffusion_model(module.clone(fast_vjp=bool(fast_vjp)), variables)


def convert_guided_diffusion_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike,
    config: str | Mapping[str, Any] = "imagenet256_uncond", *, overwrite: bool = False,
) -> pathlib.Path:
    """Convert a guided-diffusion checkpoint into a jaxrob export that ``jaxrob.models.load``
    returns as a :class:`jaxrob.models.DiffusionModel` (kind ``"ddpm"``, model ``"adm"``).

    Args:
      src: the PyTorch file (or ``.npz`` / ``.safetensors``).
      dst: the export directory to write.
      config: an ``ADM_CONFIGS`` name or a dict of ADMUNet arguments (stored in the metadata).
      overwrite: replace an existing export.

    Returns:
      The export directory.
    """
    from jaxrob.checkpoint import save_params

    module = adm_from_config(config)
    variables = adm_from_guided_diffusion_state_dict(load_state_dict_file(src), module)
    cfg = config if isinstance(config, str) else {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}
    metadata = {
        "kind": "ddpm",
        "model": {"name": "adm", "config": cfg},
        "diffusion": {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4,
                      "beta_end": 0.02},
        "source": {"format": "guided-diffusion", "file": pathlib.Path(src).name},
        "num_params": int(sum(x.size for x in jax.tree.leaves(variables))),
    }
    return save_params(dst, variables, metadata, overwrite=overwrite)


def adm_from_metadata(model: Mapping[str, Any]) -> ADMUNet:
    """The ADM described by an export's ``{"name": "adm", "config": <name or dict>,
    "overrides": {...}}`` (``None`` overrides keep the configuration's value)."""
    if model.get("name") != "adm":
        raise ValueError(f"model.name: expected 'adm', got {model.get('name')!r}")
    overrides = {k: v for k, v in dict(model.get("overrides") or {}).items() if v is not None}
    return adm_from_config(model.get("config", "imagenet256_uncond"), **overrides)
