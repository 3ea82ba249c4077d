"""top_singular_values' convergence check (error bounds, warn/raise) on maps with known spectra,
and the forward-mode error through fast_vjp models."""

import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.analysis as ja

SHAPE = (1, 8, 8, 3)
D = 192
X = jr.uniform(jr.key(0), SHAPE)
_rng = np.random.default_rng(1)


def _orthogonal(n):
    q, r = np.linalg.qr(_rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))[None, :]


def _linear_map(s):
    m = _orthogonal(D) @ np.diag(s) @ _orthogonal(D).T
    m32 = jnp.asarray(m, jnp.float32)
    return (lambda x: (m32 @ x.reshape(-1)).reshape(x.shape)), m


# The top five (4th and 5th 0.6% apart) above a decaying bulk.
TOP = np.array([1.5243, 1.4637, 1.2386, 1.2125, 1.2050])
S_CLOSE = np.concatenate([TOP, 1.18 * np.exp(-np.linspace(0, 7, D - 5))])
S_FLAT = 1.0 - 1e-3 * np.arange(D)  # relative gaps of 1e-3 everywhere
S_GAP = np.concatenate([TOP, np.linspace(0.3, 0.01, D - 5)])
close, M_CLOSE = _linear_map(S_CLOSE)
flat, _ = _linear_map(S_FLAT)
gapped, M_GAP = _linear_map(S_GAP)


def _bound_holds(s, err, s_true):
    """Each s_i is within err_i of some true singular value (or 0)."""
    dist = np.min(np.abs(np.asarray(s)[:, None] - np.append(s_true, 0.0)[None, :]), axis=1)
    return np.all(dist <= np.asarray(err) * (1 + 1e-4) + 1e-6)


def test_default_iterations_find_the_close_pair_with_small_bounds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, err = ja.top_singular_values(close, X, k=5, key=jr.key(0), return_residuals=True)
    np.testing.assert_allclose(s, TOP, rtol=1e-5)
    assert err.shape == (5,) and np.all(np.asarray(err) <= 1e-3 * TOP[0])
    assert _bound_holds(s, err, S_CLOSE)


def test_too_few_iterations_skip_a_value_and_warn_raise_or_ignore():
    kw = dict(k=5, key=jr.key(0), num_iters=15, return_residuals=True)
    with pytest.warns(RuntimeWarning, match="have not converged.*Raise num_iters"):
        s, err = ja.top_singular_values(close, X, **kw)
    assert np.max(np.abs(np.asarray(s) - TOP) / TOP) > 1e-3  # really wrong, and flagged
    assert np.max(err) > 1e-3 * s[0]
    assert _bound_holds(s, err, S_CLOSE)  # the bounds are honest even then
    with pytest.raises(RuntimeError, match="have not converged"):
        ja.top_singular_values(close, X, on_unconverged="raise", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2, _ = ja.top_singular_values(close, X, on_unconverged="ignore", **kw)
    np.testing.assert_array_equal(s2, s)


def test_lanczos_bound_is_the_true_residual():
    """e_i = min(r_i / (sqrt2 s_i), sqrt(r_i)) with r_i = ||J^T J v_i - s_i^2 v_i||."""
    s, _, v, err = ja.top_singular_values(close, X, k=5, key=jr.key(0), num_iters=15,
                                          return_vectors=True, return_residuals=True,
                                          on_unconverged="ignore")
    s, v = np.asarray(s, np.float64), np.asarray(v, np.float64)
    r = np.linalg.norm(M_CLOSE.T @ (M_CLOSE @ v) - v * s**2, axis=0)
    np.testing.assert_allclose(err, np.minimum(r / (np.sqrt(2) * s), np.sqrt(r)),
                               rtol=1e-2, atol=1e-5)


def test_flat_spectrum_warns_at_the_default_and_converges_at_full_dimension():
    with pytest.warns(RuntimeWarning, match="have not converged"):
        s, err = ja.top_singular_values(flat, X, k=5, key=jr.key(0), return_residuals=True)
    assert _bound_holds(s, err, S_FLAT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, err = ja.top_singular_values(flat, X, k=5, key=jr.key(0), num_iters=D,
                                        return_residuals=True)
    np.testing.assert_allclose(s, S_FLAT[:5], rtol=1e-5)
    assert np.all(np.asarray(err) < 1e-5)


def test_default_iterations_are_capped_at_the_dimension():
    f = lambda x: 2.0 * x  # D = 12 < the default 2k + 30
    x = jnp.ones((1, 2, 2, 3))
    s, err = ja.top_singular_values(f, x, k=5, key=jr.key(0), return_residuals=True)
    np.testing.assert_allclose(s, 2.0, rtol=1e-5)
    assert np.all(np.asarray(err) < 1e-5)


def test_randomized_bounds_are_the_triplet_residual():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, u, v, err = ja.top_singular_values(gapped, X, k=5, key=jr.key(0), method="randomized",
                                              return_vectors=True, return_residuals=True)
    np.testing.assert_allclose(s, TOP, rtol=1e-4)
    assert _bound_holds(s, err, S_GAP)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    r = np.linalg.norm(M_GAP @ v - u * np.asarray(s)[None, :], axis=0) / np.sqrt(2)
    np.testing.assert_allclose(err, np.maximum(r, 1e-6), rtol=0.1, atol=2e-6)
    with pytest.warns(RuntimeWarning, match="power iterations"):
        s, err = ja.top_singular_values(flat, X, k=5, key=jr.key(0), method="randomized",
                                        num_iters=0, return_residuals=True)
    assert _bound_holds(s, err, S_FLAT)


def test_check_runs_inside_jit():
    kw = dict(k=5, key=jr.key(0), num_iters=15)
    warn = jax.jit(lambda x: ja.top_singular_values(close, x, **kw))
    with pytest.warns(RuntimeWarning, match="have not converged"):
        jax.block_until_ready(warn(X))
    raise_ = jax.jit(lambda x: ja.top_singular_values(close, x, on_unconverged="raise", **kw))
    with pytest.raises(RuntimeError, match="have not converged"):
        jax.block_until_ready(raise_(X))


def test_bad_iterations_and_options_raise_value_error():
    with pytest.raises(ValueError, match=r"k <= num_iters.*for k=5, got 4"):
        ja.top_singular_values(close, X, k=5, key=jr.key(0), num_iters=4)
    with pytest.raises(ValueError, match="num_iters"):
        ja.top_singular_values(close, X, k=5, key=jr.key(0), num_iters=D + 1)
    with pytest.raises(ValueError, match="on_unconverged"):
        ja.top_singular_values(close, X, k=5, key=jr.key(0), on_unconverged="fail")
    with pytest.raises(ValueError, match="tol"):
        ja.top_singular_values(close, X, k=5, key=jr.key(0), tol=0.0)


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
