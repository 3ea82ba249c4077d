"""GroupNorm / upsampling with hand-written VJPs equal the autodiff of the plain layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables
from jax.sharding import PartitionSpec as P

from jaxrob import parallel
from jaxrob.models import unet_from_config
from jaxrob.models._fast_vjp_ops import (
    GroupNorm,
    UpsampleConv,
    group_norm,
    upsample_conv3,
    upsample_nearest2x,
    upsample_nearest2x_plain,
)


def _plain_gn(x, scale, bias, groups, eps):
    gn = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False)
    return gn.apply({"params": {"scale": scale, "bias": bias}}, x)


def _plain_upconv(x, kernel, bias):
    conv = nn.Conv(kernel.shape[-1], (3, 3), padding=((1, 1), (1, 1)))
    return conv.apply({"params": {"kernel": kernel, "bias": bias}}, upsample_nearest2x_plain(x))


def _assert_same_vjp(fast, plain, args, atol=1e-5, rtol=1e-5):
    y, vjp = jax.vjp(fast, *args)
    y_ref, vjp_ref = jax.vjp(plain, *args)
    np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=1e-6)
    ct = jr.normal(jr.key(99), y.shape)
    for a, b in zip(vjp(ct), vjp_ref(ct), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("groups,shape", [(1, (2, 5, 5, 4)), (4, (3, 6, 4, 8)), (8, (1, 7, 7, 8)),
                                          (16, (1, 3, 3, 32))])  # one image, few / many groups
def test_group_norm_value_and_vjp_match_flax(groups, shape):
    k = jr.split(jr.key(groups), 3)
    x = jr.normal(k[0], shape) * 3 + 1
    scale, bias = 1 + jr.normal(k[1], shape[-1:]), jr.normal(k[2], shape[-1:])
    fast = lambda x, s, b: group_norm(x, s, b, groups, 1e-6)
    plain = lambda x, s, b: _plain_gn(x, s, b, groups, 1e-6)
    np.testing.assert_array_equal(fast(x, scale, bias), plain(x, scale, bias))  # same ops
    _assert_same_vjp(fast, plain, (x, scale, bias))


def test_group_norm_module_has_flax_params_and_checks_shape():
    x = jr.normal(jr.key(0), (2, 4, 4, 8))
    ours = GroupNorm(num_groups=4).init(jr.key(1), x)
    theirs = nn.GroupNorm(num_groups=4, use_fast_variance=False).init(jr.key(1), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    with pytest.raises(ValueError, match="divisible by 3 groups"):
        GroupNorm(num_groups=3).init(jr.key(1), x)


def test_upsample_vjp_adds_the_four_phases():
    x = jr.normal(jr.key(0), (2, 3, 5, 4))
    _assert_same_vjp(upsample_nearest2x, upsample_nearest2x_plain, (x,))
    np.testing.assert_array_equal(upsample_nearest2x(x)[:, 1::2, ::2], x)


@pytest.mark.parametrize("size,cin,cout", [(4, 3, 5), (7, 8, 8), (1, 2, 3)])
def test_upsample_conv_value_and_vjp_match_upsample_then_conv(size, cin, cout):
    k = jr.split(jr.key(size), 3)
    x = jr.normal(k[0], (2, size, size + 1, cin))
    kernel, bias = jr.normal(k[1], (3, 3, cin, cout)), jr.normal(k[2], (cout,))
    _assert_same_vjp(upsample_conv3, _plain_upconv, (x, kernel, bias), atol=1e-4)


def test_upsample_conv_module_initialises_like_nn_conv():
    x = jr.normal(jr.key(0), (1, 4, 4, 6))
    ours = UpsampleConv(5, name="up").init(jr.key(3), x)
    theirs = nn.Conv(5, (3, 3), name="up").init(jr.key(3), x)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.slow  # the per-op VJPs are checked in CI one cotangent at a time
def test_batched_cotangents_at_one_point_match():
    """The dense-Jacobian pattern: vmap of one VJP over many cotangents."""
    model = unet_from_config("digits", ch=8, num_groups=4, dropout=0.0)
    twin = model.clone(fast_vjp=True)
    x, s = jr.uniform(jr.key(0), (1, 8, 8, 1)), jnp.array([5])
    variables = random_variables(model, x, s, seed=1)
    cts = jr.normal(jr.key(2), (6, 1, 8, 8, 1))
    rows = {}
    for name, m in (("plain", model), ("fast", twin)):
        _, vjp = jax.vjp(lambda z, m=m: m.apply(variables, z, s), x)
        rows[name] = jax.jit(jax.vmap(lambda c, vjp=vjp: vjp(c)[0]))(cts)
    np.testing.assert_allclose(rows["fast"], rows["plain"], atol=1e-5, rtol=1e-4)


# sharded == single device is checked in CI on the purifier, the attacks and training
@pytest.mark.slow
def test_parameter_gradients_inside_shard_map_equal_single_device():
    """The custom VJPs' parameter cotangents are reduced over devices like JAX's own."""
    mesh = parallel.make_mesh()
    n = mesh.shape[parallel.DATA_AXIS]
    twin = unet_from_config("digits", ch=8, num_groups=4, dropout=0.0, fast_vjp=True)
    x = jr.uniform(jr.key(0), (n, 8, 8, 1))
    s = jnp.arange(n) % 7
    variables = random_variables(twin, x, s, seed=1)
    loss = lambda v, x, s: jnp.sum(jnp.sin(twin.apply(v, x, s)))

    def local(v, x, s):
        return jax.lax.psum(loss(v, x, s), parallel.DATA_AXIS)

    sharded = jax.jit(jax.grad(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=P())))(variables, x, s)
    single = jax.jit(jax.grad(loss))(variables, x, s)
    # a parameter's gradient is a sum over all pixels of all examples: 8 per-device partial
    # sums + psum vs one sum. Entries that are small differences of large terms carry that
    # reassociation at ~1e-6 of the gradient's scale (an absolute 1e-5 failed on 2 of 576 taps
    # of a kernel reaching ~30, by 2.8e-5; a bias whose gradient is ~1e-7 differed in sign),
    # so the tolerance is relative to the largest gradient. A missing or doubled device
    # reduction in a custom VJP would be off by O(1) of the gradient, far above it.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(single))

    def close(a, b):
        np.testing.assert_allclose(a, b, atol=5e-6 * scale, rtol=1e-4)

    jax.tree.map(close, sharded, single)
