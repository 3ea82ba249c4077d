"""Forward-mode Jacobians through fast_vjp models fail with a clear error."""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import jaxrob.analysis as ja


# ----------------------------------------------------------------------------- fast_vjp models
@pytest.fixture(scope="module")
def tiny_fast_unet():
    """A tiny fast_vjp=True UNet with zero parameters (shapes only: nothing is compiled)."""
    from jaxrob.models import UNet

    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4,
                 fast_vjp=True)
    x = jnp.full((1, 4, 4, 1), 0.5)
    shapes = jax.eval_shape(model.init, jr.key(0), x, jnp.array([1]))
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    return (lambda z: model.apply(params, z, jnp.array([1]))), x


@pytest.mark.parametrize("method", ["jacfwd", "jvp_chunks"])
def test_forward_mode_jacobian_of_fast_vjp_model_names_the_alternatives(tiny_fast_unet, method):
    f, x = tiny_fast_unet
    with pytest.raises(TypeError, match="forward-mode") as info:
        ja.jacobian(f, x, method=method)
    msg = str(info.value)
    assert "fast_vjp=True" in msg and "vjp_chunks" in msg and "jacrev" in msg
    assert "clone(fast_vjp=False)" in msg
    assert "custom_vjp" in str(info.value.__cause__)  # JAX's own message stays chained


@pytest.mark.parametrize("ad", ["jvp", "mixed"])
def test_forward_mode_top_singular_values_of_fast_vjp_model(tiny_fast_unet, ad):
    f, x = tiny_fast_unet
    kw = {"f_reverse": f} if ad == "mixed" else {}
    with pytest.raises(TypeError, match="forward-mode") as info:
        ja.top_singular_values(f, x, k=2, key=jr.key(0), ad=ad, **kw)
    msg = str(info.value)
    assert "clone(fast_vjp=False)" in msg
    assert ("ad='vjp'" in msg) if ad == "jvp" else ("f_reverse" in msg)
