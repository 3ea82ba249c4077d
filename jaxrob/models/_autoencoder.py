"""The KL autoencoder of latent diffusion (Rombach et al. 2022) in Flax linen, and its import
from diffusers' ``AutoencoderKL`` (e.g. Stable Diffusion's VAE).

Layout (diffusers ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks;
NHWC here, NCHW there):

* Encoder: conv3 -> per level ``layers_per_block`` ResBlocks (no step embedding) and, except
  at the last level, a stride-2 conv3 (TF "SAME" padding: diffusers' ``padding=0`` pads one
  row/column on the bottom/right) -> mid block Res-Attn-Res (one attention head over all
  channels) -> GroupNorm -> SiLU -> conv3 to ``2 * latent_channels`` (mean and log-variance);
* ``quant_conv`` (1x1, 2z -> 2z), ``post_quant_conv`` (1x1, z -> z);
* Decoder: conv3 -> mid block -> per level, deepest first, ``layers_per_block + 1``
  ResBlocks and, except at the last level, nearest x2 + conv3 -> GroupNorm -> SiLU -> conv3.

The blocks are the DDPM UNet's (:mod:`jaxrob.models._unet`): the same ResBlock, attention,
GroupNorm, convolutions and fast-VJP twins, so an autoencoder imported from diffusers computes
diffusers' numbers (``tests/models/test_autoencoder.py``). The module works in the [-1, 1] pixel
space and returns raw moments; :class:`jaxrob.models.Autoencoder` wraps it for [0, 1] images
and scaled latents.

References:
  Rombach, Blattmann, Lorenz, Esser, Ommer. High-Resolution Image Synthesis with Latent
  Diffusion Models. CVPR 2022.
  Kingma, Welling. Auto-Encoding Variational Bayes. ICLR 2014.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_images
from jaxrob._types import Array
from jaxrob.models._torch_import import StateDict, fill_from_state_dict, to_numpy
from jaxrob.models._unet import (
    AttnBlock,
    ResBlock,
    _conv3,
    _conv_impl,
    _group_norm,
    downsample,
    upsample,
)

__all__ = [
    "AUTOENCODER_CONFIGS",
    "AutoencoderKL",
    "autoencoder_config_from_diffusers",
    "autoencoder_from_config",
    "autoencoder_from_diffusers_state_dict",
]

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


class _Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_ch: int
    num_groups: int
    eps: float
    mid_attention: bool
    fast_vjp: bool

    @nn.compact
    def __call__(self, x_BHWC):
        res = lambda c, name: ResBlock(c, self.num_groups, 0.0, self.eps, fast_vjp=self.fast_vjp,
                                       name=name)
        h = _conv3(self.block_out_channels[0], "conv_in", fast_vjp=self.fast_vjp)(x_BHWC)
        last = len(self.block_out_channels) - 1
        for level, ch in enumerate(self.block_out_channels):
            for block in range(self.layers_per_block):
                h = res(ch, f"down_{level}_res_{block}")(h, None, False)
            if level != last:
                h = downsample(h, f"down_{level}_downsample", fast_vjp=self.fast_vjp)
        h = _mid_block(self, h, res)
        h = _group_norm(self.num_groups, self.eps, self.fast_vjp, "norm_out")(h)
        return _conv3(self.out_ch, "conv_out", fast_vjp=self.fast_vjp)(nn.silu(h))


class _Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_ch: int
    num_groups: int
    eps: float
    mid_attention: bool
    fast_vjp: bool

    @nn.compact
    def __call__(self, z_BHWC):
        res = lambda c, name: ResBlock(c, self.num_groups, 0.0, self.eps, fast_vjp=self.fast_vjp,
                                       name=name)
        channels = tuple(reversed(self.block_out_channels))
        h = _conv3(channels[0], "conv_in", fast_vjp=self.fast_vjp)(z_BHWC)
        h = _mid_block(self, h, res)
        # levels numbered as diffusers' up_blocks: 0 is the deepest (lowest resolution)
        for level, ch in enumerate(channels):
            for block in range(self.layers_per_block + 1):
                h = res(ch, f"up_{level}_res_{block}")(h, None, False)
            if level != len(channels) - 1:
                h = upsample(h, f"up_{level}_upsample", fast_vjp=self.fast_vjp)
        h = _group_norm(self.num_groups, self.eps, self.fast_vjp, "norm_out")(h)
        return _conv3(self.out_ch, "conv_out", fast_vjp=self.fast_vjp)(nn.silu(h))


def _mid_block(mod, h, res):
    h = res(h.shape[-1], "mid_res_0")(h, None, False)
    if mod.mid_attention:
        h = AttnBlock(mod.num_groups, mod.eps, fast_vjp=mod.fast_vjp, name="mid_attn")(h)
    return res(h.shape[-1], "mid_res_1")(h, None, False)


class AutoencoderKL(nn.Module):
    """KL-regularised convolutional autoencoder (diffusers ``AutoencoderKL`` layout), NHWC.

    Works in the model's own pixel space, [-1, 1]: ``apply(v, x, method="encode")`` gives the
    posterior moments ``(B, H/f, W/f, 2 * latent_channels)`` (mean, then log-variance, along the
    channels), ``apply(v, z, method="decode")`` the reconstruction; ``f = 2**(levels - 1)``.
    Calling the module (``init``) runs encode on the mean and decode. Use it through
    :class:`jaxrob.models.Autoencoder` ([0, 1] images, scaled latents, input checks).

    Attributes:
      block_out_channels: channels per resolution level (``len - 1`` downsamplings).
      layers_per_block: ResBlocks per encoder level (the decoder has one more).
      latent_channels: channels of the latent code.
      num_groups: GroupNorm groups.
      in_ch: image channels.
      out_ch: reconstruction channels (None: ``in_ch``).
      norm_eps: GroupNorm epsilon (diffusers: 1e-6).
      use_quant_conv: the 1x1 conv after the encoder.
      use_post_quant_conv: the 1x1 conv before the decoder.
      mid_attention: attention in the mid blocks.
      image_size: expected height = width, checked when set (None: any size divisible by f).
      fast_vjp: the reverse-mode twin (closed-form VJPs of convs, GroupNorm, upsampling; same
        parameters and values, no forward-mode): see :class:`jaxrob.models.UNet`.
    """

    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    num_groups: int = 32
    in_ch: int = 3
    out_ch: int | None = None
    norm_eps: float = 1e-6
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    image_size: int | None = None
    fast_vjp: bool = False

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, num_groups=self.num_groups,
                      eps=self.norm_eps, mid_attention=self.mid_attention,
                      fast_vjp=self.fast_vjp)
        self.encoder = _Encoder(out_ch=2 * self.latent_channels, **common)
        self.decoder = _Decoder(out_ch=self.in_ch if self.out_ch is None else self.out_ch,
                                **common)
        conv1 = lambda c: nn.Conv(c, (1, 1), conv_general_dilated=_conv_impl(self.fast_vjp))
        if self.use_quant_conv:
            self.quant_conv = conv1(2 * self.latent_channels)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv1(self.latent_channels)

    @property
    def downsampling_factor(self) -> int:
        """``f``: the latent code is ``f`` times smaller than the image in height and width."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(H/f, W/f, latent_channels)`` of an ``(H, W, C)`` image; ``ValueError`` when the
        image does not fit (channels, size, or a side not divisible by ``f``)."""
        H, W, C = (int(d) for d in image_shape)
        f = self.downsampling_factor
        if C != self.in_ch:
            raise ValueError(f"x: this autoencoder takes {self.in_ch}-channel images (NHWC), "
                             f"got image shape {(H, W, C)}")
        if H % f or W % f:
            raise ValueError(
                f"x: height and width must be divisible by the autoencoder's downsampling "
                f"factor 2**(len(block_out_channels)-1) = {f} (block_out_channels="
                f"{tuple(self.block_out_channels)}), got image shape {(H, W, C)}")
        if self.image_size is not None and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"x: this autoencoder is configured for {self.image_size}x"
                             f"{self.image_size} images, got image shape {(H, W, C)}")
        return H // f, W // f, int(self.latent_channels)

    def check_latents(self, z, name: str = "z") -> None:
        """``ValueError`` unless ``z`` is a float32 (B, h, w, latent_channels) array of a size the
        decoder takes (``image_size / f`` when ``image_size`` is set)."""
        check_images(z, name, channels=self.latent_channels, value_range=None)
        if self.image_size is not None:
            s = self.image_size // self.downsampling_factor
            if tuple(z.shape[1:3]) != (s, s):
                raise ValueError(f"{name}: this autoencoder decodes {s}x{s} latent codes "
                                 f"({self.image_size}x{self.image_size} images), got shape "
                                 f"{tuple(z.shape)}")

    def encode(self, x_m11: Array) -> Array:
        """Posterior moments ``[mean, logvar]`` (concatenated on channels) of [-1, 1] images;
        the log-variance is not yet clamped."""
        h = self.encoder(x_m11)
        return self.quant_conv(h) if self.use_quant_conv else h

    def decode(self, z: Array) -> Array:
        """Reconstruction in [-1, 1] (not clipped) of unscaled latent codes."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x_m11: Array) -> Array:
        moments = self.encode(x_m11)
        return self.decode(moments[..., : self.latent_channels])


# Named configurations (AutoencoderKL keyword arguments; ``image_size`` and ``in_ch`` say what
# to initialise with).
AUTOENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    # Stable Diffusion v1 / v2 VAE (CompVis/stable-diffusion-v1-4 "vae", stabilityai/sd-vae-ft-*)
    # : 83,653,863 parameters, f = 8.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               num_groups=32, in_ch=3),
    # MNIST 28x28x1 -> 7x7x4 (f = 4; 28 halves twice evenly, not three times). Narrow (8-16-32
    # channels) so that it trains in minutes on a shared 2-core CPU.
    "mnist": dict(block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=4,
                  num_groups=4, in_ch=1, image_size=28),
    # CIFAR-10 32x32x3 -> 8x8x4 (f = 4).
    "cifar10": dict(block_out_channels=(64, 128, 128), layers_per_block=2, latent_channels=4,
                    num_groups=32, in_ch=3, image_size=32),
}


def autoencoder_from_config(config: str | Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a name in ``AUTOENCODER_CONFIGS`` or a dict of its
    keyword arguments (``overrides`` replace the configuration's values).

    Raises:
      ValueError: unknown name or argument, or a GroupNorm group count that does not divide
        every level's channels.
    """
    if isinstance(config, str):
        if config not in AUTOENCODER_CONFIGS:
            raise ValueError(f"config: expected one of {sorted(AUTOENCODER_CONFIGS)} or a dict "
                             f"of AutoencoderKL arguments, got {config!r}")
        config = AUTOENCODER_CONFIGS[config]
    kwargs = {**dict(config), **overrides}
    fields = set(AutoencoderKL.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"config: unknown AutoencoderKL argument(s) {unknown}; expected a "
                         f"subset of {sorted(fields)}")
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
    module = AutoencoderKL(**kwargs)
    bad = [c for c in module.block_out_channels if c % module.num_groups]
    if not module.block_out_channels or bad:
        raise ValueError(f"block_out_channels: expected a non-empty sequence of multiples of "
                         f"num_groups={module.num_groups}, got {tuple(module.block_out_channels)}")
    return module


def autoencoder_config_from_diffusers(diffusers_config: Mapping[str, Any], *,
                                      image_size: int | None = None) -> dict[str, Any]:
    """Translate a diffusers ``AutoencoderKL`` config (its ``config.json``) into
    :class:`AutoencoderKL` arguments.

    Supported: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, SiLU, with or without the
    quant convs and the mid-block attention. The config's ``scaling_factor`` and
    ``shift_factor`` belong to :class:`jaxrob.models.Autoencoder`, not to the network; per-channel
    ``latents_mean`` / ``latents_std`` are not supported. Anything else raises ``ValueError``
    naming the field.

    Args:
      diffusers_config: the config mapping (``AutoencoderKL.config`` or the JSON dict).
      image_size: expected input height = width (default: none checked).
    """
    c = dict(diffusers_config)
    boc = tuple(int(b) for b in c.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(c.get(key, (want,)))
        if len(types) != len(boc) or any(t != want for t in types):
            raise ValueError(f"diffusers config: {key}={list(types)} unsupported; expected "
                             f"{len(boc)} x {want!r} (one per block_out_channels entry)")
    if c.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"diffusers config: unsupported act_fn={c.get('act_fn')!r}; expected "
                         "'silu'")
    for key in ("latents_mean", "latents_std"):
        if c.get(key) is not None:
            raise ValueError(f"diffusers config: per-channel {key} is not supported")
    return dict(
        block_out_channels=boc,
        layers_per_block=int(c.get("layers_per_block", 1)),
        latent_channels=int(c.get("latent_channels", 4)),
        num_groups=int(c.get("norm_num_groups", 32)),
        in_ch=int(c.get("in_channels", 3)),
        out_ch=int(c.get("out_channels", c.get("in_channels", 3))),
        use_quant_conv=bool(c.get("use_quant_conv", True)),
        use_post_quant_conv=bool(c.get("use_post_quant_conv", True)),
        mid_attention=bool(c.get("mid_block_add_attention", True)),
        image_size=image_size,
    )


def _diffusers_module_keys(path: tuple[str, ...]) -> list[str]:
    """Flax module path -> candidate diffusers module prefixes (current names first, then the
    deprecated attention names of older exports)."""
    inner = {
        "norm1": ["norm1"], "conv1": ["conv1"], "norm2": ["norm2"], "conv2": ["conv2"],
        "shortcut": ["conv_shortcut", "nin_shortcut"],
        "norm": ["group_norm"], "q": ["to_q", "query"], "k": ["to_k", "key"],
        "v": ["to_v", "value"], "proj_out": ["to_out.0", "proj_attn"],
    }
    part = path[0]
    if part in ("quant_conv", "post_quant_conv"):
        return [part]
    name = path[1]
    if name in ("conv_in", "conv_out"):
        outer = [name]
    elif name == "norm_out":
        outer = ["conv_norm_out"]
    elif name == "mid_attn":
        outer = ["mid_block.attentions.0"]
    elif name.startswith("mid_res_"):
        outer = [f"mid_block.resnets.{name[len('mid_res_'):]}"]
    else:
        side, level, kind, *rest = name.split("_")
        blocks = f"{'down' if side == 'down' else 'up'}_blocks.{level}"
        if kind == "res":
            outer = [f"{blocks}.resnets.{rest[0]}"]
        elif kind == "downsample":
            outer = [f"{blocks}.downsamplers.0.{c}" for c in ("conv", "Conv2d_0", "op")]
        else:
            outer = [f"{blocks}.upsamplers.0.{c}" for c in ("conv", "Conv2d_0")]
    outer = [f"{part}.{o}" for o in outer]
    if len(path) == 2:
        return outer
    return [f"{o}.{s}" for o in outer for s in inner[path[2]]]


def _squeeze_attention_convs(state_dict: StateDict) -> dict[str, Any]:
    """Old exports store the attention projections as 1x1 convs (C, C, 1, 1): make them the
    (C, C) linear weights they are."""
    out = {}
    for k, v in state_dict.items():
        shape = tuple(getattr(v, "shape", ()))
        if ".attentions." in k and k.endswith(".weight") and len(shape) == 4 \
                and shape[2:] == (1, 1):
            v = to_numpy(v).reshape(shape[:2])
        out[k] = v
    return out


def autoencoder_from_diffusers_state_dict(state_dict: StateDict,
                                          module: AutoencoderKL) -> dict[str, Any]:
    """Import a diffusers ``AutoencoderKL`` state dict (e.g. Stable Diffusion's VAE).

    Build ``module`` with :func:`autoencoder_config_from_diffusers` of the model's config (or
    ``autoencoder_from_config("sd")`` for SD v1/v2): a state dict does not say how many
    GroupNorm groups or which epsilon the network uses. Current (``to_q`` / ``to_out.0``) and
    deprecated (``query`` / ``proj_attn``, also as 1x1 convs) attention names are accepted.

    Args:
      state_dict: diffusers parameter names -> numpy arrays or torch tensors.
      module: the :class:`AutoencoderKL` to fill.

    Returns:
      ``{'params': ...}`` for ``module.apply`` (float32 numpy leaves).

    Raises:
      ValueError: keys missing from the state dict or left unused (all listed), or shapes that
        differ (each with expected vs got).
    """
    if not isinstance(module, AutoencoderKL):
        raise ValueError(f"module: expected a jaxrob.models.AutoencoderKL, got "
                         f"{type(module).__name__}")
    f = module.downsampling_factor
    size = module.image_size or 2 * f
    x = jax.ShapeDtypeStruct((1, size, size, module.in_ch), jnp.float32)
    expected = jax.eval_shape(module.init, jr.key(0), x)
    return fill_from_state_dict(_squeeze_attention_convs(state_dict), expected,
                                _diffusers_module_keys,
                                what="AutoencoderKL (diffusers AutoencoderKL import)")
