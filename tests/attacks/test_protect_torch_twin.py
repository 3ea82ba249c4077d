"""The parity check of ``benchmarks/bench_protect.py`` on a tiny random LDM: jaxrob's VAE
weights written in diffusers' layout import back exactly, and the PyTorch twin of Diff-Protect's
AdvDM loop (``benchmarks/torch_protect.py``) gives jaxrob's per-example loss, input gradient and
first sign step on the same draws. Parameters from ``random_variables`` (no init program); the
networks have a few hundred parameters, so the two compiled calls take a few seconds.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables

from jaxrob.models import (
    Autoencoder,
    DiffusionModel,
    LatentDiffusionModel,
    autoencoder_from_config,
    autoencoder_from_diffusers_state_dict,
    schedule_from_metadata,
    unet_from_metadata,
)

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
# 8x8x1 images -> 4x4x2 codes (f = 2), mid attention in the VAE and attention in the UNet
AE = dict(block_out_channels=(4, 8), layers_per_block=1, latent_channels=2, num_groups=4,
          in_ch=1, image_size=8)
UNET = {"name": "unet", "config": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1,
                                   "attn_resolutions": [4], "dropout": 0.0, "num_groups": 4,
                                   "in_ch": 2, "image_size": 4}}
DIFFUSION = {"schedule": "linear", "num_steps": 50, "beta_start": 1e-4, "beta_end": 0.02}
EPS, STEP = 16 / 255, 1 / 255


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_protect
        import torch_protect
        import torch_unet
    finally:
        sys.path.remove(str(BENCH))
    return bench_protect, torch_protect, torch_unet


@pytest.fixture(scope="module")
def ldm():
    module = autoencoder_from_config(AE)
    ae = Autoencoder(module, random_variables(
        module, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32), seed=0),
        scaling_factor=0.6, shift_factor=0.1)
    unet = unet_from_metadata(UNET)
    variables = random_variables(unet, jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32),
                                 jax.ShapeDtypeStruct((1,), jnp.int32), seed=1)
    ddpm = DiffusionModel(unet, variables, schedule_from_metadata(DIFFUSION))
    return LatentDiffusionModel(ae, ddpm).with_fast_vjp()   # as the benchmark loads it


# 42 s on the loaded 2-core machine (load ~8; two compilations, the 1-step attack's scan and
# the vmapped gradient): over the CI budget; `python benchmarks/bench_protect.py --smoke` runs
# the same check on the committed LDM.
@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.diffusers
def test_torch_twin_matches_advdm_first_step(bench, ldm):
    import torch

    from jaxrob.attacks import advdm, advdm_loss
    from jaxrob.attacks._protect import _draw

    bp, tp, tu = bench
    ae = ldm.autoencoder
    sd = bp.diffusers_state_dict(ae.module, ae.variables)
    back = autoencoder_from_diffusers_state_dict(sd, ae.module)
    assert all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), b)), ae.variables, back)))

    x = jr.uniform(jr.key(0), (3, 8, 8, 1))
    keys = jr.split(jr.key(1), 3)

    @jax.jit
    def first_iteration(m, x, keys):
        def one(x_i, k_i):   # the attack's key convention for iteration 0, EoT sample 0
            k = jr.fold_in(jr.fold_in(jr.split(jr.fold_in(k_i, 0))[1], 0), 0)
            loss, g = jax.value_and_grad(
                lambda v: advdm_loss(m, v[None], k, encode_fn=m.encode_latent)[0])(x_i)
            n, noise = _draw(k, m.encode_latent(x_i[None]), m.schedule)
            return loss, g, n[0], noise[0]

        x1 = advdm(m, x, keys, encode_fn=m.encode_latent, eps=EPS, step_size=STEP,
                   num_steps=1).x_adv
        return (*jax.vmap(one)(x, keys), x1)

    loss, g, n, noise, x1 = (np.asarray(a) for a in first_iteration(ldm, x, keys))
    assert np.abs(g).max() > 0 and np.all(n >= 0)

    torch.manual_seed(0)
    unet = tu.load_jax_params(tu.TorchUNet(**UNET["config"]),
                              jax.tree.map(np.asarray, ldm.diffusion.variables["params"]))
    for p in unet.parameters():
        p.requires_grad_(False)
    sch = ldm.schedule
    s = tp.AdvDMSetup(tp.build_vae({**AE, "norm_eps": 1e-6}, sd), unet.eval(),
                      {k: np.asarray(getattr(sch, k)) for k in
                       ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "model_steps")},
                      0.6, 0.1)
    nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()
    xt = nchw(x).requires_grad_(True)
    n_t, noise_t = torch.from_numpy(n.astype(np.int64)), nchw(noise)
    loss_t = tp.advdm_loss(s, xt, n_t, noise_t)
    (g_t,) = torch.autograd.grad(loss_t.sum(), xt)
    np.testing.assert_allclose(loss_t.detach().numpy(), loss, rtol=1e-4)
    g_t = g_t.permute(0, 2, 3, 1).numpy()
    assert np.abs(g_t - g).max() < 1e-3 * np.abs(g).max()
    x1_t = tp.advdm(s, nchw(x), eps=EPS, step_size=STEP, num_steps=1, draws=[(n_t, noise_t)])
    assert np.mean(x1_t.permute(0, 2, 3, 1).numpy() == x1) >= 0.99
