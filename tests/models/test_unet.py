"""Tests for the Ho et al. DDPM UNet (jaxrob.models._unet)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables

from jaxrob.models import UNET_CONFIGS, UNet, timestep_embedding, unet_from_config


def _n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _shape_init(model, batch, size, channels):
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    step = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(model.init, jr.key(0), x, step)


@pytest.fixture(scope="module")
def digits():
    model = unet_from_config("digits")
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)
    return model, random_variables(model, x, jnp.zeros((2,), jnp.int32))


@pytest.fixture(scope="module")
def fwd(digits):
    # Jitted everywhere: eager Flax dispatches op by op and is slow on the shared CPU.
    model, _ = digits
    return jax.jit(model.apply, static_argnames="train")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", 35_746_307),  # Ho et al. / google/ddpm-cifar10-32
        ("mnist", 1_112_801),
        ("digits", 701_345),
    ],
)
def test_param_counts(name, expected):
    cfg = UNET_CONFIGS[name]
    variables = _shape_init(unet_from_config(name), 1, cfg["image_size"], cfg["in_ch"])
    assert set(variables) == {"params"}
    assert _n_params(variables) == expected


def test_default_unet_is_the_cifar10_network():
    # The bare constructor defaults are Ho et al.'s CIFAR-10 hyper-parameters.
    variables = _shape_init(UNet(), 1, 32, 3)
    assert _n_params(variables) == 35_746_307


def test_attention_placed_by_resolution():
    params = _shape_init(unet_from_config("cifar10"), 1, 32, 3)["params"]
    attn = sorted(k for k in params if "attn" in k)
    # Level 1 is 16x16: 2 encoder + 3 decoder attention blocks, plus the middle one.
    assert attn == [
        "down_1_attn_0",
        "down_1_attn_1",
        "mid_attn",
        "up_1_attn_0",
        "up_1_attn_1",
        "up_1_attn_2",
    ]
    params = _shape_init(unet_from_config("mnist"), 1, 28, 1)["params"]
    assert sorted(k for k in params if "attn" in k) == [
        "down_2_attn_0",
        "mid_attn",
        "up_2_attn_0",
        "up_2_attn_1",
    ]


@pytest.mark.parametrize("name, batch", [("cifar10", 2), ("mnist", 3), ("digits", 1)])
def test_output_shapes(name, batch):
    cfg = UNET_CONFIGS[name]
    model = unet_from_config(name)
    x = jax.ShapeDtypeStruct(
        (batch, cfg["image_size"], cfg["image_size"], cfg["in_ch"]), jnp.float32
    )
    out, _ = jax.eval_shape(
        model.init_with_output, jr.key(0), x, jax.ShapeDtypeStruct((batch,), jnp.float32)
    )
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_out_ch_and_step_broadcast():
    model = UNet(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, out_ch=6
    )
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    out, _ = jax.eval_shape(model.init_with_output, jr.key(0), x, 7)  # scalar step
    assert out.shape == (2, 8, 8, 6)


# The tests below share one compiled forward of the digits UNet at batch 2 with float32 steps
# (each extra compilation costs seconds on the shared CPU).
def test_forward_steps_and_batch_independence(digits, fwd):
    _, variables = digits
    x = jr.normal(jr.key(2), (2, 8, 8, 1))
    out = fwd(variables, x, jnp.array([10.0, 10.0]))
    assert out.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
    # Integer labels are the same as their float values; fractional labels change the output.
    np.testing.assert_allclose(fwd(variables, x, jnp.array([10, 10])), out, atol=1e-5)
    out_frac = fwd(variables, x, jnp.array([10.0, 10.5]))
    np.testing.assert_allclose(out_frac[0], out[0], atol=1e-6)
    assert float(jnp.max(jnp.abs(out_frac[1] - out[1]))) > 1e-4
    # No mixing across the batch (GroupNorm): changing example 1 leaves example 0 unchanged.
    x2 = x.at[1].set(jr.normal(jr.key(3), (8, 8, 1)))
    out2 = fwd(variables, x2, jnp.array([10.0, 10.0]))
    np.testing.assert_allclose(out2[0], out[0], atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[1] - out[1]))) > 1e-3


def test_jit_compiles_once(digits, fwd):
    _, variables = digits
    fwd(variables, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)))
    before = fwd._cache_size()
    for i in range(3):
        x = jr.normal(jr.key(i), (2, 8, 8, 1))
        fwd(variables, x, jnp.array([i, 2.5 * i])).block_until_ready()
    assert fwd._cache_size() == before


def test_dropout_train_mode(digits, fwd):
    _, variables = digits
    x = jr.normal(jr.key(4), (2, 8, 8, 1))
    step = jnp.array([1.0, 2.0])
    eval_out = fwd(variables, x, step)
    a = fwd(variables, x, step, train=True, rngs={"dropout": jr.key(0)})
    b = fwd(variables, x, step, train=True, rngs={"dropout": jr.key(0)})
    c = fwd(variables, x, step, train=True, rngs={"dropout": jr.key(1)})
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 0
    assert float(jnp.max(jnp.abs(a - eval_out))) > 0
    with pytest.raises(Exception, match="dropout"):
        fwd(variables, x, step, train=True)


# input gradients of the UNet are taken by every purifier-gradient test in CI
@pytest.mark.slow
def test_grad_wrt_input_is_finite(digits):
    model, variables = digits
    x = jr.normal(jr.key(5), (2, 8, 8, 1))
    loss = lambda x: jnp.sum(model.apply(variables, x, jnp.array([50.0, 3.0])) ** 2)
    g = jax.jit(jax.grad(loss))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g))) > 0


def test_zero_init():
    # The smallest UNet and an rbg key: compiling threefry initialisers costs 10-20 s here.
    model = UNet(
        ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, zero_init=True
    )
    x = jr.normal(jr.key(0), (1, 4, 4, 1))
    out, variables = jax.jit(model.init_with_output)(jr.key(0, impl="rbg"), x, jnp.array([1]))
    params = variables["params"]
    assert float(jnp.max(jnp.abs(out))) < 1e-3
    assert float(jnp.max(jnp.abs(params["conv_out"]["kernel"]))) < 1e-4
    assert float(jnp.max(jnp.abs(params["mid_attn"]["proj_out"]["kernel"]))) < 1e-4
    assert float(jnp.max(jnp.abs(params["conv_in"]["kernel"]))) > 1e-2


def test_timestep_embedding():
    step = jnp.array([0, 1, 250])
    emb = timestep_embedding(step, 8)
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    # Ho et al.: frequencies exp(-log(10000) * i / (half - 1)), so the last one is 1/10000.
    np.testing.assert_allclose(emb[1, :4], np.sin(10000.0 ** (-np.arange(4) / 3)), rtol=1e-6)
    flipped = timestep_embedding(step, 8, flip_sin_to_cos=True)
    np.testing.assert_allclose(flipped, jnp.concatenate([emb[:, 4:], emb[:, :4]], -1))
    assert timestep_embedding(step, 7).shape == (3, 7)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((8, 8, 1), np.float32), "rank 4"),
        (np.zeros((1, 8, 8, 1), np.float16), "float32"),
        (np.zeros((1, 8, 8, 1), np.int32), "float32"),
        (np.zeros((1, 8, 8, 3), np.float32), "1 channels"),
        (np.zeros((1, 7, 7, 1), np.float32), "divisible by 2"),
    ],
)
def test_input_errors(digits, fwd, x, match):
    _, variables = digits
    with pytest.raises(ValueError, match=match):
        fwd(variables, jnp.asarray(x), jnp.zeros((x.shape[0] if x.ndim == 4 else 1,)))


def test_step_errors_and_image_size(digits, fwd):
    _, variables = digits
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        fwd(variables, x, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="dtype bool"):
        fwd(variables, x, jnp.zeros((2,), bool))
    with pytest.raises(ValueError, match="configured for 8x8"):
        fwd(variables, jnp.zeros((2, 16, 16, 1), jnp.float32), jnp.zeros((2,)))


def test_errors_under_jit(digits):
    model, variables = digits
    with pytest.raises(ValueError, match="float32"):
        jax.jit(model.apply)(variables, jnp.zeros((1, 8, 8, 1), jnp.bfloat16), jnp.zeros((1,)))


def test_unet_from_config_errors_and_overrides():
    with pytest.raises(ValueError, match="expected one of"):
        unet_from_config("imagenet")
    with pytest.raises(ValueError, match="unknown UNet argument"):
        unet_from_config({"ch": 32, "channels": 3})
    m = unet_from_config("mnist", dropout=0.0)
    assert m.dropout == 0.0 and m.ch == 32 and m.ch_mult == (1, 2, 2)
    m = unet_from_config({"ch": 16, "ch_mult": [1, 2]})
    assert m.ch_mult == (1, 2)
