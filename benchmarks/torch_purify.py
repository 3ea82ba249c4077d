"""PyTorch reference of a DiffPure-DDPM purifier and a PGD-EoT attack step, for benchmarks.

Written the way the published PyTorch code of diffusion-purification attacks does it (DiffPure,
Lee & Kim's ``DiffPure`` re-evaluation, ANCHORS/ADDT-style PGD-EoT): eager PyTorch, every UNet
call of the reverse chain wrapped in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``,
the EoT samples run one after another in a Python loop with one ``backward`` each, the gradients
summed over EoT, then a sign step and the projection onto the Linf ball and [0, 1].

The chain coefficients are not recomputed here: they are read from the arrays of a
``jaxrob.diffusion.Schedule`` (``truncated(linear_schedule(), t_star, steps)``) saved by the
benchmark, so both frameworks run the same chain. :class:`TorchSmallCNN` is
``jaxrob.models.SmallCNN`` (eval mode) layer for layer and :func:`load_jax_classifier` copies a
Flax ``{"params", "batch_stats"}`` tree into it. torch is a benchmark dependency only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from _harness import CHAIN_KEYS
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TorchSmallCNN", "load_jax_classifier", "Chain", "purify", "attack_iteration",
           "purify_classify_grad"]


class TorchSmallCNN(nn.Module):
    """``jaxrob.models.SmallCNN`` in NCHW, eval mode.

    ``(x - mean) / std``; [conv3x3(c, no bias, padding 1)-BN-ReLU-maxpool2] for c in
    ``features``; flatten in NHWC order (as Flax does); Dense(hidden)-ReLU; Dense(classes).
    """

    def __init__(self, *, features: Sequence[int] = (32, 64), hidden: int = 128,
                 num_classes: int = 10, in_ch: int = 1, image_size: int = 28,
                 mean: float = 0.5, std: float = 0.5):
        super().__init__()
        self.mean, self.std = mean, std
        chans = [in_ch, *features]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False)
                                   for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, eps=1e-5) for c in features)
        size = image_size
        for _ in features:
            size //= 2
        self.fc = nn.Linear(features[-1] * size * size, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = (x - self.mean) / self.std
        for conv, bn in zip(self.convs, self.bns, strict=True):
            h = F.max_pool2d(F.relu(bn(conv(h))), 2)
        h = h.permute(0, 2, 3, 1).flatten(1)         # Flax flattens (B, H, W, C)
        return self.out(F.relu(self.fc(h)))


def load_jax_classifier(model: TorchSmallCNN, variables: Mapping) -> TorchSmallCNN:
    """Copy a Flax ``SmallCNN`` ``{"params": ..., "batch_stats": ...}`` tree into ``model``."""
    p, s = variables["params"], variables["batch_stats"]
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
    with torch.no_grad():
        for i, (conv, bn) in enumerate(zip(model.convs, model.bns, strict=True)):
            conv.weight.copy_(t(np.asarray(p[f"conv{i}"]["kernel"]).transpose(3, 2, 0, 1)))
            bn.weight.copy_(t(p[f"bn{i}"]["scale"]))
            bn.bias.copy_(t(p[f"bn{i}"]["bias"]))
            bn.running_mean.copy_(t(s[f"bn{i}"]["mean"]))
            bn.running_var.copy_(t(s[f"bn{i}"]["var"]))
        for name in ("fc", "out"):
            getattr(model, name).weight.copy_(t(np.asarray(p[name]["kernel"]).T))
            getattr(model, name).bias.copy_(t(p[name]["bias"]))
    return model


class Chain:
    """Coefficients of a (truncated, respaced) discrete chain as Python floats, position 0..N-1."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        for k in CHAIN_KEYS:
            setattr(self, k, [float(v) if k != "model_steps" else int(v)
                              for v in np.asarray(arrays[k])])
        self.num_steps = len(self.model_steps)


def purify(unet: nn.Module, x01: torch.Tensor, chain: Chain, *, sampler: str = "ddpm",
           use_checkpoint: bool = True, noise: torch.Tensor | None = None,
           step_noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """DiffPure: ``x_t* = sqrt(abar) (2 x - 1) + sqrt(1 - abar) z``, then the reverse chain.

    ``sampler="ddpm"`` (ancestral, posterior variance) or ``"ddim"`` (eta = 0). Noise is drawn
    with ``torch.randn_like`` unless given (``noise``: forward noise, ``step_noises[n]``: the
    noise of reverse position ``n``). Returns the purified images in [0, 1] (clamped).
    """
    batch = x01.shape[0]
    last = chain.num_steps - 1
    x0 = 2.0 * x01 - 1.0
    z = torch.randn_like(x0) if noise is None else noise
    x = chain.sqrt_alphas_cumprod[last] * x0 + chain.sqrt_one_minus_alphas_cumprod[last] * z
    for n in range(last, -1, -1):
        t = torch.full((batch,), chain.model_steps[n], dtype=torch.long)
        eps = (checkpoint(unet, x, t, use_reentrant=False) if use_checkpoint else unet(x, t))
        x0_hat = ((x - chain.sqrt_one_minus_alphas_cumprod[n] * eps)
                  / chain.sqrt_alphas_cumprod[n])
        if sampler == "ddim":
            x = (chain.alphas_cumprod_prev[n] ** 0.5 * x0_hat
                 + max(chain.one_minus_alphas_cumprod_prev[n], 0.0) ** 0.5 * eps)
            continue
        x = chain.posterior_coef_x0[n] * x0_hat + chain.posterior_coef_xt[n] * x
        if n > 0:
            zn = torch.randn_like(x) if step_noises is None else step_noises[n]
            x = x + chain.posterior_variance[n] ** 0.5 * zn
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def purify_classify_grad(unet, clf, chain, x01, y, **purify_kw):
    """``(sum_b CE(clf(purify(x))), grad_x)`` for one draw of the purifier's noise."""
    xx = x01.detach().requires_grad_(True)
    loss = F.cross_entropy(clf(purify(unet, xx, chain, **purify_kw)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xx)
    return loss.detach(), g


def attack_iteration(unet, clf, chain, x_adv, x, y, *, eot: int, eps: float,
                     step_size: float, use_checkpoint: bool = True):
    """One PGD-EoT iteration: EoT gradients one sample at a time, summed; sign step; project.

    Returns ``(x_adv_next, mean loss over EoT per example)``.
    """
    grad = torch.zeros_like(x_adv)
    loss_sum = torch.zeros(x.shape[0])
    for _ in range(eot):
        xx = x_adv.detach().requires_grad_(True)
        logits = clf(purify(unet, xx, chain, use_checkpoint=use_checkpoint))
        loss_b = F.cross_entropy(logits, y, reduction="none")
        (g,) = torch.autograd.grad(loss_b.sum(), xx)
        grad += g
        loss_sum += loss_b.detach()
    with torch.no_grad():
        x_next = x_adv + step_size * grad.sign()
        x_next = torch.min(torch.max(x_next, x - eps), x + eps).clamp(0.0, 1.0)
    return x_next, loss_sum / eot
