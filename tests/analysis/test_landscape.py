"""Loss landscapes, landscape directions and attack trajectories on closed-form losses and a
tiny randomised linear classifier (a few seconds)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.analysis as ja
from jaxrob.attacks import loss_from_logits, pgd

B, SHAPE = 3, (3, 4, 4, 1)
X = jr.uniform(jr.key(0), SHAPE, minval=0.3, maxval=0.7)
Y = jnp.array([0, 1, 2], jnp.int32)
M = jr.uniform(jr.key(1), SHAPE)  # the quadratic loss's centre
W = jr.normal(jr.key(2), (16, 3))  # the linear classifier
ALPHAS = jnp.linspace(-2.0, 2.0, 5)
BETAS = jnp.linspace(-1.0, 1.0, 3)


def _offset(key, b):
    """A key-dependent offset per example: one key for the batch, or one key per example."""
    if jnp.ndim(key) == 1:
        return jax.vmap(lambda k: jr.uniform(k, ()))(key)
    return jr.uniform(key, (b,))


def quadratic(x, y, key):
    """0.5 ||x_b - m_b||^2 plus a key-dependent offset (its EoT mean shifts the landscape)."""
    del y
    return 0.5 * jnp.sum(jnp.square(x - M[: x.shape[0]]), axis=(1, 2, 3)) + _offset(
        key, x.shape[0])


def randomised_logits(x, key):
    """A linear classifier whose logits carry key-dependent noise (a 'randomised defence')."""
    noise = (jax.vmap(lambda k: jr.normal(k, (3,)))(key) if jnp.ndim(key) == 1
             else jr.normal(key, (x.shape[0], 3)))
    return x.reshape(x.shape[0], -1) @ W + 0.5 * noise


CE = loss_from_logits(randomised_logits, "ce")
CE_JIT = jax.jit(CE)  # the recomputations by hand


def _keys(k, b=B, seed=3):
    base = jr.key(seed)
    return jax.vmap(lambda i: jax.vmap(lambda j: jr.fold_in(jr.fold_in(base, i), j))(
        jnp.arange(b)))(jnp.arange(k))


def _dirs(seed=4, norm="linf"):
    x_adv = jnp.clip(X + 0.1 * jr.rademacher(jr.key(seed), SHAPE, jnp.float32), 0, 1)
    return ja.landscape_directions(X, x_adv, jr.split(jr.key(seed + 1), B), norm=norm), x_adv


# ----------------------------------------------------------------------------- directions
@pytest.mark.parametrize("kind, norm", [("rademacher", "linf"), ("gaussian", "l2")])
def test_directions_orthogonal_unit_and_along_the_attack(kind, norm):
    x_adv = jnp.clip(X + 0.1 * jr.uniform(jr.key(7), SHAPE, minval=-1, maxval=1), 0, 1)
    d = ja.landscape_directions(X, x_adv, jr.split(jr.key(8), B), kind=kind, norm=norm)
    assert d.shape == (2, *SHAPE)
    flat = np.asarray(d, np.float64).reshape(2, B, -1)
    np.testing.assert_allclose(np.sum(flat[0] * flat[1], -1), 0.0, atol=1e-5)
    n = (np.abs(flat).max(-1) if norm == "linf" else np.linalg.norm(flat, axis=-1))
    np.testing.assert_allclose(n, 1.0, rtol=1e-6)
    delta = np.asarray(x_adv - X, np.float64).reshape(B, -1)
    ratio = flat[0] / np.where(delta == 0, np.nan, delta)
    # d1 is a positive multiple of x_adv - x, example by example
    assert np.allclose(np.nanstd(ratio, -1), 0, atol=1e-4) and (np.nanmin(ratio) > 0)


def test_linf_unit_direction_reaches_x_adv_and_zero_attack_stays_zero():
    x_adv = jnp.clip(X + 0.1 * jr.rademacher(jr.key(9), SHAPE, jnp.float32), 0, 1)
    d = ja.landscape_directions(X, x_adv, jr.key(10))  # one key: positions fold it in
    np.testing.assert_allclose(X + 0.1 * d[0], x_adv, atol=1e-6)
    # sign=True gives the sign pattern; a zero attack direction stays zero, d2 unit norm
    s = ja.landscape_directions(X, x_adv, jr.key(10), sign=True, norm=None)
    np.testing.assert_array_equal(s[0], jnp.sign(x_adv - X))
    z = ja.landscape_directions(X, X, jr.key(10))
    assert float(jnp.abs(z[0]).max()) == 0.0
    np.testing.assert_allclose(jnp.abs(z[1]).max(axis=(1, 2, 3)), 1.0)


def test_directions_are_per_example_with_a_key_batch():
    x_adv = jnp.clip(X + 0.1, 0, 1)
    keys = jr.split(jr.key(11), B)
    full = ja.landscape_directions(X, x_adv, keys)
    part = ja.landscape_directions(X[1:], x_adv[1:], keys[1:])
    np.testing.assert_array_equal(full[:, 1:], part)


# ----------------------------------------------------------------------------- landscape
def test_quadratic_landscape_matches_closed_form_and_eot_mean():
    d, _ = _dirs()
    keys = _keys(4)
    scale = 0.05
    got = np.asarray(ja.loss_landscape(quadratic, X, Y, d, ALPHAS, BETAS, keys, scale=scale))
    assert got.shape == (5, 3, B)
    # closed form: 0.5 ||x + s(a d1 + b d2) - m||^2 (every point is inside [0, 1]), plus the
    # mean offset of the four keys
    x, m = np.asarray(X, np.float64), np.asarray(M, np.float64)
    d1, d2 = np.asarray(d, np.float64)
    off = np.mean([np.asarray(_offset(keys[k], B)) for k in range(4)], 0)
    for i, a in enumerate(np.asarray(ALPHAS)):
        for j, b in enumerate(np.asarray(BETAS)):
            p = x + scale * (a * d1 + b * d2)
            assert p.min() >= 0 and p.max() <= 1
            want = 0.5 * np.sum((p - m) ** 2, axis=(1, 2, 3)) + off
            np.testing.assert_allclose(got[i, j], want, rtol=1e-5)
    # the origin is the loss at x
    np.testing.assert_allclose(got[2, 1], np.mean([quadratic(X, Y, keys[k]) for k in range(4)],
                                                  0), rtol=1e-6)


def test_linear_landscape_with_clipping_and_unnormalised_directions():
    w = jr.normal(jr.key(12), SHAPE)
    lin = lambda x, y, key: jnp.sum(w * x, axis=(1, 2, 3))
    d = jnp.stack([jnp.ones(SHAPE), jnp.zeros(SHAPE)])
    keys = jr.split(jr.key(13), 2)
    alphas = jnp.array([-1.0, 0.0, 0.5, 1.0])
    got = ja.loss_landscape(lin, X, Y, d, alphas, jnp.zeros(1), keys, norm=None)
    for i, a in enumerate(alphas):
        want = jnp.sum(w * jnp.clip(X + a, 0, 1), axis=(1, 2, 3))
        np.testing.assert_allclose(got[i, 0], want, rtol=1e-5, atol=1e-6)
    # clip=False: exactly linear in alpha
    raw = ja.loss_landscape(lin, X, Y, d, alphas, jnp.zeros(1), keys, norm=None, clip=False)
    slope = jnp.sum(w, (1, 2, 3))[None]
    np.testing.assert_allclose(raw[:, 0] - raw[1:2, 0], alphas[:, None] * slope, rtol=1e-5,
                               atol=1e-5)


def test_eot_average_is_the_mean_of_per_key_landscapes_and_batch_size_invariant():
    d, _ = _dirs()
    keys = _keys(3)
    full = ja.loss_landscape(CE, X, Y, d, ALPHAS, BETAS, keys, scale=0.2)
    single = [ja.loss_landscape(CE, X, Y, d, ALPHAS, BETAS, keys[k:k + 1], scale=0.2)
              for k in range(3)]
    np.testing.assert_allclose(full, np.mean(single, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(single[0], single[1])  # the keys do matter
    for bs in (1, 7):  # one at a time; groups of 7 with a remainder of 2 (45 evaluations)
        np.testing.assert_allclose(
            ja.loss_landscape(CE, X, Y, d, ALPHAS, BETAS, keys, scale=0.2, batch_size=bs),
            full, rtol=1e-5, atol=1e-6)
    # per-example keys: a sub-batch sees the same landscape as inside the full batch
    sub = ja.loss_landscape(CE, X[:2], Y[:2], d[:, :2], ALPHAS, BETAS, keys[:, :2], scale=0.2)
    np.testing.assert_allclose(sub, full[..., :2], rtol=1e-5, atol=1e-6)
    # one key per call (K,): every example of the batch gets that key
    one = ja.loss_landscape(CE, X, Y, d, ALPHAS, BETAS, jr.split(jr.key(5), 2), scale=0.2)
    assert one.shape == full.shape and np.all(np.isfinite(one))


# ----------------------------------------------------------------------------- trajectory
def test_trajectory_recomputes_the_iterates_losses():
    key = jr.key(20)
    res = pgd(CE.logits_fn, X, Y, key, eps=0.1, num_steps=4, eot_samples=2,
              return_iterates=True)
    its = res.iterates
    assert its.shape == (5, *SHAPE)
    fixed = _keys(1)[0][None]  # (1, B): one fixed key per example, the DW-box view
    got = ja.attack_trajectory(CE, its, Y, fixed)
    want = jnp.stack([CE_JIT(its[t], Y, fixed[0]) for t in range(5)])
    # two programs, two float summation orders (~1e-7 relative; the tests' XLA flags, see
    # tests/conftest.py, give ~1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # fresh keys per iterate (the stochastic view), K = 3, in lax.map groups of 2
    fresh = jax.vmap(lambda t: _keys(3, seed=30 + t))(jnp.arange(5))
    assert fresh.shape == (5, 3, B)
    got = ja.attack_trajectory(CE, its, Y, fresh, per_iterate=True, batch_size=2)
    want = jnp.stack([jnp.mean(jnp.stack([CE_JIT(its[t], Y, fresh[t, k]) for k in range(3)]), 0)
                      for t in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # a deterministic model: the attack keeps the iterate of highest loss, which the
    # trajectory recomputes exactly
    det = loss_from_logits(lambda x, key: x.reshape(x.shape[0], -1) @ W, "ce")
    r = pgd(det.logits_fn, X, Y, key, eps=0.1, num_steps=4, return_iterates=True)
    traj = ja.attack_trajectory(det, r.iterates, Y, jr.split(key, 1))
    np.testing.assert_allclose(jnp.max(traj, 0), r.loss, rtol=1e-6)
    assert float(traj[-1].mean()) > float(traj[0].mean())  # the attack climbs


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    d, x_adv = _dirs()
    keys = _keys(2)
    ll = lambda **kw: ja.loss_landscape(**{**dict(loss_fn=CE, x=X, y=Y, directions=d,
                                                  alphas=ALPHAS, betas=BETAS, keys=keys),
                                           **kw})
    cases = [
        (dict(directions=d[:1]), "directions: expected shape"),
        (dict(directions=d[:, :2]), "directions: expected shape"),
        (dict(y=Y[:2]), r"y: expected shape \(3,\)"),
        (dict(y=Y.astype(jnp.float32)), "y: expected an int array"),
        (dict(alphas=jnp.zeros(0)), "alphas: expected a non-empty"),
        (dict(betas=[]), "betas: expected a non-empty"),
        (dict(alphas=jnp.array([0.0, jnp.nan])), "alphas: expected finite"),
        (dict(keys=keys[:, :2]), r"keys: expected shape \(K,\) or \(K, B\)"),
        (dict(keys=jr.key_data(keys)), "keys: expected typed PRNG keys"),
        (dict(keys=keys[:0]), "at least one key"),
        (dict(norm="l1"), "norm: expected one of"),
        (dict(scale=0.0), "scale: expected a positive number"),
        (dict(batch_size=0), "batch_size: expected a positive integer"),
        (dict(x=X + 1.0), "x: expected values in"),
        (dict(loss_fn=lambda x, y, k: jnp.sum(x)), r"loss_fn: expected a per-example loss"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            ll(**kw)
    with pytest.raises(ValueError, match="x_adv: expected the shape of x"):
        ja.landscape_directions(X, x_adv[:2], jr.key(0))
    with pytest.raises(ValueError, match="kind: expected one of"):
        ja.landscape_directions(X, x_adv, jr.key(0), kind="uniform")
    with pytest.raises(ValueError, match=r"key: expected \(3,\) per-example keys"):
        ja.landscape_directions(X, x_adv, jr.split(jr.key(0), 2))
    its = jnp.stack([X, x_adv, X])  # T = 3
    with pytest.raises(ValueError, match=r"iterates: expected shape \(T, B, H, W, C\)"):
        ja.attack_trajectory(CE, X, Y, keys)
    with pytest.raises(ValueError, match=r"per_iterate=True"):
        ja.attack_trajectory(CE, its, Y, keys, per_iterate=True)  # (2, 3) is (K, B), not (T = 3, K)
    with pytest.raises(ValueError, match=r"keys: expected shape \(T, K\) or \(T, K, B\)"):
        ja.attack_trajectory(CE, its, Y, _keys(3)[None], per_iterate=True)
    with pytest.raises(ValueError, match=r"y: expected shape"):
        ja.attack_trajectory(CE, its, Y[:1], keys)
