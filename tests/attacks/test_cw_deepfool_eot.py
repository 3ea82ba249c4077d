"""EoT in C&W-L2 and DeepFool: the mean gradient / linearisation over a randomised model's keys."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.attacks as ja
from jaxrob.attacks._cw import cw_eot_grad

_D, _K = 64, 10
_W = jr.normal(jr.key(3), (_D, _K)) * 0.3
_X = jr.uniform(jr.key(4), (6, 8, 8, 1))
_Y = jnp.argmax(_X.reshape(6, -1) @ _W, axis=1).astype(jnp.int32)  # all correctly classified


def _noisy_weights(key):
    """A randomised linear model's weights and bias under one key."""
    return _W + 0.2 * jr.normal(key, (_D, _K)), jr.normal(jr.fold_in(key, 1), (_K,))


def _noisy(x, key):
    w, b = _noisy_weights(key)
    return x.reshape(x.shape[0], -1) @ w + b[None, :]


def _deterministic(x, key):
    del key
    return x.reshape(x.shape[0], -1) @ _W


def _assert_results_close(a, b):
    np.testing.assert_array_equal(np.asarray(a.success), np.asarray(b.success))
    for name in ("x_adv", "loss", "norm"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                                   rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("chunk", [None, 1])
def test_cw_eot_of_a_deterministic_model_is_no_eot(chunk):
    kw = dict(c=2.0, num_steps=15, learning_rate=0.05, binary_search_steps=2)
    one = ja.cw_l2(_deterministic, _X, _Y, jr.key(5), **kw)
    three = ja.cw_l2(_deterministic, _X, _Y, jr.key(5), eot_samples=3, eot_chunk=chunk, **kw)
    assert np.asarray(one.success).any() and np.all(np.asarray(one.norm) > 0)
    _assert_results_close(one, three)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_eot_of_a_deterministic_model_is_no_eot(norm):
    kw = dict(norm=norm, num_steps=5, num_candidates=4)
    one = ja.deepfool(_deterministic, _X, _Y, jr.key(6), **kw)
    four = ja.deepfool(_deterministic, _X, _Y, jr.key(6), eot_samples=4, eot_chunk=2, **kw)
    assert np.asarray(one.success).any() and np.all(np.asarray(one.norm) > 0)
    _assert_results_close(one, four)


def test_cw_eot_gradient_is_the_mean_of_the_per_key_gradients():
    """Closed form on the randomised linear model: d/dw of ||x' - x||^2 + c max(-m, -kappa),
    m = z_j* - z_y, averaged over the keys fold_in(key, j)."""
    samples, kappa = 4, 0.5
    key = jr.key(7)
    # half the labels wrong: both sides of the hinge
    labels = jnp.where(jnp.arange(6) % 2 == 0, _Y, (_Y + 1) % _K).astype(jnp.int32)
    w = jnp.arctanh(0.9 * (2.0 * _X - 1.0)) + 0.1 * jr.normal(jr.key(8), _X.shape)
    c_B = jnp.linspace(0.5, 3.0, _X.shape[0])
    g, z_BK, l2sq_B, x_adv = cw_eot_grad(_noisy, w, _X, labels, c_B, kappa, key,
                                         eot_samples=samples, eot_chunk=2)

    xa = np.tanh(np.asarray(w, np.float64))
    x_adv_ref = (xa + 1.0) / 2.0
    xf = x_adv_ref.reshape(_X.shape[0], -1)
    y = np.asarray(labels)
    rows = np.arange(_X.shape[0])
    g_ref = np.zeros_like(xf)
    z_ref = np.zeros((_X.shape[0], _K))
    n_active = 0
    for j in range(samples):
        wj, bj = (np.asarray(a, np.float64) for a in _noisy_weights(jr.fold_in(key, j)))
        z = xf @ wj + bj
        z_ref += z / samples
        other = np.where(np.eye(_K, dtype=bool)[y], -np.inf, z)
        j_star = other.argmax(1)
        active = (z[rows, j_star] - z[rows, y]) < kappa  # the hinge's slope is not 0
        n_active += active.sum()
        dmargin = (wj[:, j_star] - wj[:, y]).T  # (B, D): d(z_j* - z_y)/dx'
        g_ref += (-np.asarray(c_B)[:, None] * active[:, None] * dmargin) / samples
    assert 0 < n_active < samples * _X.shape[0]  # both sides of the hinge are exercised
    g_ref = g_ref.reshape(_X.shape) + 2.0 * (x_adv_ref - np.asarray(_X))
    g_ref = g_ref * (1.0 - xa ** 2) / 2.0  # dx'/dw
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z_BK), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_adv), x_adv_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l2sq_B),
                               ((x_adv_ref - np.asarray(_X)) ** 2).sum((1, 2, 3)), rtol=1e-4)
    # The mean is not one key's gradient (the test would not tell them apart otherwise).
    g1 = cw_eot_grad(_noisy, w, _X, labels, c_B, kappa, jr.fold_in(key, 0), eot_samples=1,
                     eot_chunk=1)[0]
    assert not np.allclose(np.asarray(g1), g_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_eot_step_is_deepfool_on_the_mean_model(norm):
    """One EoT step on a randomised linear model = one plain step on its mean over the keys of
    iteration 0 (fold_in(fold_in(key, 0), j)): logits and Jacobian are linear in the weights."""
    samples, key = 4, jr.key(9)
    wb = [_noisy_weights(jr.fold_in(jr.fold_in(key, 0), j)) for j in range(samples)]
    w_mean = sum(w for w, _ in wb) / samples
    b_mean = sum(b for _, b in wb) / samples
    mean_model = lambda x, k: x.reshape(x.shape[0], -1) @ w_mean + b_mean[None, :]
    y = jnp.argmax(mean_model(_X, None), axis=1).astype(jnp.int32)  # every example moves
    kw = dict(norm=norm, num_steps=1, num_candidates=5, overshoot=0.02)
    eot = ja.deepfool(_noisy, _X, y, key, eot_samples=samples, eot_chunk=1, **kw)
    ref = ja.deepfool(mean_model, _X, y, key, **kw)
    assert np.all(np.asarray(ref.norm) > 0)
    np.testing.assert_allclose(np.asarray(eot.x_adv), np.asarray(ref.x_adv), rtol=1e-4,
                               atol=2e-5)
    one = ja.deepfool(_noisy, _X, y, key, **kw)
    assert not np.allclose(np.asarray(one.x_adv), np.asarray(ref.x_adv), atol=1e-3)


@pytest.mark.parametrize("attack", [ja.cw_l2, ja.deepfool])
def test_bad_eot_arguments_raise_clear_errors(attack):
    with pytest.raises(ValueError, match="eot_samples: expected a positive integer"):
        attack(_deterministic, _X, _Y, jr.key(0), eot_samples=0)
    with pytest.raises(ValueError, match="eot_chunk=2 does not divide eot_samples=3"):
        attack(_deterministic, _X, _Y, jr.key(0), eot_samples=3, eot_chunk=2)
    with pytest.raises(ValueError, match="eot_chunk: expected a positive integer"):
        attack(_deterministic, _X, _Y, jr.key(0), eot_samples=3, eot_chunk=0)
