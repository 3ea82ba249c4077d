"""An independent PyTorch twin of guided-diffusion's ADM ``UNetModel``, for parity tests.

Written from a reading of openai/guided-diffusion (guided_diffusion/unet.py, nn.py,
script_util.py), which NVlabs/DiffPure vendors unchanged. The contract is the checkpoint layout:
module names, parameter names, shapes and order are the reference's, so the published
``256x256_diffusion_uncond.pt`` (a plain state dict) loads with ``load_state_dict(strict=True)``
into ``build_adm(FULL_CONFIG)``. The forward pass computes what the reference computes in fp32;
only the initialisation differs (see :func:`init_twin_`).

Layout (keys of ``state_dict()``)::

    time_embed.0 / .2                      Linear C->4C, Linear 4C->4C (SiLU between)
    input_blocks.0.0                       Conv2d 3->C 3x3
    input_blocks.i.0                       ResBlock: in_layers.{0 GroupNorm, 2 Conv2d 3x3},
                                           emb_layers.1 Linear 4C->2*C_out (scale, shift),
                                           out_layers.{0 GroupNorm, 3 Conv2d 3x3},
                                           [skip_connection Conv2d 1x1 when C_in != C_out]
    input_blocks.i.1                       AttentionBlock: norm, qkv Conv1d C->3C, proj_out Conv1d
    middle_block.{0,1,2}                   ResBlock, AttentionBlock, ResBlock
    output_blocks.j.{0,1,2}                ResBlock, [AttentionBlock], [up-ResBlock]
    out.{0 GroupNorm, 2 Conv2d C->out}

Config keys (guided-diffusion's ``create_model`` arguments, as in script_util.py):

Supported: image_size, num_channels, num_res_blocks, channel_mult ('' for the reference's default
per image size, a comma string or a tuple), learn_sigma (6 output channels when True, else 3),
attention_resolutions (comma string or tuple of *resolutions*; converted to downsampling rates
image_size // r as the reference does), num_heads, num_head_channels (-1: use num_heads),
num_heads_upsample (-1: num_heads), use_scale_shift_norm, dropout (active only in train mode),
resblock_updown (residual up/down blocks, else conv up/downsampling), use_new_attention_order
(False: the legacy per-head [q, k, v] split; True: split q, k, v first), use_checkpoint (no
numerical effect; accepted), seed (the twin's initialisation, default 0). Unknown keys are
ignored (diffusion settings such as diffusion_steps, noise_schedule, timestep_respacing).

Not supported (ValueError): class_cond=True (``label_emb`` and the ``y`` argument), use_fp16=True
(the reference casts the torso to float16; the twin is an fp32 reference, and the checkpoint's
tensors are fp32 either way, so it loads the same).

Time input: ``forward(x, timesteps)`` embeds ``timesteps`` (float or int, shape (N,)) with
[cos(t f_k), sin(t f_k)], f_k = 10000^(-k/half). DiffPure's guided runner calls the model with
``(t * 1000).long()`` for t in [0, 1] (runners/diffpure_sde.py ``_scale_timesteps``) and uses
the first 3 output channels as the noise prediction (the last 3 are the variance interpolation).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# DiffPure configs/imagenet.yml over script_util.model_and_diffusion_defaults(), fp32.
FULL_CONFIG: dict = dict(
    image_size=256,
    num_channels=256,
    num_res_blocks=2,
    channel_mult="",  # -> (1, 1, 2, 2, 4, 4) at 256
    learn_sigma=True,
    class_cond=False,
    attention_resolutions="32,16,8",  # -> downsampling rates (8, 16, 32)
    num_heads=4,
    num_head_channels=64,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    dropout=0.0,
    resblock_updown=True,
    use_fp16=False,
    use_new_attention_order=False,
    use_checkpoint=False,
)

# Toy size, same options: 16x16 -> 8x8, attention at 8x8 (rate 2) with 16-channel heads.
# GroupNorm has 32 groups in ADM, so every channel count (32, 64, and the concatenations 64,
# 96, 128 in the decoder) must be a multiple of 32.
SMALL_CONFIG: dict = {
    **FULL_CONFIG,
    "image_size": 16,
    "num_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": "8",
    "num_head_channels": 16,
}

_DEFAULT_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


class GroupNorm32(nn.GroupNorm):
    """ADM's norm: 32 groups, eps 1e-5, computed in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv (``op``), or 2x2 average pooling without parameters."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepBlock(nn.Module):
    """A module whose forward takes the time embedding as a second argument."""


class EmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to the TimestepBlock children."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, time conditioning (FiLM or additive), GroupNorm-SiLU-dropout-conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: int | None = None, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        c_out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, c_out, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * c_out if use_scale_shift_norm else c_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(c_out), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1))
        if c_out == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv of the input path.
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1.0 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int,
                 new_order: bool):
        super().__init__()
        if num_head_channels == -1:
            self.heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of "
                                 f"{num_head_channels}")
            self.heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        n, width, length = qkv.shape
        d = width // (3 * self.heads)
        if self.new_order:
            # qkv channels are [q (all heads) | k | v], each head-major.
            q, k, v = (t.reshape(n * self.heads, d, length) for t in qkv.chunk(3, dim=1))
        else:
            # Legacy layout: head-major, each head's channels are [q_h | k_h | v_h].
            q, k, v = qkv.reshape(n * self.heads, 3 * d, length).split(d, dim=1)
        s = d ** -0.25  # split between q and k, as the reference does for fp16 range
        logits = torch.einsum("bct,bcs->bts", q * s, k * s)
        w = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return torch.einsum("bts,bcs->bct", w, v).reshape(n, -1, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)
        h = self.proj_out(self._attend(self.qkv(self.norm(x))))
        return (x + h).reshape(n, c, *spatial)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0):
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k/half), k < half = dim // 2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    arg = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _parse_mult(cfg: dict) -> tuple:
    mult = cfg["channel_mult"]
    if mult == "":
        if cfg["image_size"] not in _DEFAULT_MULT:
            raise ValueError(f"no default channel_mult for image_size {cfg['image_size']}; "
                             f"expected one of {sorted(_DEFAULT_MULT)} or an explicit one")
        return _DEFAULT_MULT[cfg["image_size"]]
    if isinstance(mult, str):
        return tuple(int(m) for m in mult.split(","))
    return tuple(mult)


def _attention_rates(cfg: dict) -> tuple:
    res = cfg["attention_resolutions"]
    if isinstance(res, str):
        res = [int(r) for r in res.split(",")]
    return tuple(cfg["image_size"] // int(r) for r in res)


class UNetModel(nn.Module):
    """ADM UNet: ``forward(x (N, 3, H, W), timesteps (N,)) -> (N, 3 or 6, H, W)``."""

    def __init__(self, cfg: dict):
        super().__init__()
        C = cfg["num_channels"]
        mult = _parse_mult(cfg)
        rates = _attention_rates(cfg)
        nblocks = cfg["num_res_blocks"]
        heads = cfg["num_heads"]
        head_ch = cfg["num_head_channels"]
        heads_up = heads if cfg["num_heads_upsample"] == -1 else cfg["num_heads_upsample"]
        new_order = bool(cfg["use_new_attention_order"])
        dropout = cfg["dropout"]
        ssn = bool(cfg["use_scale_shift_norm"])
        updown = bool(cfg["resblock_updown"])
        out_ch = 6 if cfg["learn_sigma"] else 3
        emb_dim = 4 * C
        self.model_channels = C

        def res(c_in, c_out=None, up=False, down=False):
            return ResBlock(c_in, emb_dim, dropout, c_out, ssn, up=up, down=down)

        self.time_embed = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        ch = int(mult[0] * C)
        first_ch = ch
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_ch = [ch]
        rate = 1
        for level, m in enumerate(mult):
            for _ in range(nblocks):
                layers = [res(ch, int(m * C))]
                ch = int(m * C)
                if rate in rates:
                    layers.append(AttentionBlock(ch, heads, head_ch, new_order))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_ch.append(ch)
            if level != len(mult) - 1:
                down = res(ch, ch, down=True) if updown else Downsample(ch, True, ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_ch.append(ch)
                rate *= 2
        self.middle_block = EmbedSequential(
            res(ch), AttentionBlock(ch, heads, head_ch, new_order), res(ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            m = mult[level]
            for i in range(nblocks + 1):
                layers = [res(ch + skip_ch.pop(), int(m * C))]
                ch = int(m * C)
                if rate in rates:
                    layers.append(AttentionBlock(ch, heads_up, head_ch, new_order))
                if level and i == nblocks:
                    layers.append(res(ch, ch, up=True) if updown else Upsample(ch, True, ch))
                    rate //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skip_ch
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 nn.Conv2d(first_ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got "
                             f"{tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


def _check_config(cfg: dict) -> None:
    required = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
                "attention_resolutions", "num_heads", "num_head_channels",
                "num_heads_upsample", "use_scale_shift_norm", "dropout", "resblock_updown",
                "use_new_attention_order")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"ADM twin config is missing keys {missing}")
    if cfg.get("class_cond", False):
        raise ValueError("ADM twin supports class_cond=False only (no label_emb / y input)")
    if cfg.get("use_fp16", False):
        raise ValueError("ADM twin is an fp32 reference: expected use_fp16=False")
    mult = _parse_mult(cfg)
    if cfg["image_size"] % 2 ** (len(mult) - 1):
        raise ValueError(f"image_size {cfg['image_size']} must be divisible by "
                         f"2**(len(channel_mult) - 1) = {2 ** (len(mult) - 1)}")
    C = cfg["num_channels"]
    for c in {int(m * C) for m in mult}:
        if c % 32:
            raise ValueError(f"channel count {c} is not a multiple of ADM's 32 norm groups")


def init_twin_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with non-degenerate random values, deterministically from ``seed``.

    Not the reference initialisation, on purpose: ADM zero-initialises the last conv of each
    ResBlock, every attention ``proj_out`` and the output conv, which would make a parity test
    blind to those paths. Here weights are N(0, 1/fan_in), biases N(0, 0.1^2), GroupNorm scales
    1 + N(0, 0.1^2) and shifts N(0, 0.1^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(owner, nn.GroupNorm) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def build_adm(cfg: dict, *, device: str | torch.device | None = None) -> UNetModel:
    """Build the twin in eval mode (dropout off), initialised by :func:`init_twin_`.

    Args:
      cfg: a config dict (module docstring); ``cfg["seed"]`` (default 0) seeds the
        initialisation, so equal configs give equal state dicts.
      device: ``"meta"`` builds shapes only (no memory, no initialisation): enough for the state
        dict keys and the parameter count of FULL_CONFIG (552M parameters, 2.2 GB in fp32).

    Raises:
      ValueError: a missing key or an option the twin does not implement (module docstring).
    """
    _check_config(cfg)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return UNetModel(cfg).eval()
    model = init_twin_(UNetModel(cfg), int(cfg.get("seed", 0)))
    if device is not None:
        model = model.to(device)
    return model.eval()
