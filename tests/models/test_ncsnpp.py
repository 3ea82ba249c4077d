"""score_sde's DDPM++ (jaxrob.models.NCSNpp): parity with an independent PyTorch twin, the
importer's errors, and the model inside DiffPure's VP-SDE purifier and jaxrob.models.load.

The twin (tests/models/_twin_ncsnpp.py) is a separate reading of score_sde_pytorch with the
published checkpoint's key names; parity tests need torch (``-m torch``). The other tests build a
tiny model from ``random_variables`` (no ``module.init`` compile) and a state dict in the
PyTorch layout from it, so they run without torch.
"""

import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob._keys as tags
import jaxrob.purify as jp
from jaxrob.checkpoint import save_params
from jaxrob.models import (
    DiffusionModel,
    NCSNpp,
    load,
    load_score_sde,
    ncsnpp_config_from_score_sde,
    ncsnpp_export_metadata,
    ncsnpp_from_config,
    ncsnpp_from_state_dict,
    random_variables,
    vp_schedule,
)
from jaxrob.models._ncsnpp import _expected_variables, _module_keys, _trainable_torch_names
from jaxrob.models._torch_import import flax_to_torch_shape

HERE = pathlib.Path(__file__).resolve().parent
# 8x8 images, two levels, attention at 4x4, one block per level: ~60k parameters
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
            dropout=0.0)


def _twin():
    spec = importlib.util.spec_from_file_location("_twin_ncsnpp", HERE / "_twin_ncsnpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _variables(module, seed=0):
    s = module.image_size
    return random_variables(module, jax.ShapeDtypeStruct((1, s, s, module.num_channels),
                                                         jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.float32), seed=seed)


def _as_torch_state_dict(module, variables):
    """The PyTorch-layout state dict of ``variables`` (inverse of the importer's mapping), with
    the ``sigmas`` buffer the score_sde module registers."""
    keys = _module_keys(module)
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias", "W": "W", "b": "b"}
    out = {"sigmas": np.geomspace(50, 0.01, module.num_scales)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        names = tuple(p.key for p in path)
        arr = np.asarray(leaf)
        if names[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
        assert arr.shape == flax_to_torch_shape(leaf.shape, names[-1])
        out[f"{keys(names[:-1])[0]}.{suffix[names[-1]]}"] = arr
    return out


@pytest.fixture(scope="module")
def tiny():
    module = ncsnpp_from_config(TINY)
    variables = _variables(module)
    return module, variables, jax.jit(module.apply)


# --------------------------------------------------------------------------- parity (torch)


def _parity(cfg, batch_labels, seed=0):
    """Max abs difference of the twin and the imported JAX model on random inputs; the twin's
    raw weights, and its EMA weights through a score_sde training checkpoint."""
    import torch

    twin = _twin()
    net = twin.build_ncsnpp(cfg)
    module = ncsnpp_from_config(ncsnpp_config_from_score_sde(cfg))
    sd = net.state_dict()
    variables = ncsnpp_from_state_dict(sd, module)
    s, c = module.image_size, module.num_channels
    x = np.random.default_rng(seed).standard_normal((len(batch_labels), s, s, c))
    x = x.astype(np.float32)
    labels = np.asarray(batch_labels, np.float32)
    fwd = jax.jit(module.apply)

    def err(vs):
        with torch.no_grad():
            ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(labels))
        ref = ref.numpy().transpose(0, 2, 3, 1)
        out = np.asarray(fwd(vs, x, labels))
        assert out.shape == ref.shape
        return float(np.abs(out - ref).max()), float(np.abs(ref).max())

    raw_err, scale = err(variables)
    # a training checkpoint: DataParallel names, EMA weights differing from the raw ones
    gen = torch.Generator().manual_seed(seed + 1)
    shadow = [p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
              for p in net.parameters() if p.requires_grad]
    ckpt = {"model": {"module." + k: v for k, v in sd.items()},
            "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow},
            "optimizer": {"state": {}, "param_groups": []}, "step": 3}
    assert jax.tree.all(jax.tree.map(np.array_equal, variables,
                                     ncsnpp_from_state_dict(ckpt, module, use_ema=False)))
    ema_vars = ncsnpp_from_state_dict(ckpt, module)
    twin.copy_ema(net, shadow)
    ema_err, _ = err(ema_vars)
    return module, variables, raw_err, ema_err, scale


@pytest.mark.torch
def test_small_config_matches_the_pytorch_twin():
    twin = _twin()
    # labels t * 999 at t = 1e-3 (DiffPure's last step), 0.1 (its t*), 0.73 and 1
    module, _, raw_err, ema_err, scale = _parity(twin.SMALL_CONFIG, [0.999, 99.9, 729.27, 999.0])
    assert module.num_res_blocks == 1 and module.image_size == 16
    assert scale > 0.1  # a non-degenerate output
    assert raw_err < 1e-4 and ema_err < 1e-4, (raw_err, ema_err)


# ~1-2 min on 2 CPU cores (107M parameters, 32x32 attention); the small-config test above
# covers the same code path in CI
@pytest.mark.slow
@pytest.mark.torch
def test_full_config_matches_the_pytorch_twin():
    twin = _twin()
    start = time.perf_counter()
    module, variables, raw_err, ema_err, scale = _parity(twin.FULL_CONFIG, [0.999, 99.9])
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables))
    print(f"\nfull DDPM++ parity: max abs err raw {raw_err:.2e}, EMA {ema_err:.2e} (output "
          f"scale {scale:.2f}), {n} parameters, {time.perf_counter() - start:.1f} s")
    assert n == 106_632_579 == sum(p.numel() for p in twin.build_ncsnpp(
        twin.FULL_CONFIG, device="meta").parameters())
    assert module == ncsnpp_from_config("cifar10_ddpmpp_deep_continuous")
    assert raw_err < 1e-4 and ema_err < 1e-4, (raw_err, ema_err)


# --------------------------------------------------------------------------- bad input


def test_import_round_trip_and_bad_checkpoints(tiny):
    module, variables, _ = tiny
    sd = _as_torch_state_dict(module, variables)
    back = ncsnpp_from_state_dict({"module." + k: v for k, v in sd.items()}, module)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, jax.device_get(variables)))

    # missing and extra keys are all listed
    bad = dict(sd)
    del bad["all_modules.0.weight"], bad["all_modules.6.NIN_2.W"]
    bad["all_modules.3.Conv_9.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError) as e:
        ncsnpp_from_state_dict(bad, module)
    msg = str(e.value)
    for key in ("all_modules.0.weight", "all_modules.6.NIN_2.W", "all_modules.3.Conv_9.weight"):
        assert key in msg
    assert "2 key(s) missing" in msg and "1 unexpected key(s)" in msg

    # a checkpoint of another architecture (two blocks per level) for the one-block config
    deeper = ncsnpp_from_config(TINY, num_res_blocks=2)
    shapes = _expected_variables(deeper)
    sd_deeper = _as_torch_state_dict(deeper, jax.tree.map(lambda s: np.ones(s.shape), shapes))
    with pytest.raises(ValueError, match="another architecture.*num_res_blocks=1"):
        ncsnpp_from_state_dict(sd_deeper, module)
    # ... and its EMA (shadow_params) through a training checkpoint
    shadow = [sd_deeper[k] for k in _trainable_torch_names(deeper, shapes)]
    with pytest.raises(ValueError, match=r"EMA holds \d+ tensors.*another architecture"):
        ncsnpp_from_state_dict({"model": sd_deeper, "ema": {"shadow_params": shadow}}, module)
    # another network family altogether (a diffusers / Ho et al. UNet)
    with pytest.raises(ValueError, match="not a score_sde NCSN"):
        ncsnpp_from_state_dict({"conv_in.weight": np.zeros((8, 3, 3, 3))}, module)
    with pytest.raises(ValueError, match="use_ema=False"):
        ncsnpp_from_state_dict({"model": sd, "step": 1}, module)
    with pytest.raises(TypeError, match="state dict"):
        ncsnpp_from_state_dict([1, 2], module)


def test_unsupported_configs_and_inputs_are_refused(tiny):
    module, variables, _ = tiny
    score_sde = {"model": {**TINY, "name": "ncsnpp", "fir": True, "progressive": "output_skip",
                           "scale_by_sigma": False},
                 "data": {"image_size": 8, "centered": True}, "training": {"sde": "vesde"}}
    with pytest.raises(ValueError, match="fir=True.*progressive='output_skip'.*'vesde'"):
        ncsnpp_config_from_score_sde(score_sde)
    with pytest.raises(ValueError, match="resblock_type"):
        ncsnpp_from_config(TINY, resblock_type="bigan")
    with pytest.raises(ValueError, match="unknown attribute"):
        ncsnpp_from_config({**TINY, "n_f": 3})
    with pytest.raises(ValueError, match="expected one of"):
        ncsnpp_from_config("cifar10_ncsnpp")
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="x_t"):
        jax.eval_shape(module.apply, variables, jnp.zeros((2, 16, 16, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="labels: expected shape"):
        jax.eval_shape(module.apply, variables, x, jnp.ones(3))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_score_sde("/nonexistent/nowhere.pth", module)


# --------------------------------------------------------------------------- in the pipeline


def test_vp_sde_purifier_uses_the_score_as_diffpure_does(tiny, tmp_path):
    """``diffpure(model, sampler="sde")`` over the DDPM++ model runs DiffPure's reverse VP-SDE:
    Euler-Maruyama with score ``-model(x, t * 999) / sqrt(1 - exp(-0.5 (b1 - b0) t^2 - b0 t))``
    (score_sde ``get_score_fn``, DiffPure ``RevVPSDE``), written out here step by step."""
    module, variables, fwd = tiny
    model = DiffusionModel(module, variables, vp_schedule(module))
    # DiffPure's discrete_betas: linspace(beta_min / N, beta_max / N, N)
    assert np.allclose(np.asarray(model.schedule.betas)[[0, -1]], [1e-4, 0.02])
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    key = jr.key(3)
    t_star, steps = 0.1, 2
    out = jax.jit(jp.diffpure(model, t_star=t_star, num_steps=steps, sampler="sde"))(x, key)

    b0, b1 = 0.1, 20.0
    abar = lambda t: np.exp(-0.5 * (b1 - b0) * t**2 - b0 * t)
    h = 2 * x - 1
    z = jr.normal(jr.fold_in(key, tags.PURIFY_FORWARD), h.shape)
    h = np.sqrt(abar(t_star)) * h + np.sqrt(1 - abar(t_star)) * z
    dt = t_star / steps
    for k in range(steps):
        t = t_star - k * dt
        labels = jnp.full((2,), t * 999, jnp.float32)
        score = -fwd(variables, h, labels) / np.sqrt(1 - abar(t))
        beta = b0 + t * (b1 - b0)
        noise = jr.normal(jr.fold_in(jr.fold_in(key, tags.PURIFY_REVERSE), k), h.shape)
        h = h + (0.5 * beta * h + beta * score) * dt + np.sqrt(beta * dt) * noise
    np.testing.assert_allclose(out, np.clip((h + 1) / 2, 0, 1), atol=2e-5)

    # the converted export: jaxrob.models.load rebuilds the same model
    save_params(tmp_path / "ddpmpp", variables, ncsnpp_export_metadata(module))
    loaded = load(tmp_path / "ddpmpp", kind="ddpm")
    assert isinstance(loaded.module, NCSNpp) and loaded.module == module
    np.testing.assert_array_equal(loaded.schedule.betas, model.schedule.betas)
    lab = jnp.array([1.0, 500.0])
    np.testing.assert_array_equal(fwd(loaded.variables, x, lab), fwd(variables, x, lab))
    # one call on a state-dict file (here an .npz in the PyTorch layout)
    np.savez(tmp_path / "ddpmpp.npz", **_as_torch_state_dict(module, variables))
    direct = load_score_sde(tmp_path / "ddpmpp.npz", TINY)
    assert direct.module == module
    assert jax.tree.all(jax.tree.map(np.array_equal, direct.variables, variables))
