"""Purifier properties and gradient-fidelity self-tests (none of the reference systems has them)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxrob.diffusion as jd
from jaxrob.models import DiffusionModel, unet_from_config
from jaxrob.parallel import make_mesh
from jaxrob.purify import DefendedModel, diffpure, example_keys, majority_vote, multistage

SCHED = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (4, 8, 8, 1), minval=0.05, maxval=0.95)


def _unet(fast_vjp=False, seed=1):
    m = unet_from_config("digits", ch=8, ch_mult=(1, 2), num_groups=4, dropout=0.0,
                         attn_resolutions=(), fast_vjp=fast_vjp)
    v = random_variables(m, X, jnp.zeros((4,), jnp.int32), seed=seed)
    return DiffusionModel(m, v, jd.linear_schedule(1000))


EPS = _unet()
EPS_FAST = _unet(fast_vjp=True)
W = jr.normal(jr.key(2), (64, 10)) * 0.5


def logits_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ W


def loss(purify, key):
    y = jnp.arange(4) % 10
    def f(x):
        lg = logits_fn(purify(x, key))
        return jnp.sum(jax.nn.log_softmax(lg)[jnp.arange(4), y])
    return f


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sde", "ode"])
def test_output_in_range_and_fixed_key_replays(sampler):
    pur = diffpure(EPS, SCHED, t_star=0.1, num_steps=4, sampler=sampler)
    f = jax.jit(pur)
    a, b = f(X, jr.key(3)), f(X, jr.key(3))
    assert a.shape == X.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    np.testing.assert_array_equal(a, b)
    c = f(X, jr.key(4))
    if sampler in ("ddim", "ode"):  # only the forward noise is random
        assert not np.allclose(a, c)
    assert pur.nfe == 4 and pur.manifest()["t_star"] == 0.1


def test_default_steps_follow_t_star_and_bad_input():
    assert diffpure(EPS, SCHED, t_star=0.1).nfe == 100
    with pytest.raises(ValueError, match="t_star"):
        diffpure(EPS, SCHED, t_star=1.5)
    with pytest.raises(ValueError, match="t_star"):
        diffpure(EPS, SCHED, t_star=0.0)
    with pytest.raises(ValueError, match="sampler"):
        diffpure(EPS, SCHED, t_star=0.1, sampler="heun")
    with pytest.raises(ValueError, match="num_steps"):
        diffpure(EPS, SCHED, t_star=0.01, num_steps=50)  # only 10 steps in the chain
    with pytest.raises(ValueError, match="gradient"):
        diffpure(EPS, SCHED, t_star=0.1, gradient="adjoint")
    with pytest.raises(ValueError, match="surrogate_steps"):
        diffpure(EPS, SCHED, t_star=0.1, gradient="surrogate")
    pur = diffpure(EPS, SCHED, t_star=0.1, num_steps=2)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        pur(X + 1.0, jr.key(0))
    with pytest.raises(ValueError, match="rank 4"):
        pur(X[0], jr.key(0))
    with pytest.raises(ValueError, match="keys"):
        pur(X, example_keys(jr.key(0), jnp.arange(3)))


def test_per_example_keys_make_results_independent_of_batch_size():
    pur = jax.jit(diffpure(EPS, SCHED, t_star=0.2, num_steps=3))
    keys = example_keys(jr.key(5), jnp.arange(4))
    full = pur(X, keys)
    halves = jnp.concatenate([pur(X[:2], keys[:2]), pur(X[2:], keys[2:])])
    single = jnp.concatenate([pur(X[i:i + 1], keys[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(full, halves, atol=1e-6)
    np.testing.assert_allclose(full, single, atol=1e-6)


def test_sharded_over_8_devices_equals_single_device():
    mesh = make_mesh()
    assert mesh.size == 8
    x = jnp.tile(X, (2, 1, 1, 1))
    keys = example_keys(jr.key(6), jnp.arange(8))
    pur = diffpure(EPS, SCHED, t_star=0.1, num_steps=3)
    single = jax.jit(pur)(x, keys)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ks = jax.device_put(keys, NamedSharding(mesh, P("data")))
    sharded = jax.jit(pur, out_shardings=NamedSharding(mesh, P("data")))(xs, ks)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)


# sde: ~110 s, outside CI
@pytest.mark.parametrize("sampler", ["ddpm", pytest.param("sde", marks=pytest.mark.slow)])
def test_exact_gradient_remat_equals_plain_and_fast_vjp(sampler):
    kw = dict(t_star=0.1, num_steps=3, sampler=sampler)
    key = jr.key(7)
    g_remat = jax.jit(jax.grad(loss(diffpure(EPS, SCHED, remat=True, **kw), key)))(X)
    g_plain = jax.jit(jax.grad(loss(diffpure(EPS, SCHED, remat=False, **kw), key)))(X)
    g_fast = jax.jit(jax.grad(loss(diffpure(EPS_FAST, SCHED, **kw), key)))(X)
    assert float(jnp.abs(g_remat).max()) > 0
    np.testing.assert_allclose(g_remat, g_plain, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(g_fast, g_plain, atol=1e-5, rtol=1e-4)


def test_jvp_and_vjp_agree_and_finite_differences_match():
    pur = diffpure(EPS, SCHED, t_star=0.1, num_steps=3, sampler="ddpm")
    key = jr.key(8)
    f = lambda x: pur(x, key)
    v = jr.normal(jr.key(9), X.shape) * 0.01
    u = jr.normal(jr.key(10), X.shape)
    jv = jax.jvp(f, (X,), (v,))[1]
    (vju,) = jax.vjp(f, X)[1](u)
    np.testing.assert_allclose(jnp.vdot(jv, u), jnp.vdot(v, vju), rtol=1e-4)
    # central finite difference of the full purify + classify loss along a direction
    lf = loss(pur, key)
    h = 1e-2
    fd = (lf(X + h * v) - lf(X - h * v)) / (2 * h)
    np.testing.assert_allclose(fd, jnp.vdot(jax.grad(lf)(X), v), rtol=2e-2)


# eager gradients of three purifiers; BPDA's identity backward is checked in CI by
# test_diffdefense.py and the batch-invariance test's bpda rows
@pytest.mark.slow
def test_bpda_and_surrogate_gradients():
    key = jr.key(11)
    full = diffpure(EPS, SCHED, t_star=0.1, num_steps=4)
    bpda = full.replace(gradient="bpda")
    # two different XLA programs (the BPDA one wraps the chain in a custom_vjp): equal up to
    # float32 rounding, not bitwise
    np.testing.assert_allclose(jax.jit(bpda)(X, key), jax.jit(full)(X, key), atol=1e-6)
    u = jr.normal(jr.key(12), X.shape)
    g = jax.grad(lambda x: jnp.vdot(bpda(x, key), u))(X)
    np.testing.assert_allclose(g, u, atol=1e-6)  # identity backward
    surr = full.replace(gradient="surrogate", surrogate_steps=2)
    short = diffpure(EPS, SCHED, t_star=0.1, num_steps=2)
    np.testing.assert_allclose(jax.jit(surr)(X, key), jax.jit(full)(X, key), atol=1e-6)
    gs = jax.grad(lambda x: jnp.vdot(surr(x, key), u))(X)
    gshort = jax.grad(lambda x: jnp.vdot(short(x, key), u))(X)
    np.testing.assert_allclose(gs, gshort, atol=1e-6)
    assert bpda.nfe_backward == 0 and full.nfe_backward == 12


@pytest.mark.slow  # three purifier compilations for a composition rule
def test_multistage_composes_stages_with_folded_keys():
    key = jr.key(13)
    ms = multistage(EPS, SCHED, [(0.05, 2), (0.1, 3)])
    a = diffpure(EPS, SCHED, t_star=0.05, num_steps=2)
    b = diffpure(EPS, SCHED, t_star=0.1, num_steps=3)
    expect = b(a(X, jr.fold_in(key, 0)), jr.fold_in(key, 1))
    np.testing.assert_allclose(ms(X, key), expect, atol=1e-6)
    assert ms.nfe == 5


# one more purifier compilation; trajectories run in CI in the distance smoke
@pytest.mark.slow
def test_trajectory_ends_at_the_output():
    pur = diffpure(EPS, SCHED, t_star=0.1, num_steps=3, sampler="ddpm")
    key = jr.key(14)
    x_t, traj = pur.trajectory(X, key)
    assert traj.shape == (3, *X.shape) and x_t.shape == X.shape
    np.testing.assert_allclose(jnp.clip(traj[-1], 0, 1), pur(X, key), atol=1e-6)


# protocol chunking is checked in CI by
# test_evaluation.py::test_protocol_semantics_on_a_key_dependent_model
@pytest.mark.slow
def test_majority_vote_counts_and_chunking():
    pur = diffpure(EPS, SCHED, t_star=0.3, num_steps=2)
    key = jr.key(15)
    defended = DefendedModel(lambda x, k: logits_fn(x), pur)
    votes = majority_vote(defended, X, key, num_votes=4)
    chunked = majority_vote(defended, X, key, num_votes=4, chunk=2)
    np.testing.assert_array_equal(votes, chunked)
    np.testing.assert_array_equal(votes.sum(-1), 4)
    manual = sum(jax.nn.one_hot(jnp.argmax(logits_fn(pur(X, jr.fold_in(key, v))), -1), 10)
                 for v in range(4))
    np.testing.assert_array_equal(votes, manual)
    with pytest.raises(ValueError, match="divisor"):
        majority_vote(defended, X, key, num_votes=4, chunk=3)


def test_purifiers_over_other_parameters_share_one_compilation():
    from jaxrob._jit import filter_jit

    a = diffpure(_unet(seed=1), t_star=0.1, num_steps=2)
    b = a.replace(eps_fn=_unet(seed=2))  # same settings and shapes, other weights
    f = filter_jit(lambda p, x: p(x, jr.key(0)))
    ya, yb = f(a, X), f(b, X)
    assert f.cache_size() == 1  # the parameters are traced leaves, not baked in
    assert not np.allclose(ya, yb)
    # weights traced vs baked in as constants: other fusions, same values up to rounding
    np.testing.assert_allclose(ya, jax.jit(lambda x: a(x, jr.key(0)))(X), atol=1e-6)
    # another configuration is another compilation
    f(a.replace(stages=((0.1, 3),)), X)
    assert f.cache_size() == 2
    with pytest.raises(ValueError, match="derived"):
        a.replace(chains=())
