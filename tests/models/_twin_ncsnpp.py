"""An independent PyTorch twin of score_sde's NCSN++ / DDPM++ network, for parity tests.

Written from a reading of yang-song/score_sde_pytorch (models/ncsnpp.py, layerspp.py, layers.py,
up_or_down_sampling.py, utils.py), which NVlabs/DiffPure vendors unchanged under score_sde/. The
contract is the checkpoint layout: module names, parameter names, shapes, dtypes and registration
order are the reference's, so the state dict of score_sde's ``checkpoint_8.pth`` (DDPM++ deep,
continuous VP: DiffPure's CIFAR-10 score model) loads with ``load_state_dict(strict=True)`` once
the ``module.`` prefix of its ``torch.nn.DataParallel`` wrapper is removed
(:func:`strip_data_parallel`), and its EMA weights (``ckpt["ema"]["shadow_params"]``, one tensor per
parameter in ``model.parameters()`` order) apply with :func:`copy_ema`. The forward pass computes
what the reference computes; only the initialisation differs (see :func:`build_ncsnpp`).

Layout (FULL_CONFIG, keys of ``state_dict()``)::

    sigmas                          (1000,) float64 buffer, exp(linspace(log 50, log 0.01, 1000))
    all_modules.0 / .1              Linear nf->4nf, Linear 4nf->4nf (time embedding MLP)
    all_modules.2                   Conv2d 3->nf 3x3 (input conv)
    ...                             ResnetBlockBigGANpp: GroupNorm_0, Conv_0, Dense_0,
                                    GroupNorm_1, Conv_1, [Conv_2 1x1 shortcut]
                                    AttnBlockpp: GroupNorm_0, NIN_0..NIN_3 (each W (C, C), b (C,))
    all_modules.-2 / .-1            GroupNorm, Conv2d nf->3 3x3 (output head)

Config keys (a flat dict; the names are score_sde's ``config.model`` / ``config.data`` fields):

Supported, with the values they may take:
  image_size (int, square inputs), num_channels (data channels), centered (bool: False maps
  x -> 2x - 1 first), nf, ch_mult (tuple), num_res_blocks, attn_resolutions (tuple of spatial
  sizes), dropout (active only in train mode), resamp_with_conv (True; unused by BigGAN blocks),
  conditional (bool), skip_rescale (bool), init_scale (float; shapes only, the twin's init is
  its own), embedding_type ('positional': sinusoidal embedding of the time input, or 'fourier':
  Gaussian Fourier features of log(time input), parameter ``all_modules.0.W``), fourier_scale,
  nonlinearity ('swish', 'elu', 'relu', 'lrelu'), scale_by_sigma (bool; divides the output by
  ``sigmas[t.long()]`` for positional, by t for fourier, as the reference does), sigma_min,
  sigma_max, num_scales (the ``sigmas`` buffer), fir_kernel (ignored since fir is False),
  progressive_combine (ignored since both pyramids are 'none'), seed (int, default 0: the twin's
  random initialisation). Other keys (beta_min, beta_max, name, ema_rate, ...) are ignored.

Not supported (ValueError): resblock_type other than 'biggan' (the 'ddpm' block), fir=True (FIR
up/downsampling through upfirdn2d), progressive != 'none', progressive_input != 'none' (the
output/input pyramids of the NCSN++ VE models), normalization other than 'GroupNorm',
attention_type other than 'ddpm', conv_size other than 3.

Time input: the reference takes the network's own time label. For DiffPure's continuous VP model
that label is ``t * 999`` for t in [0, 1] (score_sde models/utils.py ``get_score_fn``), and the
output is the noise prediction: score = -output / std(t).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_SUPPORTED_FIXED = {
    "resblock_type": ("biggan",),
    "fir": (False,),
    "progressive": ("none",),
    "progressive_input": ("none",),
    "normalization": ("groupnorm",),
    "attention_type": ("ddpm",),
    "conv_size": (3,),
    "embedding_type": ("positional", "fourier"),
    "nonlinearity": ("swish", "elu", "relu", "lrelu"),
}

# score_sde configs/vp/cifar10_ddpmpp_deep_continuous.py == DiffPure configs/cifar10.yml.
FULL_CONFIG: dict = dict(
    image_size=32,
    num_channels=3,
    centered=True,
    sigma_min=0.01,
    sigma_max=50.0,
    num_scales=1000,
    beta_min=0.1,
    beta_max=20.0,
    dropout=0.1,
    scale_by_sigma=False,
    normalization="GroupNorm",
    nonlinearity="swish",
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=8,
    attn_resolutions=(16,),
    resamp_with_conv=True,
    conditional=True,
    fir=False,
    fir_kernel=(1, 3, 3, 1),
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    attention_type="ddpm",
    init_scale=0.0,
    embedding_type="positional",
    fourier_scale=16,
    conv_size=3,
)

# The same options at toy size: two levels (16x16, 8x8), attention at 8x8, one block each.
# GroupNorm groups are min(C // 4, 32): 4 groups at 16 channels, 8 at 32.
SMALL_CONFIG: dict = {
    **FULL_CONFIG,
    "image_size": 16,
    "nf": 16,
    "ch_mult": (1, 2),
    "num_res_blocks": 1,
    "attn_resolutions": (8,),
    "num_scales": 1000,
}


def _activation(name: str) -> nn.Module:
    return {
        "swish": nn.SiLU(),
        "elu": nn.ELU(),
        "relu": nn.ReLU(),
        "lrelu": nn.LeakyReLU(negative_slope=0.2),
    }[name]


def _group_norm(channels: int) -> nn.GroupNorm:
    # score_sde's choice of groups for every norm in NCSN++; eps 1e-6 as in the Flax original.
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=kernel // 2, bias=True)


class NIN(nn.Module):
    """A 1x1 "network in network" layer kept as a matrix ``W`` of shape (in, out) and bias ``b``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(c_in, c_out))
        self.b = nn.Parameter(torch.empty(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contract the channel axis of NCHW input with W's first axis.
        return torch.einsum("nchw,cd->ndhw", x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all H*W positions, residual, optionally / sqrt(2)."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels)  # output projection
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(n, c, hgt * wid)
        k = self.NIN_1(h).reshape(n, c, hgt * wid)
        v = self.NIN_2(h).reshape(n, c, hgt * wid)
        logits = torch.einsum("ncp,ncs->nps", q, k) / math.sqrt(c)
        attn = torch.softmax(logits, dim=-1)
        out = torch.einsum("nps,ncs->ncp", attn, v).reshape(n, c, hgt, wid)
        out = x + self.NIN_3(out)
        return out / math.sqrt(2.0) if self.skip_rescale else out


def _nearest_up2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _mean_down2(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block; the resampling (if any) happens after the first norm+act."""

    def __init__(self, act: nn.Module, c_in: int, c_out: int | None, temb_dim: int | None,
                 dropout: float, skip_rescale: bool, up: bool = False, down: bool = False):
        super().__init__()
        c_out = c_out or c_in
        # Attribute order = parameter order = the EMA shadow list order: keep it.
        self.GroupNorm_0 = _group_norm(c_in)
        self.Conv_0 = _conv(c_in, c_out, 3)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, c_out)
        self.GroupNorm_1 = _group_norm(c_out)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(c_out, c_out, 3)
        self.has_shortcut = c_in != c_out or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv(c_in, c_out, 1)
        self.act = act
        self.up, self.down, self.skip_rescale = up, down, skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h, x = _nearest_up2(h), _nearest_up2(x)
        elif self.down:
            h, x = _mean_down2(h), _mean_down2(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Dropout_0(self.act(self.GroupNorm_1(h)))
        h = self.Conv_1(h)
        if self.has_shortcut:
            x = self.Conv_2(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class GaussianFourierProjection(nn.Module):
    """Fixed random features [sin(2 pi s W), cos(2 pi s W)] of a scalar s (score_sde's VE)."""

    def __init__(self, size: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        arg = 2.0 * math.pi * s[:, None] * self.W[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_positions: float = 10000.0):
    """DDPM's embedding as score_sde has it: [sin(t w_k), cos(t w_k)], w_k = M^(-k/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1)
                      * torch.arange(half, dtype=torch.float32, device=t.device))
    arg = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ (BigGAN blocks, no pyramids): ``forward(x_nchw, t) -> output (N, C, H, W)``.

    Every submodule is an entry of ``all_modules`` in the reference's order; ``_plan`` records
    what each entry is for, so the forward pass walks it instead of counting indices.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        nf = cfg["nf"]
        ch_mult = tuple(cfg["ch_mult"])
        n_levels = len(ch_mult)
        nblocks = cfg["num_res_blocks"]
        attn_res = tuple(cfg["attn_resolutions"])
        resolutions = [cfg["image_size"] // 2**i for i in range(n_levels)]
        c_data = cfg["num_channels"]
        self.act = act = _activation(cfg["nonlinearity"].lower())
        self.embedding_type = cfg["embedding_type"].lower()
        self.conditional = bool(cfg["conditional"])
        self.nf = nf
        sigmas = np.exp(np.linspace(np.log(cfg["sigma_max"]), np.log(cfg["sigma_min"]),
                                    cfg["num_scales"]))
        # float64 like the reference (torch.tensor of a float64 numpy array).
        self.register_buffer("sigmas", torch.tensor(sigmas))

        mods: list[nn.Module] = []
        plan: list[str] = []

        def add(kind: str, module: nn.Module) -> None:
            plan.append(kind)
            mods.append(module)

        if self.embedding_type == "fourier":
            add("fourier", GaussianFourierProjection(nf))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        # The blocks get a Dense_0 for the time embedding even when conditional is False (the
        # reference builds them so; they are unused then).
        temb_dim = 4 * nf
        if self.conditional:
            add("temb0", nn.Linear(embed_dim, temb_dim))
            add("temb1", nn.Linear(temb_dim, temb_dim))

        def block(c_in, c_out=None, up=False, down=False):
            return ResnetBlockBigGANpp(act, c_in, c_out, temb_dim, cfg["dropout"],
                                       cfg["skip_rescale"], up=up, down=down)

        def attn(c):
            return AttnBlockpp(c, cfg["skip_rescale"])

        self._n_embed = len(plan)
        add("conv_in", _conv(c_data, nf, 3))
        skip_ch = [nf]
        ch = nf
        for level in range(n_levels):
            for _ in range(nblocks):
                add("down_block", block(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if resolutions[level] in attn_res:
                    add("attn", attn(ch))
                plan.append("push")
                skip_ch.append(ch)
            if level != n_levels - 1:
                add("down_resample", block(ch, down=True))
                plan.append("push")
                skip_ch.append(ch)
        add("mid_block", block(ch))
        add("attn", attn(ch))
        add("mid_block", block(ch))
        for level in reversed(range(n_levels)):
            for _ in range(nblocks + 1):
                add("up_block", block(ch + skip_ch.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
            if resolutions[level] in attn_res:
                add("attn", attn(ch))
            if level != 0:
                add("up_resample", block(ch, up=True))
        assert not skip_ch
        add("norm_out", _group_norm(ch))
        add("conv_out", _conv(ch, c_data, 3))
        self.all_modules = nn.ModuleList(mods)
        self._plan = plan

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        if time_cond.ndim != 1 or time_cond.shape[0] != x.shape[0]:
            raise ValueError(f"time_cond must have shape ({x.shape[0]},), got "
                             f"{tuple(time_cond.shape)}")
        if self.embedding_type == "fourier":
            used_sigmas = time_cond
        else:
            used_sigmas = self.sigmas[time_cond.long()]
            temb = sinusoidal_embedding(time_cond, self.nf)
        if not self.cfg["centered"]:
            x = 2.0 * x - 1.0
        mods = iter(self.all_modules)
        if self.embedding_type == "fourier":
            temb = next(mods)(torch.log(time_cond))
        if self.conditional:
            temb = next(mods)(temb)
            temb = next(mods)(self.act(temb))
        else:
            temb = None
        skips: list[torch.Tensor] = []
        h = x
        for kind in self._plan[self._n_embed:]:
            if kind == "push":
                skips.append(h)
                continue
            m = next(mods)
            if kind == "conv_in":
                h = m(h)
                skips.append(h)
            elif kind in ("down_block", "down_resample", "mid_block", "up_resample"):
                h = m(h, temb)
            elif kind == "up_block":
                h = m(torch.cat([h, skips.pop()], dim=1), temb)
            elif kind == "attn":
                h = m(h)
            elif kind == "norm_out":
                h = self.act(m(h))
            elif kind == "conv_out":
                h = m(h)
            else:  # pragma: no cover
                raise AssertionError(kind)
        assert not skips
        if self.cfg["scale_by_sigma"]:
            h = h / used_sigmas.reshape(-1, 1, 1, 1)  # float64 sigmas promote, as there
        return h


def _check_config(cfg: dict) -> None:
    required = ("image_size", "num_channels", "centered", "nf", "ch_mult", "num_res_blocks",
                "attn_resolutions", "dropout", "conditional", "skip_rescale", "embedding_type",
                "nonlinearity", "scale_by_sigma", "sigma_min", "sigma_max", "num_scales")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"NCSN++ twin config is missing keys {missing}")
    for key, allowed in _SUPPORTED_FIXED.items():
        if key not in cfg:
            continue
        value = cfg[key].lower() if isinstance(cfg[key], str) else cfg[key]
        if value not in allowed:
            raise ValueError(f"NCSN++ twin supports {key} in {allowed}, got {cfg[key]!r}")
    if cfg["image_size"] % 2 ** (len(cfg["ch_mult"]) - 1):
        raise ValueError(f"image_size {cfg['image_size']} must be divisible by "
                         f"2**(len(ch_mult) - 1)")
    for c in {cfg["nf"] * m for m in cfg["ch_mult"]}:
        if c // 4 == 0 or c % min(c // 4, 32):
            raise ValueError(f"channel count {c} does not split into min(C // 4, 32) groups")


def init_twin_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with non-degenerate random values, deterministically from ``seed``.

    Not the reference initialisation, on purpose: that one zeroes biases and scales the last conv
    of each block and the attention output by 1e-10 (init_scale=0), which would let a parity
    test pass with those branches broken. Here weights are N(0, 1/fan_in), biases N(0, 0.1^2),
    norm scales 1 + N(0, 0.1^2) and Fourier features N(0, 1) * fourier_scale.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "GroupNorm" in name or isinstance(_owner(model, name), nn.GroupNorm):
                base = 1.0 if leaf == "weight" else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("bias", "b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # Fourier features
                scale = float(getattr(model, "cfg", {}).get("fourier_scale", 1.0))
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                # W of NIN is (in, out); torch weights are (out, in, ...).
                fan_in = p.shape[0] if leaf == "W" else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


def build_ncsnpp(cfg: dict, *, device: str | torch.device | None = None) -> NCSNpp:
    """Build the twin in eval mode (dropout off), initialised by :func:`init_twin_`.

    Args:
      cfg: a flat config dict (see the module docstring for the keys); ``cfg["seed"]`` (default
        0) seeds the initialisation, so equal configs give equal state dicts.
      device: ``"meta"`` builds shapes only (no memory, no initialisation): enough for state
        dict keys and parameter counts of FULL_CONFIG.

    Raises:
      ValueError: a missing key or an option the twin does not implement (module docstring).
    """
    _check_config(cfg)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return NCSNpp(cfg).eval()
    model = NCSNpp(cfg)
    init_twin_(model, int(cfg.get("seed", 0)))
    if device is not None:
        model = model.to(device)
    return model.eval()


def strip_data_parallel(state_dict: dict) -> dict:
    """score_sde saves ``DataParallel(model).state_dict()``: drop its ``module.`` prefix."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def copy_ema(model: nn.Module, shadow_params: list) -> None:
    """Put score_sde's EMA weights (``ckpt["ema"]["shadow_params"]``) into ``model``.

    The reference's ExponentialMovingAverage keeps one tensor per parameter with
    ``requires_grad`` in ``model.parameters()`` order, and DiffPure evaluates with these.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(shadow_params):
        raise ValueError(f"expected {len(params)} EMA tensors, got {len(shadow_params)}")
    with torch.no_grad():
        for p, s in zip(params, shadow_params, strict=True):
            if p.shape != s.shape:
                raise ValueError(f"EMA tensor of shape {tuple(s.shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
            p.copy_(s)
