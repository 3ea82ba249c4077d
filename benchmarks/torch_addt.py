"""PyTorch twin of the ADDT reference's fine-tuning loop, and a plain DDPM step, for benchmarks.

Written from the description of ``train_DDPM_DDIM_ADDT/train_ADDT.py`` (LYMDLUT/ADDT) in
ANCHORS.md section 3 and the ADDT paper, not from jaxrob's code. Per batch of [0, 1] images
``x01`` and labels ``y``:

* a position ``n`` per image, uniform over the training chain, and the mixing ratio
  ``r = clamp(0.03 sqrt(abar_n) / sqrt(1 - abar_n), 0, 0.3)``;
* CGPO, ``num_iters`` times: a fresh forward noise, ``x_n = sqrt(abar) x0 + sqrt(1 - abar)
  (sqrt(1 - r^2) noise + r delta)``, the eps-network's ``x0`` prediction, the mean cross-entropy
  of the frozen classifier on it (mapped to [0, 1]), its gradient w.r.t. ``delta`` added to a
  running sum, and RBGM: ``delta`` <- a fresh N(0, I) sample sorted into the rank order of the
  running sum, per (image, channel) row;
* one eps-MSE step on the target ``sqrt(1 - r^2) noise + r delta`` with a fresh noise: AdamW,
  global-norm clipping at 1.0, then the EMA update (diffusers' power-3/4 warm-up).

``mode="reference"`` differentiates CGPO's loss as the reference does, with
``loss.backward()``: the eps-network's and the classifier's parameters require gradients, so
every CGPO backward pass also computes (and accumulates, later zeroed) their parameter
gradients, and the loss carries the reference's ``0 * mse(eps, noise)`` term.
``mode="lean"`` asks ``torch.autograd.grad(ce, delta)`` for the perturbation's gradient only
(what a tuned PyTorch implementation would do). Every random draw can be handed in
(``inject``), which the benchmark's numerics check uses to feed jaxrob's draws.

Eager, NCHW tensors in channels_last memory; torch is a benchmark dependency only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rbgm", "TorchTrainer"]


def rbgm(acc: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The values of ``fresh`` rearranged, per (image, channel) row, into the rank order of
    ``acc`` (the k-th smallest value where ``acc`` has its k-th smallest entry; ties in index
    order)."""
    b, c = acc.shape[:2]
    values = torch.sort(fresh.reshape(b * c, -1), dim=1).values
    order = torch.argsort(acc.reshape(b * c, -1), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True)
    return torch.gather(values, 1, ranks).reshape(acc.shape).contiguous(
        memory_format=torch.channels_last)


class TorchTrainer:
    """One optimizer over ``unet``; ``addt_step`` / ``ddpm_step`` update it in place.

    Args:
      unet: the eps-network (a ``torch_unet.TorchUNet``), updated in place.
      clf: the frozen classifier of [0, 1] NCHW images.
      sqrt_ab, sqrt_1m_ab: the training chain's ``sqrt(abar)``, ``sqrt(1 - abar)`` (float64
        arrays of length N) and ``model_steps`` the step labels of its positions.
      num_iters: CGPO iterations.
      mode: ``"reference"`` or ``"lean"`` (see the module docstring).
      ema_max, ema_power: EMA decay ``min(ema_max, 1 - (1 + s)^-power)`` at update ``s``
        (``ema_power=None``: ``min(ema_max, (1 + s) / (10 + s))``, jaxrob's DDPM default).
    """

    def __init__(self, unet, clf, sqrt_ab, sqrt_1m_ab, model_steps, *, num_iters=5,
                 mode="reference", lr=2e-4, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6,
                 clip=1.0, ema_max=0.9999, ema_power=0.75, lam=(0.03, 0.0, 0.3)):
        if mode not in ("reference", "lean"):
            raise ValueError(f"mode: expected 'reference' or 'lean', got {mode!r}")
        self.unet, self.clf, self.mode = unet, clf, mode
        self.sab = torch.as_tensor(sqrt_ab, dtype=torch.float32)
        self.s1m = torch.as_tensor(sqrt_1m_ab, dtype=torch.float32)
        self.model_steps = torch.as_tensor(model_steps, dtype=torch.long)
        self.num_iters, self.clip, self.lam = num_iters, clip, lam
        self.ema_max, self.ema_power = ema_max, ema_power
        self.params = [p for p in unet.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        for p in clf.parameters():   # the reference never freezes its classifier's parameters
            p.requires_grad_(mode == "reference")
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay, foreach=True)
        self.ema = [p.detach().clone() for p in self.params]
        self.updates = 0

    # ------------------------------------------------------------------ pieces
    def _coef(self, n):
        v = lambda a: a[n].view(-1, 1, 1, 1)
        return v(self.sab), v(self.s1m)

    def ratio(self, n):
        unit, lo, hi = self.lam
        sab, s1m = self._coef(n)
        return torch.clamp(unit * sab / s1m, lo, hi)

    def cgpo(self, x0, y, n, inject=None, record=None, record_acc=None):
        """CGPO + RBGM; ``inject``: ``delta0`` and per-iteration ``noise`` / ``fresh`` lists;
        ``record`` / ``record_acc``: lists that receive ``delta`` / the gradient sum after
        every iteration."""
        sab, s1m = self._coef(n)
        r = self.ratio(n)
        keep = torch.sqrt(1.0 - r * r)
        steps = self.model_steps[n]
        delta = torch.randn_like(x0) if inject is None else inject["delta0"].clone()
        acc = torch.zeros_like(x0)
        self.unet.train()
        for k in range(self.num_iters):
            delta.requires_grad_(True)
            noise = torch.randn_like(x0) if inject is None else inject["noise"][k]
            x_t = sab * x0 + s1m * (keep * noise + r * delta)
            eps = self.unet(x_t, steps)
            x0_hat = (x_t - s1m * eps) / sab
            ce = F.cross_entropy(self.clf(x0_hat / 2 + 0.5), y)
            if self.mode == "reference":
                (ce + 0.0 * F.mse_loss(eps, noise)).backward()
                g = delta.grad.detach()
            else:
                (g,) = torch.autograd.grad(ce, delta)
            acc += g
            with torch.no_grad():
                fresh = torch.randn_like(x0) if inject is None else inject["fresh"][k]
                delta = rbgm(acc, fresh)
            if record is not None:
                record.append(delta)
            if record_acc is not None:
                record_acc.append(acc.clone())
        return delta

    def _update(self, loss, ema_power):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        s = self.updates
        if ema_power is None:
            d = min(self.ema_max, (1.0 + s) / (10.0 + s))
        else:
            d = min(self.ema_max, 1.0 - (1.0 + s) ** (-ema_power))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - d)
        self.updates = s + 1
        return gnorm

    # ------------------------------------------------------------------ steps
    def addt_step(self, x01, y, inject=None):
        """One ADDT step. ``inject``: ``n``, ``noise`` (training), and for CGPO ``delta0``,
        ``cgpo_noise``, ``fresh``; or ``delta`` to skip CGPO. Returns (loss, grad_norm)."""
        x0 = 2.0 * x01 - 1.0
        n = (torch.randint(0, self.sab.shape[0], (x0.shape[0],)) if inject is None
             else inject["n"])
        if inject is not None and "delta" in inject:
            delta = inject["delta"]
        else:
            cg = None if inject is None else {"delta0": inject["delta0"],
                                              "noise": inject["cgpo_noise"],
                                              "fresh": inject["fresh"]}
            delta = self.cgpo(x0, y, n, cg)
        sab, s1m = self._coef(n)
        r = self.ratio(n)
        noise = torch.randn_like(x0) if inject is None else inject["noise"]
        target = torch.sqrt(1.0 - r * r) * noise + r * delta
        x_t = sab * x0 + s1m * target
        loss = F.mse_loss(self.unet(x_t, self.model_steps[n]), target)
        gnorm = self._update(loss, self.ema_power)
        return loss.detach(), gnorm

    def ddpm_step(self, x01):
        """One plain DDPM step (eps-MSE), jaxrob's DDPM EMA warm-up. Returns (loss, norm)."""
        x0 = 2.0 * x01 - 1.0
        n = torch.randint(0, self.sab.shape[0], (x0.shape[0],))
        sab, s1m = self._coef(n)
        noise = torch.randn_like(x0)
        self.unet.train()
        loss = F.mse_loss(self.unet(sab * x0 + s1m * noise, self.model_steps[n]), noise)
        gnorm = self._update(loss, None)
        return loss.detach(), gnorm
