"""guided-diffusion's ADM UNet: import, learned-sigma output, DiffusionModel / purifier, errors.

The parity tests against the independent PyTorch twin (``tests/models/_twin_adm.py``) are
marked ``torch``; everything else needs only numpy. Parameters come from
:func:`jaxrob.models.random_variables` (no ``module.init`` compilation); the tiny configuration
keeps every code path (resblock_updown, scale-shift norm, attention in encoder, middle and
decoder) at 8x8.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrob
from jaxrob.models import (
    ADM_CONFIGS,
    ADMUNet,
    DiffusionModel,
    adm_config_from_guided_diffusion,
    adm_from_config,
    adm_from_guided_diffusion_state_dict,
    adm_learned_log_variance,
    convert_guided_diffusion_checkpoint,
    load_guided_diffusion,
    random_variables,
)
from jaxrob.models._adm import _module_keys

TINY = dict(image_size=8, in_ch=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), num_head_channels=16, learn_sigma=True,
            use_scale_shift_norm=True, resblock_updown=True, dropout=0.0)


def _to_guided_diffusion(variables) -> dict[str, np.ndarray]:
    """Flax variables -> a state dict in guided-diffusion's names and PyTorch layouts."""
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        names = tuple(p.key for p in path)
        arr = np.asarray(leaf)
        if names[-1] == "kernel":
            arr = {4: lambda a: a.transpose(3, 2, 0, 1), 3: lambda a: a.transpose(2, 1, 0),
                   2: lambda a: a.T}[arr.ndim](arr)
        suffix = "bias" if names[-1] == "bias" else "weight"
        sd[f"{_module_keys(names[:-1])[0]}.{suffix}"] = np.ascontiguousarray(arr)
    return sd


# One compilation per (module, shapes) for the whole file: equal modules share it.
_apply = jax.jit(lambda module, variables, x, step: module.apply(variables, x, step),
                 static_argnums=0)


@functools.cache
def _tiny():
    """(module, variables, state dict, jitted apply) of the tiny configuration (built once)."""
    module = adm_from_config(TINY, output="eps_and_v")
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    step = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = random_variables(module, x, step, seed=1)
    return module, variables, _to_guided_diffusion(variables), functools.partial(_apply, module)


def _inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 8, 3)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)


def test_guided_diffusion_key_layout_of_tiny_config():
    _, _, sd, _ = _tiny()
    # the structure of guided-diffusion's UNetModel for ch_mult (1, 2), one ResBlock per level,
    # attention at 4x4, resblock_updown: input 0 conv, 1 res, 2 down-res, 3 res+attn; middle
    # res-attn-res; output 0 res+attn, 1 res+attn+up-res, 2 res, 3 res; out GN, conv
    for key, shape in {
        "time_embed.0.weight": (128, 32), "time_embed.2.weight": (128, 128),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift
        "input_blocks.2.0.in_layers.2.weight": (32, 32, 3, 3),  # the downsampling ResBlock
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.qkv.weight": (192, 64, 1), "input_blocks.3.1.proj_out.bias": (64,),
        "middle_block.1.norm.weight": (64,), "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "output_blocks.0.0.in_layers.0.weight": (128,), "output_blocks.1.1.qkv.bias": (192,),
        "output_blocks.1.2.out_layers.0.bias": (64,),  # the upsampling ResBlock
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.weight": (32,), "out.2.weight": (6, 32, 3, 3),
    }.items():
        assert sd[key].shape == shape, key
    assert not any(k.startswith(("input_blocks.4", "output_blocks.4")) for k in sd)


def test_import_round_trip_and_prefixes():
    module, variables, sd, _ = _tiny()
    got = adm_from_guided_diffusion_state_dict(sd, module)
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, variables))
    wrapped = {f"module.{k}": v for k, v in sd.items()}  # nn.DataParallel
    got = adm_from_guided_diffusion_state_dict(wrapped, {**TINY, "output": "eps"})
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, variables))


def test_eps_output_is_the_first_half_and_learned_variance_range():
    module, variables, _, fwd = _tiny()
    x, step = _inputs()
    both = fwd(variables, x, step)
    assert both.shape == (2, 8, 8, 6) and bool(jnp.all(jnp.isfinite(both)))
    eps = _apply(module.clone(output="eps"), variables, x, step)
    np.testing.assert_array_equal(eps, both[..., :3])
    # the step matters (a scalar step broadcasts: shapes only, no second compilation)
    other = fwd(variables, x, step + 100)
    assert float(jnp.abs(other - both).max()) > 1e-3
    assert jax.eval_shape(module.apply, variables, x, 7).shape == (2, 8, 8, 6)
    # learned variance: v = 1 is beta_n, v = -1 the (clipped) posterior variance
    sched = jaxrob.diffusion.linear_schedule(1000)
    n = jnp.array([0, 10, 999])
    ones = jnp.ones((3, 2, 2, 1))
    hi = adm_learned_log_variance(ones, n, sched)
    lo = adm_learned_log_variance(-ones, n, sched)
    mid = adm_learned_log_variance(0 * ones, n, sched)
    np.testing.assert_allclose(hi[:, 0, 0, 0], np.log(np.asarray(sched.betas)[[0, 10, 999]]),
                               rtol=1e-6)
    post = np.asarray(sched.posterior_variance)
    np.testing.assert_allclose(lo[:, 0, 0, 0], np.log(post[[1, 10, 999]]), rtol=1e-5)
    np.testing.assert_allclose(mid, (hi + lo) / 2, rtol=1e-6)


def test_diffusion_model_from_file_purifies_and_exports(tmp_path):
    module, variables, sd, fwd = _tiny()
    np.savez(tmp_path / "adm.npz", **sd)
    model = load_guided_diffusion(tmp_path / "adm.npz", TINY)
    assert isinstance(model, DiffusionModel) and isinstance(model.module, ADMUNet)
    assert model.module.output == "eps" and model.num_params == sum(v.size for v in sd.values())
    betas = np.asarray(model.schedule.betas)
    assert model.schedule.num_steps == 1000
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    x, step = _inputs()
    ref = _apply(model.module, variables, x, step)
    np.testing.assert_array_equal(ref, fwd(variables, x, step)[..., :3])
    # a DiffusionModel is an eps_fn: the purifiers take it unchanged
    purify = jaxrob.purify.diffpure(model, t_star=0.01, num_steps=2)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    out = jax.jit(purify)(images, jax.random.key(0))
    assert out.shape == images.shape and bool(jnp.all(jnp.isfinite(out)))
    # converted export -> jaxrob.models.load: the same model
    path = convert_guided_diffusion_checkpoint(tmp_path / "adm.npz", tmp_path / "export", TINY)
    loaded = jaxrob.models.load(path, kind="ddpm")
    assert isinstance(loaded.module, ADMUNet) and loaded.module == model.module
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, model.variables)
    np.testing.assert_array_equal(_apply(loaded.module, loaded.variables, x, step), ref)


def test_missing_and_extra_keys_are_listed():
    module, _, sd, _ = _tiny()
    bad = {k: v for k, v in sd.items()
           if k not in ("input_blocks.3.1.qkv.weight", "output_blocks.1.2.emb_layers.1.bias")}
    bad["output_blocks.1.2.h_upd.weight"] = np.zeros(3, np.float32)
    bad["middle_block.3.in_layers.0.weight"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError) as e:
        adm_from_guided_diffusion_state_dict(bad, module)
    msg = str(e.value)
    for key in ("input_blocks.3.1.qkv.weight", "output_blocks.1.2.emb_layers.1.bias",
                "output_blocks.1.2.h_upd.weight", "middle_block.3.in_layers.0.weight"):
        assert key in msg, (key, msg)
    assert "2 key(s) missing" in msg and "2 unexpected key(s)" in msg
    wrong = {**sd, "out.2.bias": np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match=r"out\.2\.bias: expected shape \(6,\), got \(7,\)"):
        adm_from_guided_diffusion_state_dict(wrong, module)


@pytest.mark.parametrize("change, match", [
    ({"ch": 64}, r"model_channels: checkpoint 32, configuration 64"),
    ({"learn_sigma": False}, r"out_channels: checkpoint 6, configuration 3"),
    ({"ch_mult": (1, 2, 2)}, r"input_blocks: checkpoint 4, configuration 6"),
    ({"num_res_blocks": 2}, r"output_blocks: checkpoint 4, configuration 6"),
])
def test_checkpoint_of_another_architecture_is_refused(change, match):
    _, _, sd, _ = _tiny()
    with pytest.raises(ValueError, match="another architecture than the configuration"):
        adm_from_guided_diffusion_state_dict(sd, {**TINY, **change})
    with pytest.raises(ValueError, match=match):
        adm_from_guided_diffusion_state_dict(sd, {**TINY, **change})


def test_class_conditional_or_foreign_state_dicts_are_refused():
    _, _, sd, _ = _tiny()
    cond = {**sd, "label_emb.weight": np.zeros((1000, 128), np.float32)}
    with pytest.raises(ValueError, match=r"class_conditional: checkpoint True"):
        adm_from_guided_diffusion_state_dict(cond, TINY)
    diffusers = {"conv_in.weight": np.zeros((32, 3, 3, 3)), "down_blocks.0.resnets.0.norm1.weight":
                 np.zeros(32)}
    with pytest.raises(ValueError, match="not a guided-diffusion UNetModel state dict"):
        adm_from_guided_diffusion_state_dict(diffusers, TINY)


def test_bad_inputs_and_configs_raise_clearly(tmp_path):
    module, variables, _, _ = _tiny()
    with pytest.raises(ValueError, match=r"configured for 8x8 inputs"):
        module.apply(variables, jnp.zeros((1, 16, 16, 3)), jnp.array([1]))
    with pytest.raises(ValueError, match=r"step: expected shape \(2,\)"):
        module.apply(variables, jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="needs learn_sigma=True"):
        adm_from_config(TINY, learn_sigma=False, output="eps_and_v").apply(
            variables, jnp.zeros((1, 8, 8, 3)), jnp.array([1]))
    with pytest.raises(ValueError, match="output: expected one of"):
        adm_from_config(TINY, output="v")
    with pytest.raises(ValueError, match=r"unknown ADMUNet argument\(s\) \['num_channels'\]"):
        adm_from_config({**TINY, "num_channels": 32})
    with pytest.raises(ValueError, match="expected one of .*imagenet256_uncond"):
        adm_from_config("imagenet64")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_guided_diffusion(tmp_path / "256x256_diffusion_uncond.pt")
    with pytest.raises(ValueError, match="class-conditional"):
        adm_config_from_guided_diffusion({"image_size": 64, "num_channels": 192,
                                          "num_res_blocks": 3, "class_cond": True})


# DiffPure's configs/imagenet.yml ``model`` section over guided-diffusion's
# model_and_diffusion_defaults() (the arguments DiffPure passes to create_model_and_diffusion).
GD_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
                   num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="16,8",
                   channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
                   use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
                   use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
                   noise_schedule="linear", timestep_respacing="", use_kl=False,
                   predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
DIFFPURE_IMAGENET = dict(attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000,
                         rescale_timesteps=True, timestep_respacing="1000", image_size=256,
                         learn_sigma=True, noise_schedule="linear", num_channels=256,
                         num_head_channels=64, num_res_blocks=2, resblock_updown=True,
                         use_fp16=True, use_scale_shift_norm=True)


def test_diffpure_imagenet_arguments_translate_to_the_named_config():
    cfg = adm_config_from_guided_diffusion({**GD_DEFAULTS, **DIFFPURE_IMAGENET})
    assert adm_from_config(cfg) == adm_from_config("imagenet256_uncond")
    # UNetModel's own keyword arguments (attention as downsampling rates) give the same model
    unet_kwargs = dict(image_size=256, in_channels=3, model_channels=256, out_channels=6,
                       num_res_blocks=2, attention_resolutions=(8, 16, 32), dropout=0.0,
                       channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, num_head_channels=64,
                       use_scale_shift_norm=True, resblock_updown=True)
    cfg2 = adm_config_from_guided_diffusion(unet_kwargs)
    assert set(cfg2["attn_resolutions"]) == set(ADM_CONFIGS["imagenet256_uncond"][
        "attn_resolutions"])
    assert adm_from_config(cfg2, attn_resolutions=(32, 16, 8)) == adm_from_config(
        "imagenet256_uncond")


# --------------------------------------------------------------- parity with the PyTorch twin
# tests/models/_twin_adm.py (written independently, branch `twins`): build_adm(cfg) with
# guided-diffusion's create_model arguments, non-degenerate random weights (no zero-init paths).


@pytest.fixture(scope="module")
def twin():
    """The twin module (imported after the torch marker has had its say)."""
    import importlib

    return importlib.import_module("_twin_adm")


def _parity(twin, cfg, batch, steps, atol=1e-4):
    torch = pytest.importorskip("torch")
    ref_model = twin.build_adm(cfg)
    module = adm_from_config(adm_config_from_guided_diffusion(cfg), output="eps_and_v")
    variables = adm_from_guided_diffusion_state_dict(ref_model.state_dict(), module)
    size = module.image_size
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    for step in steps:
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(step))
        ref = ref.numpy().transpose(0, 2, 3, 1)
        out = np.asarray(_apply(module, variables, jnp.asarray(x), jnp.asarray(step)))
        assert out.shape == ref.shape == (batch, size, size, 6)
        assert np.abs(ref).max() > 0.1  # a non-trivial output
        err = np.abs(out - ref)
        # eps (channels 0-2) and the learned-variance interpolation v (channels 3-5) apart
        print(f"ADM parity {size}x{size} steps {step.tolist()}: max |eps err| "
              f"{err[..., :3].max():.3g} (max |eps| {np.abs(ref[..., :3]).max():.3g}), "
              f"max |v err| {err[..., 3:].max():.3g} (max |v| {np.abs(ref[..., 3:]).max():.3g})")
        np.testing.assert_allclose(out, ref, rtol=0, atol=atol)
    return ref_model, module, variables


@pytest.mark.torch
def test_matches_pytorch_twin_small(twin):
    # SMALL_CONFIG: DiffPure's options (learn_sigma, resblock_updown, scale-shift norm, legacy
    # attention order, 16-channel heads) at 16x16; integer and fractional step labels
    # (both as float32 labels: one compilation; integer-valued floats embed like integers)
    _parity(twin, twin.SMALL_CONFIG, 3,
            [np.array([0, 500, 999], np.float32), np.array([0.5, 10.25, 999.9], np.float32)])


@pytest.mark.torch
@pytest.mark.slow  # ~one more compilation; test_matches_pytorch_twin_small covers the default path
def test_matches_pytorch_twin_other_options(twin):
    # conv resampling, additive step conditioning, the new attention order, num_heads heads
    cfg = {**twin.SMALL_CONFIG, "resblock_updown": False, "use_scale_shift_norm": False,
           "use_new_attention_order": True, "num_head_channels": -1, "num_heads": 2,
           "learn_sigma": True, "seed": 3}
    _parity(twin, cfg, 2, [np.array([3, 731])])


@pytest.mark.torch
def test_full_config_layout_matches_twin(twin):
    # every key and shape of DiffPure's 552M-parameter model, from shapes only (meta device)
    from jaxrob.models._adm import _expected_shapes
    from jaxrob.models._torch_import import flax_to_torch_shape

    ref = {k: tuple(v.shape) for k, v in
           twin.build_adm(twin.FULL_CONFIG, device="meta").state_dict().items()}
    module = adm_from_config(adm_config_from_guided_diffusion(twin.FULL_CONFIG))
    assert module == adm_from_config("imagenet256_uncond")
    ours = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(_expected_shapes(module))[0]:
        names = tuple(p.key for p in path)[1:]
        suffix = "bias" if names[-1] == "bias" else "weight"
        ours[f"{_module_keys(names[:-1])[0]}.{suffix}"] = flax_to_torch_shape(leaf.shape,
                                                                             names[-1])
    assert sorted(set(ref) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == 552_814_086


@pytest.mark.torch
@pytest.mark.slow  # 552M parameters: ~2.2 GB per copy, 8.2 GB peak RSS on CPU (twin, numpy,
# JAX); test_full_config_layout_matches_twin checks the same layout from shapes only
def test_matches_pytorch_twin_full_config(twin):
    # run 2026-12-01 (nice 19, 2-core CPU loaded by another evaluation): passed, 4 min 54 s
    # wall, 144 CPU-s, max |eps err| 7.8e-6 (max |eps| 2.7), max |v err| 8.8e-6 (max |v| 2.9)
    ref_model, _, variables = _parity(twin, twin.FULL_CONFIG, 1, [np.array([150])])
    assert sum(p.numel() for p in ref_model.parameters()) == 552_814_086
    assert sum(v.size for v in jax.tree.leaves(variables)) == 552_814_086
