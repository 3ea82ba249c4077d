"""The Ho et al. (2020) DDPM UNet in Flax linen (NHWC), and its import from diffusers.

Layout (Ho et al. 2020, Appendix B; the ``pytorch_diffusion`` / diffusers ``UNet2DModel``
"ddpm-cifar10-32" network):

* sinusoidal step embedding -> Dense(4ch) -> SiLU -> Dense(4ch);
* ResBlock = GN -> SiLU -> conv3 -> (+ Dense(SiLU(temb))) -> GN -> SiLU -> dropout -> conv3,
  plus a 1x1 shortcut when the channel count changes;
* AttnBlock = GN, 1x1 q/k/v, softmax(q k^T / sqrt(d)), 1x1 projection, residual;
* encoder: per level ``num_res_blocks`` ResBlocks (+ attention at ``attn_resolutions``), then a
  stride-2 conv (TF "SAME" padding: one row/column of zeros on the bottom/right);
* middle Res-Attn-Res; decoder: per level ``num_res_blocks + 1`` ResBlocks on the concatenation
  of the running tensor and the matching encoder activation, nearest x2 upsampling + conv3;
* GN -> SiLU -> conv3 to ``out_ch`` channels.

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Float

from jaxrob._checks import check_images
from jaxrob._types import Array, Latents, Steps
from jaxrob.models._conv import conv_general_dilated_fast_vjp
from jaxrob.models._fast_vjp_ops import (
    GroupNorm,
    UpsampleConv,
    upsample_nearest2x,
    upsample_nearest2x_plain,
)
from jaxrob.models._torch_import import StateDict, fill_from_state_dict

__all__ = [
    "UNET_CONFIGS",
    "UNet",
    "timestep_embedding",
    "unet_config_from_diffusers",
    "unet_from_config",
    "unet_from_diffusers_state_dict",
]

# Ho et al. initialise every layer with variance_scaling(1, fan_avg, uniform) ...
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# ... except the last layer of each residual branch and the output conv (scale 1e-10).
_tiny_init = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")


Embedding = Float[Array, "b d"]


def timestep_embedding(
    step: Steps,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> Embedding:
    """Sinusoidal embedding of (possibly fractional) step labels.

    ``emb[b] = [sin(step_b * f_0..f_{h-1}), cos(step_b * f_0..f_{h-1})]`` with
    ``f_i = exp(-log(max_period) * i / (h - freq_shift))`` and ``h = dim // 2``. Ho et al. use
    ``freq_shift=1`` and [sin, cos] order; the operations are ordered as in diffusers'
    ``get_timestep_embedding`` so imported models see bit-identical frequencies.

    Args:
      step: (B,) step labels, int or float.
      dim: embedding width.
      flip_sin_to_cos: put the cos half first.
      freq_shift: the ``downscale_freq_shift`` of diffusers.
      max_period: the longest period.

    Returns:
      (B, dim) float32 embedding (a zero column is appended when ``dim`` is odd).
    """
    half = dim // 2
    exponent_H = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent_H = exponent_H / (half - freq_shift)
    arg_BH = step.astype(jnp.float32)[:, None] * jnp.exp(exponent_H)[None, :]
    parts = [jnp.sin(arg_BH), jnp.cos(arg_BH)]
    if flip_sin_to_cos:
        parts = parts[::-1]
    emb_BD = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb_BD = jnp.pad(emb_BD, ((0, 0), (0, 1)))
    return emb_BD


def _conv_impl(fast_vjp: bool):
    """The ``conv_general_dilated`` of every conv: see :mod:`jaxrob.models._conv`."""
    return conv_general_dilated_fast_vjp if fast_vjp else None


def _group_norm(num_groups: int, eps: float, fast_vjp: bool, name: str) -> nn.Module:
    """``nn.GroupNorm`` (centred variance), or its closed-form-VJP twin (same parameters)."""
    if fast_vjp:
        return GroupNorm(num_groups=num_groups, epsilon=eps, name=name)
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False, name=name)


def _conv3(features: int, name: str, init=_default_init, fast_vjp: bool = False) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, name=name,
                   conv_general_dilated=_conv_impl(fast_vjp))


class ResBlock(nn.Module):
    """Ho et al. residual block conditioned on the step embedding (``temb_BD=None``: no
    conditioning and no ``temb_proj`` layer, diffusers' ``ResnetBlock2D(temb_channels=None)``
    of the autoencoders)."""

    out_ch: int
    num_groups: int
    dropout: float
    eps: float = 1e-6
    zero_init: bool = False
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, temb_BD, train: bool):
        gn = lambda name: _group_norm(self.num_groups, self.eps, self.fast_vjp, name)
        h = _conv3(self.out_ch, "conv1", fast_vjp=self.fast_vjp)(nn.silu(gn("norm1")(x_BHWC)))
        if temb_BD is not None:
            t_BC = nn.Dense(self.out_ch, kernel_init=_default_init, name="temb_proj")(
                nn.silu(temb_BD))
            h = h + t_BC[:, None, None, :]
        h = nn.silu(gn("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv3(self.out_ch, "conv2", _tiny_init if self.zero_init else _default_init,
                   self.fast_vjp)(h)
        if x_BHWC.shape[-1] != self.out_ch:
            x_BHWC = nn.Conv(self.out_ch, (1, 1), kernel_init=_default_init, name="shortcut",
                             conv_general_dilated=_conv_impl(self.fast_vjp))(
                x_BHWC
            )
        return x_BHWC + h


class AttnBlock(nn.Module):
    """Spatial self-attention with a residual connection (one head unless ``head_dim`` is set)."""

    num_groups: int
    eps: float = 1e-6
    head_dim: int | None = None
    zero_init: bool = False
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        d = C if self.head_dim is None else self.head_dim
        if C % d:
            raise ValueError(f"AttnBlock: channels {C} not divisible by attn_head_dim {d}")
        n_heads = C // d
        h_BLC = _group_norm(self.num_groups, self.eps, self.fast_vjp, "norm")(x_BHWC)
        h_BLC = h_BLC.reshape(B, H * W, C)
        dense = lambda name, init=_default_init: nn.Dense(C, kernel_init=init, name=name)
        q_BLND = dense("q")(h_BLC).reshape(B, H * W, n_heads, d)
        k_BLND = dense("k")(h_BLC).reshape(B, H * W, n_heads, d)
        v_BLND = dense("v")(h_BLC).reshape(B, H * W, n_heads, d)
        logits_BNQK = jnp.einsum("bqnd,bknd->bnqk", q_BLND, k_BLND) * (d**-0.5)
        w_BNQK = jax.nn.softmax(logits_BNQK, axis=-1)
        o_BLC = jnp.einsum("bnqk,bknd->bqnd", w_BNQK, v_BLND).reshape(B, H * W, C)
        o_BLC = dense("proj_out", _tiny_init if self.zero_init else _default_init)(o_BLC)
        return x_BHWC + o_BLC.reshape(B, H, W, C)


class UNet(nn.Module):
    """Ho et al. (2020) DDPM noise-prediction UNet, NHWC.

    Call as ``model.apply(variables, x_t, step, train=False)``; with ``train=True`` pass
    ``rngs={'dropout': key}``. Build from a named configuration with :func:`unet_from_config`.

    Attributes:
      ch: base channel count.
      ch_mult: channel multiplier per resolution level (the input is downsampled
        ``len(ch_mult) - 1`` times).
      num_res_blocks: ResBlocks per encoder level (the decoder has one more).
      attn_resolutions: spatial sizes (height) at which ResBlocks are followed by attention.
      dropout: dropout rate inside ResBlocks (train mode only).
      num_groups: GroupNorm groups.
      out_ch: output channels; None = the input's channel count.
      resamp_with_conv: stride-2 conv / conv after upsampling (else avg-pool / plain nearest).
      in_ch: expected input channels, checked when set (None = any).
      image_size: expected height = width, checked when set (None = any divisible size).
      attn_head_dim: attention head width; None = one head over all channels (Ho et al.).
      flip_sin_to_cos: step-embedding order [cos, sin] instead of Ho's [sin, cos].
      freq_shift: step-embedding frequency shift (Ho et al.: 1).
      norm_eps: GroupNorm epsilon (Ho et al.: 1e-6).
      zero_init: initialise the last conv of every residual branch, the attention output
        projections and the output conv at scale 1e-10 as Ho et al. do. Off by default so that
        a freshly initialised network is a non-degenerate function.
      fast_vjp: convolutions with the custom VJP of :mod:`jaxrob.models._conv` (same values
        and gradients, 20-30x faster input-gradients inside ``lax`` loops on XLA:CPU; no
        forward-mode). Same parameters either way: build the twin you need.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    out_ch: int | None = None
    resamp_with_conv: bool = True
    in_ch: int | None = None
    image_size: int | None = None
    attn_head_dim: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    norm_eps: float = 1e-6
    zero_init: bool = False
    fast_vjp: bool = False

    def _check_inputs(self, x_t, step):
        check_images(x_t, "x_t", channels=self.in_ch, value_range=None)
        B, H, W, _ = x_t.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"x_t: height and width must be divisible by 2**(len(ch_mult)-1) = "
                f"{factor} (ch_mult={tuple(self.ch_mult)}), got shape "
                f"{tuple(x_t.shape)}"
            )
        if self.image_size is not None and (H, W) != (self.image_size, self.image_size):
            raise ValueError(
                f"x_t: this UNet is configured for {self.image_size}x"
                f"{self.image_size} inputs, got shape {tuple(x_t.shape)}"
            )
        step = jnp.asarray(step)
        if (
            not (
                jnp.issubdtype(step.dtype, jnp.integer) or jnp.issubdtype(step.dtype, jnp.floating)
            )
            or step.dtype == jnp.bool_
        ):
            raise ValueError(
                f"step: expected an int or float array of step labels, got dtype {step.dtype}"
            )
        if step.ndim == 0:
            step = jnp.broadcast_to(step, (B,))
        if step.shape != (B,):
            raise ValueError(
                f"step: expected shape ({B},) (one step label per example) or a "
                f"scalar, got shape {tuple(step.shape)}"
            )
        return step

    @nn.compact
    def __call__(self, x_t: Latents, step: Steps, train: bool = False) -> Array:
        """Predict the noise in ``x_t``.

        Args:
          x_t: (B, H, W, C) float32 diffusion-space tensor (about [-1, 1]; not range-checked).
          step: (B,) int or float step labels (fractional labels allowed), or a scalar.
          train: enable dropout (needs the ``'dropout'`` rng).

        Returns:
          (B, H, W, out_ch) float32 prediction.
        """
        step_B = self._check_inputs(x_t, step)
        out_ch = x_t.shape[-1] if self.out_ch is None else self.out_ch
        n_levels = len(self.ch_mult)
        res = lambda c, name: ResBlock(
            c, self.num_groups, self.dropout, self.norm_eps, self.zero_init, self.fast_vjp,
            name=name,
        )
        attn = lambda name: AttnBlock(
            self.num_groups, self.norm_eps, self.attn_head_dim, self.zero_init, self.fast_vjp,
            name=name,
        )

        temb_BD = timestep_embedding(
            step_B, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb_BD = nn.Dense(4 * self.ch, kernel_init=_default_init, name="temb_dense_0")(temb_BD)
        temb_BD = nn.Dense(4 * self.ch, kernel_init=_default_init, name="temb_dense_1")(
            nn.silu(temb_BD)
        )

        hs = [_conv3(self.ch, "conv_in", fast_vjp=self.fast_vjp)(x_t)]
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down_{level}_res_{block}")(hs[-1], temb_BD, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{level}_attn_{block}")(h)
                hs.append(h)
            if level != n_levels - 1:
                hs.append(self._downsample(hs[-1], f"down_{level}_downsample"))

        h = hs[-1]
        h = res(h.shape[-1], "mid_res_0")(h, temb_BD, train)
        h = attn("mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, temb_BD, train)

        for level in reversed(range(n_levels)):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res(self.ch * self.ch_mult[level], f"up_{level}_res_{block}")(h, temb_BD, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{level}_attn_{block}")(h)
            if level != 0:
                h = self._upsample(h, f"up_{level}_upsample")
        assert not hs

        h = _group_norm(self.num_groups, self.norm_eps, self.fast_vjp, "norm_out")(h)
        return _conv3(out_ch, "conv_out", _tiny_init if self.zero_init else _default_init,
                      self.fast_vjp)(nn.silu(h))

    def _downsample(self, x_BHWC, name):
        return downsample(x_BHWC, name, with_conv=self.resamp_with_conv, fast_vjp=self.fast_vjp)

    def _upsample(self, x_BHWC, name):
        return upsample(x_BHWC, name, with_conv=self.resamp_with_conv, fast_vjp=self.fast_vjp)


def downsample(x_BHWC, name: str, *, with_conv: bool = True, fast_vjp: bool = False):
    """Halve height and width: a stride-2 conv3 named ``name`` (TF "SAME" padding, one row and
    column of zeros on the bottom/right = diffusers' ``Downsample2D(padding=0)``), or a 2x2
    average pool. Called inside a compact module, whose submodule the conv becomes."""
    if with_conv:
        return nn.Conv(
            x_BHWC.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            kernel_init=_default_init,
            name=name,
            conv_general_dilated=_conv_impl(fast_vjp),
        )(x_BHWC)
    return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


def upsample(x_BHWC, name: str, *, with_conv: bool = True, fast_vjp: bool = False):
    """Double height and width: nearest x2, then a conv3 named ``name`` (diffusers'
    ``Upsample2D(use_conv=True)``) unless ``with_conv`` is False."""
    if with_conv and fast_vjp:
        return UpsampleConv(x_BHWC.shape[-1], _default_init, name=name)(x_BHWC)
    up = (upsample_nearest2x if fast_vjp else upsample_nearest2x_plain)(x_BHWC)
    if with_conv:
        up = _conv3(x_BHWC.shape[-1], name, fast_vjp=fast_vjp)(up)
    return up


# Named configurations. Besides UNet keyword arguments they fix the data shape via
# ``in_ch`` / ``image_size`` (so ``cfg["image_size"]``, ``cfg["in_ch"]`` say what to init with).
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # Ho et al. CIFAR-10 model = google/ddpm-cifar10-32: 35,746,307 parameters.
    "cifar10": dict(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_groups=32,
        in_ch=3,
        image_size=32,
    ),
    "mnist": dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(7,),
        dropout=0.1,
        num_groups=8,
        in_ch=1,
        image_size=28,
    ),
    "digits": dict(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.1,
        num_groups=8,
        in_ch=1,
        image_size=8,
    ),
    # Latent DDPMs on the codes of AUTOENCODER_CONFIGS' "mnist" (7x7x4: 7 is odd, so no
    # downsampling; attention at 7x7 gives every block the whole code) and "cifar10" (8x8x4).
    "mnist_latent": dict(
        ch=32,
        ch_mult=(1,),
        num_res_blocks=2,
        attn_resolutions=(7,),
        dropout=0.0,
        num_groups=8,
        in_ch=4,
        image_size=7,
    ),
    "cifar10_latent": dict(
        ch=128,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(4,),
        dropout=0.1,
        num_groups=32,
        in_ch=4,
        image_size=8,
    ),
}


def unet_from_config(config: str | Mapping[str, Any], **overrides: Any) -> UNet:
    """Build a :class:`UNet` from a name in ``UNET_CONFIGS`` or a dict of UNet keyword arguments.

    Args:
      config: a key of ``UNET_CONFIGS`` (``"cifar10"``, ``"mnist"``, ``"digits"``,
        ``"mnist_latent"``, ``"cifar10_latent"``), or a mapping of UNet attributes.
      **overrides: attributes replacing those of the configuration (e.g. ``dropout=0.0``).

    Returns:
      The (unbound) Flax module.
    """
    if isinstance(config, str):
        if config not in UNET_CONFIGS:
            raise ValueError(
                f"config: expected one of {sorted(UNET_CONFIGS)} or a dict of UNet "
                f"arguments, got {config!r}"
            )
        config = UNET_CONFIGS[config]
    kwargs = {**dict(config), **overrides}
    fields = set(UNet.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"config: unknown UNet argument(s) {unknown}; expected a subset of {sorted(fields)}"
        )
    for key in ("ch_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return UNet(**kwargs)


def unet_config_from_diffusers(
    diffusers_config: Mapping[str, Any], *, image_size: int | None = None
) -> dict[str, Any]:
    """Translate a diffusers ``UNet2DModel`` config (its ``config.json``) into UNet arguments.

    Only the Ho et al. family is supported: positional step embedding, SiLU, ``DownBlock2D`` /
    ``AttnDownBlock2D`` encoders mirrored by ``UpBlock2D`` / ``AttnUpBlock2D`` decoders,
    ``UNetMidBlock2D``, conv resampling with ``downsample_padding=0`` (TF "SAME"), no class
    conditioning, output scale factors 1. Anything else raises ``ValueError`` naming the field.

    Args:
      diffusers_config: the diffusers config mapping (``UNet2DModel.config`` or the JSON dict).
      image_size: input height = width; defaults to the config's ``sample_size``.

    Returns:
      A dict for :func:`unet_from_config`.
    """
    c = dict(diffusers_config)

    def need(key, allowed, default=None):
        val = c.get(key, default)
        if val not in allowed:
            raise ValueError(
                f"diffusers config: unsupported {key}={val!r}; the Ho et al. UNet "
                f"needs one of {list(allowed)}"
            )

    need("time_embedding_type", ("positional",), "positional")
    need("act_fn", ("silu", "swish"), "silu")
    need("center_input_sample", (False,), False)
    need("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    need("downsample_type", ("conv",), "conv")
    need("upsample_type", ("conv",), "conv")
    need("downsample_padding", (0,), 1)
    need("resnet_time_scale_shift", ("default",), "default")
    need("add_attention", (True,), True)
    need("class_embed_type", (None,), None)
    need("num_class_embeds", (None,), None)
    need("time_embedding_dim", (None,), None)
    need("mid_block_scale_factor", (1, 1.0), 1)
    groups = c.get("norm_num_groups", 32)
    need("attn_norm_num_groups", (None, groups), None)
    boc = tuple(c["block_out_channels"])
    base = boc[0]
    if any(b % base for b in boc):
        raise ValueError(
            f"diffusers config: block_out_channels {boc} are not multiples of "
            f"the first one ({base})"
        )
    down = tuple(c["down_block_types"])
    up = tuple(c["up_block_types"])
    for kind, types, names in (
        ("down", down, ("DownBlock2D", "AttnDownBlock2D")),
        ("up", up, ("UpBlock2D", "AttnUpBlock2D")),
    ):
        bad = [t for t in types if t not in names]
        if bad:
            raise ValueError(
                f"diffusers config: unsupported {kind}_block_types {bad}; expected {list(names)}"
            )
    attn_down = [t.startswith("Attn") for t in down]
    attn_up = [t.startswith("Attn") for t in reversed(up)]
    if attn_down != attn_up:
        raise ValueError(
            f"diffusers config: attention levels of down_block_types {down} and "
            f"up_block_types {up} do not mirror each other"
        )
    size = image_size if image_size is not None else c.get("sample_size")
    if isinstance(size, Sequence):
        if len(set(size)) != 1:
            raise ValueError(
                f"diffusers config: only square inputs are supported, got sample_size {size}"
            )
        size = size[0]
    if size is None:
        raise ValueError("image_size: the diffusers config has no sample_size; pass image_size")
    attn_res = tuple(int(size) // 2**i for i, a in enumerate(attn_down) if a)
    head_dim = c.get("attention_head_dim")
    if head_dim is not None:
        # diffusers gives each attention layer C // head_dim heads; a head as wide as the
        # channels of every attention level is Ho's single head.
        attn_channels = [boc[i] for i, a in enumerate(attn_down) if a] + [boc[-1]]
        if all(head_dim == ch for ch in attn_channels):
            head_dim = None
    return dict(
        ch=base,
        ch_mult=tuple(b // base for b in boc),
        num_res_blocks=int(c.get("layers_per_block", 2)),
        attn_resolutions=attn_res,
        dropout=float(c.get("dropout", 0.0)),
        num_groups=int(groups),
        out_ch=int(c.get("out_channels", 3)),
        in_ch=int(c.get("in_channels", 3)),
        image_size=int(size),
        attn_head_dim=head_dim,
        flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        freq_shift=float(c.get("freq_shift", 0)),
        norm_eps=float(c.get("norm_eps", 1e-5)),
    )


def _diffusers_module_keys(n_levels: int):
    """Flax UNet module path -> candidate diffusers module prefixes."""
    inner = {
        # ResBlock
        "norm1": ["norm1"],
        "conv1": ["conv1"],
        "temb_proj": ["time_emb_proj"],
        "norm2": ["norm2"],
        "conv2": ["conv2"],
        "shortcut": ["conv_shortcut"],
        # AttnBlock (current names first, then the deprecated AttentionBlock names)
        "norm": ["group_norm"],
        "q": ["to_q", "query"],
        "k": ["to_k", "key"],
        "v": ["to_v", "value"],
        "proj_out": ["to_out.0", "proj_attn"],
    }
    top = {
        "conv_in": ["conv_in"],
        "temb_dense_0": ["time_embedding.linear_1"],
        "temb_dense_1": ["time_embedding.linear_2"],
        "norm_out": ["conv_norm_out"],
        "conv_out": ["conv_out"],
        "mid_res_0": ["mid_block.resnets.0"],
        "mid_attn": ["mid_block.attentions.0"],
        "mid_res_1": ["mid_block.resnets.1"],
    }

    def outer(name: str) -> list[str]:
        if name in top:
            return top[name]
        part, level, kind, *rest = name.split("_")
        level = int(level)
        blocks = f"down_blocks.{level}" if part == "down" else f"up_blocks.{n_levels - 1 - level}"
        if kind == "res":
            return [f"{blocks}.resnets.{rest[0]}"]
        if kind == "attn":
            return [f"{blocks}.attentions.{rest[0]}"]
        if kind == "downsample":
            return [f"{blocks}.downsamplers.0.{c}" for c in ("conv", "Conv2d_0", "op")]
        if kind == "upsample":
            return [f"{blocks}.upsamplers.0.{c}" for c in ("conv", "Conv2d_0")]
        raise ValueError(f"unknown UNet module {name!r}")

    def module_keys(path: tuple[str, ...]) -> list[str]:
        prefixes = outer(path[0])
        if len(path) == 1:
            return prefixes
        return [f"{p}.{s}" for p in prefixes for s in inner[path[1]]]

    return module_keys


def unet_from_diffusers_state_dict(
    state_dict: StateDict,
    config: str | Mapping[str, Any] | UNet,
    *,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Import a diffusers ``UNet2DModel`` state dict (google/ddpm-cifar10-32 layout).

    The UNet's numerics are diffusers' for matching settings: step embedding order and
    frequency shift, GroupNorm epsilon, TF-style stride-2 padding, 1/sqrt(d) attention scaling.
    Those settings are not stored in a state dict: take ``config`` from
    :func:`unet_config_from_diffusers` (or ``"cifar10"`` for google/ddpm-cifar10-32). Both the
    current (``to_q``/``to_out.0``) and the deprecated (``query``/``proj_attn``) attention names
    are accepted.

    Args:
      state_dict: diffusers parameter names -> numpy arrays or torch tensors.
      config: a ``UNET_CONFIGS`` name, a dict of UNet arguments, or a :class:`UNet`.
      image_size: input height = width, needed to place attention (``attn_resolutions`` are
        spatial sizes); defaults to the configuration's ``image_size``.

    Returns:
      ``{'params': ...}`` for ``UNet.apply`` (float32 numpy leaves).

    Raises:
      ValueError: a key is missing or unused, or a shape differs (each named, expected vs got).
    """
    model = config if isinstance(config, UNet) else unet_from_config(config)
    size = image_size if image_size is not None else model.image_size
    if size is None:
        raise ValueError(
            "image_size: the configuration has no image_size; pass image_size= "
            "(attention placement depends on the input resolution)"
        )
    in_ch = model.in_ch
    if in_ch is None:
        w = state_dict.get("conv_in.weight")
        if w is None:
            raise ValueError("state dict: missing key 'conv_in.weight'")
        in_ch = int(w.shape[1])
    x = jax.ShapeDtypeStruct((1, size, size, in_ch), jnp.float32)
    step = jax.ShapeDtypeStruct((1,), jnp.int32)
    expected = jax.eval_shape(model.init, jr.key(0), x, step)
    if set(expected) != {"params"}:
        raise ValueError(f"UNet: unexpected variable collections {sorted(expected)}")
    return fill_from_state_dict(
        state_dict,
        expected,
        _diffusers_module_keys(len(model.ch_mult)),
        what="UNet (diffusers UNet2DModel import)",
    )
