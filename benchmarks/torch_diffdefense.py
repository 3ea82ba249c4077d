"""PyTorch twin of the DiffDefense reference's reconstruction loop, for benchmarks.

Written from the description of ``reconstructphase.py`` / ``DDPM.py`` (HondamunigePrasannaSilva/
DiffDefence) in ANCHORS.md section 6 and the DiffDefense paper, not from jaxrob's code. For one
input image the reference stacks ``R`` random initial noises ``z_T`` into one batch, runs
``L`` Adam steps (lr 0.02, betas (0.5, 0.999)) on the reconstruction MSE of a 15-step reverse
process whose eps-network runs under ``torch.no_grad()`` (the gradient reaches ``z`` through
the update's affine coefficients only), and keeps the restart with the lowest error. Images
are handled one after another.

Where this twin follows jaxrob's definition of the defence instead (so that both compute the
same function and the numerics check means something; the work per image is the same): the
reverse process is deterministic DDIM (eta = 0) over the arrays of a respaced jaxrob chain
handed in (``torch_purify.Chain``), the output is ``(x_0 + 1) / 2`` (clipped to [0, 1] for the
kept reconstruction), the objective is each restart's own mean squared error (summed over
restarts, not averaged), the learning rate stays 0.02, and the reconstruction is decoded from
``z`` after the last Adam step (the reference returns the image of its last evaluation, before
that step: ``L`` instead of ``L + 1`` reverse passes).

``exact=True`` differentiates through the eps-network as well (jaxrob's
``z_gradient="exact"``); ``batched=True`` runs all images' restarts as one batch (what a tuned
PyTorch port would do) instead of the reference's loop over images. torch is a benchmark
dependency only.
"""

from __future__ import annotations

import torch

__all__ = ["decode", "reconstruct"]


def decode(unet, z, chain, *, exact: bool, clip: bool):
    """The DDIM (eta = 0) reverse process from ``x_T = z`` over ``chain``, mapped to [0, 1]."""
    x = z
    batch = z.shape[0]
    for n in range(chain.num_steps - 1, -1, -1):
        t = torch.full((batch,), chain.model_steps[n], dtype=torch.long)
        if exact:
            eps = unet(x, t)
        else:
            with torch.no_grad():
                eps = unet(x, t)
        x0 = (x - chain.sqrt_one_minus_alphas_cumprod[n] * eps) / chain.sqrt_alphas_cumprod[n]
        x = (chain.alphas_cumprod_prev[n] ** 0.5 * x0
             + max(chain.one_minus_alphas_cumprod_prev[n], 0.0) ** 0.5 * eps)
    out = (x + 1.0) / 2.0
    return out.clamp(0.0, 1.0) if clip else out


def _search(unet, x, z_init, chain, *, iterations, lr, betas, exact):
    """x: (N, C, H, W) targets, z_init: (N, C, H, W) starts; returns (out, err, z)."""
    z = z_init.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr, betas=betas)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        out = decode(unet, z, chain, exact=exact, clip=False)
        ((out - x) ** 2).mean(dim=(1, 2, 3)).sum().backward()
        opt.step()
    with torch.no_grad():
        out = decode(unet, z.detach(), chain, exact=False, clip=True)
        err = ((out - x) ** 2).mean(dim=(1, 2, 3))
    return out, err, z.detach()


def reconstruct(unet, x, z_init, chain, *, iterations=4, lr=0.02, betas=(0.5, 0.999),
                exact=False, batched=False):
    """DiffDefense on a batch ``x`` (B, C, H, W) in [0, 1] from ``z_init`` (B, R, C, H, W).

    Returns:
      ``(x_rec (B, C, H, W), error (B,), restart (B,))``: per image the kept restart's
      reconstruction, its mean squared error and its index.
    """
    b, r = z_init.shape[:2]
    cl = torch.channels_last
    if batched:
        xs = x[:, None].expand(b, r, *x.shape[1:]).reshape(b * r, *x.shape[1:])
        out, err, _ = _search(unet, xs.contiguous(memory_format=cl),
                              z_init.reshape(b * r, *z_init.shape[2:]).contiguous(
                                  memory_format=cl), chain, iterations=iterations, lr=lr,
                              betas=betas, exact=exact)
        out, err = out.reshape(b, r, *x.shape[1:]), err.reshape(b, r)
    else:   # the reference: one image at a time, its restarts as the batch
        outs, errs = [], []
        for i in range(b):
            o, e, _ = _search(unet, x[i:i + 1].expand(r, *x.shape[1:]).contiguous(
                memory_format=cl), z_init[i].contiguous(memory_format=cl), chain,
                iterations=iterations, lr=lr, betas=betas, exact=exact)
            outs.append(o)
            errs.append(e)
        out, err = torch.stack(outs), torch.stack(errs)
    best = torch.argmin(err, dim=1)
    idx = torch.arange(b)
    return out[idx, best], err[idx, best], best
