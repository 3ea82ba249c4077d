"""PyTorch twin of Diff-Protect's AdvDM loop on a small latent diffusion model, for benchmarks.

Written from the description of Diff-Protect (``code/diff_mist.py`` with advertorch's
``LinfPGDAttack``; ANCHORS.md section 5), not from jaxrob's code. Per iteration the reference
encodes the current image with the LDM's VAE (``get_first_stage_encoding(encode_first_stage(
x))``), draws a timestep ``t ~ U{0..T-1}`` and noise ``eps ~ N(0, I)`` per example, noises the
latent (``sqrt(abar_t) z + sqrt(1 - abar_t) eps``), predicts the noise with the UNet, takes the
MSE (the LDM's training loss, a mean over the batch), backpropagates to the pixel input,
steps by ``step_size * sign(grad)`` (ascending for AdvDM "+", descending for "-") and projects
onto the Linf eps-ball and the valid pixel range.

The networks are the LDM's own: a diffusers ``AutoencoderKL`` (the layout jaxrob's
``AutoencoderKL`` imports; the weights come from a jaxrob export, see :func:`build_vae`) and
``torch_unet.TorchUNet``. Images are [0, 1] NCHW here (the reference works in [-1, 1] with the
eps and step doubled: the same iterates).

Two variants (``reference_overheads``):

* ``False`` (``torch_lean``, the fair comparison): what a tuned port does -- parameters frozen,
  ``torch.autograd.grad`` of the loss w.r.t. the image only, the posterior mean as the latent
  (jaxrob's ``encode_latent(x)``, so the numerics check can compare the two);
* ``True`` (``torch_ref``): the reference's work as written -- the UNet's parameters require
  gradients (the LDM is loaded for training and never frozen), so ``loss.backward()`` also
  computes and accumulates their gradients every iteration; the latent is a posterior sample;
  and every iteration also encodes the target image and runs the UNet on it
  (``target_model.forward`` computes both components before choosing the AdvDM term).

torch and diffusers are benchmark/test dependencies only; nothing in ``jaxrob/`` imports this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["AdvDMSetup", "advdm", "advdm_loss", "build_vae", "diffusers_vae_config",
           "diffusion_loss"]


def diffusers_vae_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` arguments of a jaxrob ``AutoencoderKL``'s fields (the inverse
    of ``jaxrob.models.autoencoder_config_from_diffusers``)."""
    boc = [int(c) for c in cfg["block_out_channels"]]
    if float(cfg.get("norm_eps", 1e-6)) != 1e-6:
        raise ValueError(f"diffusers' AutoencoderKL fixes GroupNorm eps at 1e-6, got "
                         f"{cfg['norm_eps']}")
    out_ch = cfg.get("out_ch")
    return dict(in_channels=int(cfg["in_ch"]),
                out_channels=int(cfg["in_ch"] if out_ch is None else out_ch),
                down_block_types=["DownEncoderBlock2D"] * len(boc),
                up_block_types=["UpDecoderBlock2D"] * len(boc),
                block_out_channels=boc, layers_per_block=int(cfg["layers_per_block"]),
                act_fn="silu", latent_channels=int(cfg["latent_channels"]),
                norm_num_groups=int(cfg["num_groups"]),
                sample_size=int(cfg.get("image_size") or 32),
                use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                mid_block_add_attention=bool(cfg.get("mid_attention", True)))


def build_vae(cfg: Mapping[str, Any], state_dict: Mapping[str, np.ndarray]):
    """A frozen diffusers ``AutoencoderKL`` (eval, channels_last) with ``state_dict`` loaded
    strictly (every key present, none left over)."""
    import diffusers

    vae = diffusers.AutoencoderKL(**diffusers_vae_config(cfg))
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}
    vae.load_state_dict(sd, strict=True)
    vae = vae.to(memory_format=torch.channels_last).eval()
    for p in vae.parameters():   # the reference freezes the first stage too
        p.requires_grad_(False)
    return vae


class AdvDMSetup:
    """The LDM pieces the loop needs: VAE, UNet, latent scale/shift and the training schedule.

    Args:
      vae: diffusers ``AutoencoderKL``.
      unet: ``TorchUNet`` on the latents.
      schedule: ``{"sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "model_steps"}``
        arrays of the latent DDPM's training schedule.
      scaling_factor, shift_factor: ``z = (u - shift) * scaling`` for a posterior draw ``u``.
    """

    def __init__(self, vae, unet, schedule, scaling_factor, shift_factor=0.0):
        self.vae, self.unet = vae, unet
        self.sqrt_ab = torch.from_numpy(np.array(schedule["sqrt_alphas_cumprod"], np.float32))
        self.sqrt_1mab = torch.from_numpy(np.array(schedule["sqrt_one_minus_alphas_cumprod"],
                                                   np.float32))
        self.model_steps = torch.from_numpy(np.array(schedule["model_steps"], np.int64))
        self.num_steps = int(self.sqrt_ab.shape[0])
        self.scaling, self.shift = float(scaling_factor), float(shift_factor)

    def latent_shape(self, x):
        """``(C, h, w)`` of the latent of NCHW images ``x``."""
        c = self.vae.config
        f = 2 ** (len(c.block_out_channels) - 1)
        return int(c.latent_channels), x.shape[2] // f, x.shape[3] // f

    def latent(self, x01, *, sample: bool):
        post = self.vae.encode(2.0 * x01 - 1.0).latent_dist
        u = post.sample() if sample else post.mean
        return (u - self.shift) * self.scaling

    def draw(self, shape, generator=None):
        """Per-example schedule positions (B,) and noise of ``shape`` (B, C, h, w)."""
        n = torch.randint(0, self.num_steps, (shape[0],), generator=generator)
        return n, torch.randn(shape, generator=generator)


def diffusion_loss(s: AdvDMSetup, z, n, noise):
    """Per-example ``mean((eps_hat(z_n, n) - eps)^2)`` over the latent ``z``."""
    z_t = s.sqrt_ab[n].view(-1, 1, 1, 1) * z + s.sqrt_1mab[n].view(-1, 1, 1, 1) * noise
    eps_hat = s.unet(z_t.contiguous(memory_format=torch.channels_last), s.model_steps[n])
    return ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))


def advdm_loss(s: AdvDMSetup, x01, n, noise, *, sample: bool = False):
    """:func:`diffusion_loss` of the scaled code of ``x01`` (posterior mean, or a sample)."""
    return diffusion_loss(s, s.latent(x01, sample=sample), n, noise)


def advdm(s: AdvDMSetup, x, *, eps: float, step_size: float, num_steps: int,
          direction: float = 1.0, generator=None, draws=None, reference_overheads=False,
          x_target=None):
    """Diff-Protect's AdvDM loop (no random start): ``num_steps`` sign steps on ``x`` (B, C, H, W)
    in [0, 1]; returns the last iterate.

    Args:
      draws: None (draw ``n``, ``eps`` every iteration from ``generator``) or a list of
        ``(n, noise)`` per iteration (the numerics check hands jaxrob's draws over).
      reference_overheads: do the reference's extra work (module docstring); needs
        ``x_target`` (the image the reference's loss also encodes, unused for AdvDM).
    """
    x = x.contiguous(memory_format=torch.channels_last)
    x_adv = x.clone()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    for k in range(num_steps):
        x_adv.requires_grad_(True)
        if reference_overheads:
            # target_model.forward computes the target's components too (graph kept, unused)
            zy = s.latent(x_target, sample=True)
            _ = diffusion_loss(s, zy, *s.draw(zy.shape, generator))
        if draws is None:
            n, noise = s.draw((x.shape[0], *s.latent_shape(x)), generator)
        else:
            n, noise = draws[k]
        loss = advdm_loss(s, x_adv, n, noise, sample=reference_overheads).mean()
        if reference_overheads:
            loss.backward()   # UNet parameter gradients accumulate, as in the reference
            g = x_adv.grad
        else:
            (g,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = torch.minimum(torch.maximum(x_adv + direction * step_size * g.sign(), lo), hi)
    return x_adv.detach()
