"""The Ho et al. (2020) DDPM UNet as a plain PyTorch ``nn.Module`` (NCHW), for benchmarks.

It is the network of ``jaxrob.models.UNet`` layer for layer, with the same numerics: sinusoidal
step embedding ([sin, cos], frequency shift 1), GroupNorm eps 1e-6, one attention head scaled by
1/sqrt(C), TF-style stride-2 padding (one zero row/column at the bottom/right), nearest x2
upsampling, skip concatenation ``[h, skip]`` on channels. Submodules carry the Flax module names
(``down_0_res_0``, ``mid_attn``, ...) so :func:`load_jax_params` copies a Flax params tree into
it by name. torch is a benchmark/test dependency only; nothing in ``jaxrob/`` imports this file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _harness import flatten
from torch import nn

__all__ = ["TorchUNet", "load_jax_params", "timestep_embedding"]


def timestep_embedding(step_B: torch.Tensor, dim: int, *, freq_shift: float = 1.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """``[sin(step * f_i), cos(step * f_i)]`` with ``f_i = exp(-log(P) i / (dim/2 - shift))``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                    device=step_B.device)
    exponent = exponent / (half - freq_shift)
    arg = step_B.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, dropout: float,
                 eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj are Linear layers over channels."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)           # (B, L, C)
        q, k, v = self.q(h), self.k(h), self.v(h)
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * C ** -0.5, dim=-1)
        o = self.proj_out(torch.bmm(w, v))                                # (B, L, C)
        return x + o.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))    # TF "SAME" for stride 2: bottom/right


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TorchUNet(nn.Module):
    """Ho et al. eps-prediction UNet, NCHW; ``forward(x_BCHW, step_B)``.

    Takes the keyword arguments of a ``jaxrob.models.UNET_CONFIGS`` entry (``ch``, ``ch_mult``,
    ``num_res_blocks``, ``attn_resolutions``, ``dropout``, ``num_groups``, ``in_ch``,
    ``image_size``; ``out_ch`` defaults to ``in_ch``). Only the Ho et al. defaults of the
    embedding and norms are supported (the configs jaxrob names use them).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, num_groups: int, in_ch: int,
                 image_size: int, out_ch: int | None = None, norm_eps: float = 1e-6,
                 **unsupported: Any):
        super().__init__()
        bad = {k: v for k, v in unsupported.items()
               if v not in (None, False, 1.0, True) or k not in (
                   "attn_head_dim", "flip_sin_to_cos", "zero_init", "resamp_with_conv",
                   "freq_shift")}
        if bad:
            raise ValueError(f"TorchUNet: unsupported settings {bad}")
        self.ch = ch
        self.n_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        out_ch = in_ch if out_ch is None else out_ch
        m = nn.ModuleDict()
        m["temb_dense_0"] = nn.Linear(ch, temb_ch)
        m["temb_dense_1"] = nn.Linear(temb_ch, temb_ch)
        m["conv_in"] = nn.Conv2d(in_ch, ch, 3, padding=1)
        res = lambda i, o: ResBlock(i, o, temb_ch, num_groups, dropout, norm_eps)
        attn = lambda c: AttnBlock(c, num_groups, norm_eps)
        # Encoder: track channels and spatial size of every stored skip activation.
        size, skip_ch, cur = image_size, [ch], ch
        self.down_attn: dict[str, bool] = {}
        for level, mult in enumerate(ch_mult):
            for block in range(num_res_blocks):
                m[f"down_{level}_res_{block}"] = res(cur, ch * mult)
                cur = ch * mult
                if size in attn_resolutions:
                    m[f"down_{level}_attn_{block}"] = attn(cur)
                skip_ch.append(cur)
            if level != self.n_levels - 1:
                m[f"down_{level}_downsample"] = Downsample(cur)
                size //= 2
                skip_ch.append(cur)
        m["mid_res_0"] = res(cur, cur)
        m["mid_attn"] = attn(cur)
        m["mid_res_1"] = res(cur, cur)
        for level in reversed(range(self.n_levels)):
            for block in range(num_res_blocks + 1):
                m[f"up_{level}_res_{block}"] = res(cur + skip_ch.pop(), ch * ch_mult[level])
                cur = ch * ch_mult[level]
                if size in attn_resolutions:
                    m[f"up_{level}_attn_{block}"] = attn(cur)
            if level != 0:
                m[f"up_{level}_upsample"] = Upsample(cur)
                size *= 2
        assert not skip_ch
        m["norm_out"] = nn.GroupNorm(num_groups, cur, eps=norm_eps)
        m["conv_out"] = nn.Conv2d(cur, out_ch, 3, padding=1)
        self.m = m

    def forward(self, x, step):
        m = self.m
        temb = timestep_embedding(step, self.ch).to(x.dtype)   # float64 checks
        temb = m["temb_dense_1"](F.silu(m["temb_dense_0"](temb)))
        hs = [m["conv_in"](x)]
        for level in range(self.n_levels):
            for block in range(self.num_res_blocks):
                h = m[f"down_{level}_res_{block}"](hs[-1], temb)
                if f"down_{level}_attn_{block}" in m:
                    h = m[f"down_{level}_attn_{block}"](h)
                hs.append(h)
            if level != self.n_levels - 1:
                hs.append(m[f"down_{level}_downsample"](hs[-1]))
        h = m["mid_res_0"](hs[-1], temb)
        h = m["mid_attn"](h)
        h = m["mid_res_1"](h, temb)
        for level in reversed(range(self.n_levels)):
            for block in range(self.num_res_blocks + 1):
                h = m[f"up_{level}_res_{block}"](torch.cat([h, hs.pop()], dim=1), temb)
                if f"up_{level}_attn_{block}" in m:
                    h = m[f"up_{level}_attn_{block}"](h)
            if level != 0:
                h = m[f"up_{level}_upsample"](h)
        return m["conv_out"](F.silu(m["norm_out"](h)))


def _torch_leaf(module: nn.Module, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax leaf name + value -> torch parameter name + value in torch layout."""
    if isinstance(module, nn.Conv2d):
        if leaf == "kernel":                       # HWIO -> OIHW
            return "weight", value.transpose(3, 2, 0, 1)
        return "bias", value
    if isinstance(module, nn.Linear):
        if leaf == "kernel":                       # (in, out) -> (out, in)
            return "weight", value.T
        return "bias", value
    if isinstance(module, nn.GroupNorm):
        return {"scale": "weight", "bias": "bias"}[leaf], value
    raise TypeError(f"no rule for {type(module).__name__}.{leaf}")


def load_jax_params(model: TorchUNet, params: Mapping) -> TorchUNet:
    """Copy a Flax ``jaxrob.models.UNet`` params tree (``variables['params']``) into ``model``.

    Every Flax leaf must land on exactly one torch parameter of the same number of elements and
    every torch parameter must be written; anything else raises ``ValueError``.
    """
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    named = dict(model.named_parameters())
    written: set[str] = set()
    modules = dict(model.named_modules())
    for name, value in flat.items():
        *path, leaf = name.split("/")
        # Flax path (module[, submodule]) -> torch module path under model.m; the Flax
        # resamplers are bare convs, the torch ones hold theirs in ``.conv``.
        mod_path = "m." + ".".join(path)
        if path[0].endswith(("downsample", "upsample")):
            mod_path += ".conv"
        if mod_path not in modules:
            raise ValueError(f"load_jax_params: no torch module for Flax {name}")
        t_leaf, arr = _torch_leaf(modules[mod_path], leaf, value)
        t_name = f"{mod_path}.{t_leaf}"
        target = named[t_name]
        if tuple(target.shape) != arr.shape:
            raise ValueError(f"load_jax_params: {name} -> {t_name}: shape {arr.shape} vs "
                             f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)))
        written.add(t_name)
    missing = sorted(set(named) - written)
    if missing:
        raise ValueError(f"load_jax_params: torch parameters not written: {missing}")
    return model
