"""The fast-VJP convolution equals lax.conv_general_dilated in value and gradient."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables
from jax import lax

from jaxrob.models import CifarResNet, SmallCNN, WideResNet, unet_from_config
from jaxrob.models._conv import _NHWC_HWIO, conv_general_dilated_fast_vjp


@pytest.mark.parametrize(
    "size,k,stride,pad,dil",
    [
        (12, 3, 1, ((1, 1), (1, 1)), 1),
        (12, 3, 2, ((0, 1), (0, 1)), 1),  # the UNet's TF-style downsampling
        (12, 3, 2, ((1, 1), (1, 1)), 1),  # PyTorch-style stride 2
        (7, 1, 1, ((0, 0), (0, 0)), 1),
        (9, 3, 2, "SAME", 1),
        (9, 3, 2, "VALID", 1),
        (10, 3, 1, ((2, 2), (2, 2)), 2),
        (8, 3, 3, ((1, 0), (2, 1)), 1),
    ],
)
def test_conv_value_and_vjp_match_lax(size, k, stride, pad, dil):
    x = jr.normal(jr.key(0), (2, size, size, 3))
    w = jr.normal(jr.key(1), (k, k, 3, 5))
    kw = dict(rhs_dilation=(dil, dil), dimension_numbers=_NHWC_HWIO)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, **kw)
    fast = lambda x, w: conv_general_dilated_fast_vjp(x, w, (stride, stride), pad, **kw)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y, vjp = jax.vjp(fast, x, w)
    ct = jr.normal(jr.key(2), y.shape)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for a, b in zip(vjp(ct), vjp_ref(ct), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_other_layouts_fall_back_to_lax():
    x = jr.normal(jr.key(0), (2, 3, 8, 8))  # NCHW
    w = jr.normal(jr.key(1), (4, 3, 3, 3))  # OIHW
    y = conv_general_dilated_fast_vjp(x, w, (1, 1), "SAME")
    np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), "SAME"), atol=1e-5)


def _models():
    return [
        (unet_from_config("digits", ch=8, num_groups=4, dropout=0.0), (2, 8, 8, 1), True),
        (SmallCNN(features=(4, 8), hidden=8), (2, 8, 8, 1), False),
        (CifarResNet(depth=8), (2, 8, 8, 3), False),
        (WideResNet(depth=10, widen_factor=1), (2, 8, 8, 3), False),
    ]


# the UNet twin (~55 s) runs outside CI; the UNet's fast_vjp ops are checked one by one in CI
@pytest.mark.parametrize("i", [pytest.param(0, marks=pytest.mark.slow), 1, 2, 3],
                         ids=["unet", "small_cnn", "resnet", "wrn"])
def test_models_fast_vjp_twin_shares_params_and_gradients(i):
    model, shape, is_unet = _models()[i]
    twin = model.clone(fast_vjp=True)
    x = jr.uniform(jr.key(0), shape)
    args = (jnp.array([3, 7]),) if is_unet else ()
    variables = random_variables(model, x, *args, seed=1)
    twin_shapes = jax.eval_shape(twin.init, jr.key(1), x, *args)
    shape_of = lambda a: a.shape
    assert jax.tree.map(shape_of, variables) == jax.tree.map(shape_of, twin_shapes)

    def loss(m):
        return lambda x: jnp.sum(jnp.sin(m.apply(variables, x, *args)))

    # jitted: one compilation each instead of an eager dispatch (and compile) per op
    np.testing.assert_allclose(jax.jit(loss(twin))(x), jax.jit(loss(model))(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss(twin)))(x),
                               jax.jit(jax.grad(loss(model)))(x), atol=1e-5, rtol=1e-4)


# ~55 s; gradients through the purifier's scan with fast_vjp models are checked in CI by
# test_purify.py::test_exact_gradient_remat_equals_plain_and_fast_vjp[ddpm]
@pytest.mark.slow
def test_gradient_through_scan_matches_and_forward_mode_is_refused():
    model = unet_from_config("digits", ch=8, num_groups=4, dropout=0.0)
    twin = model.clone(fast_vjp=True)
    x = jr.normal(jr.key(0), (2, 8, 8, 1))
    variables = random_variables(model, x, jnp.zeros((2,), jnp.int32), seed=1)

    def chain(m):
        def f(x):
            body = lambda h, n: (h - 0.1 * m.apply(variables, h, jnp.full((2,), n)), None)
            return jnp.sum(jax.lax.scan(body, x, jnp.arange(3))[0] ** 2)
        return f

    np.testing.assert_allclose(jax.jit(jax.grad(chain(twin)))(x),
                               jax.jit(jax.grad(chain(model)))(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(chain(twin), (x,), (x,))
