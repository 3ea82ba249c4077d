"""Samplers driven by the exact eps of a Gaussian data distribution recover that distribution."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.diffusion as jd

MU = jnp.array([0.5, -0.3, 0.1, 0.8]).reshape(1, 2, 2, 1)
SIG = 0.4
B = 8192
FULL = jd.linear_schedule(1000)


def exact_eps_discrete(schedule):
    """E[eps | x_n] for x0 ~ N(MU, SIG^2 I); labels index the full training schedule."""

    def eps_fn(x, label):
        # float labels (continuous-time samplers) are rounded to the nearest training step
        ab = FULL.alphas_cumprod[jnp.round(label).astype(jnp.int32)].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SIG**2 + 1 - ab)

    return eps_fn


def exact_eps_continuous(sde):
    def eps_fn(x, label):
        t = (label / (sde.num_train_steps - 1)).reshape(-1, 1, 1, 1)
        m, s = sde.marginal_mean_coeff(t), sde.marginal_std(t)
        return s * (x - m * MU) / (m**2 * SIG**2 + s**2)

    return eps_fn


def _check(x, tol_mean=0.03, tol_var=0.08):
    np.testing.assert_allclose(x.mean(0), np.broadcast_to(MU[0], x.shape[1:]), atol=tol_mean)
    np.testing.assert_allclose(x.var(0), SIG**2, rtol=tol_var)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_recovers_gaussian(variance):
    x_N = jr.normal(jr.key(0), (B, 2, 2, 1))
    f = jax.jit(lambda x, k: jd.ddpm_sample(exact_eps_discrete(FULL), x, k, FULL,
                                            variance=variance))
    tol_var = 0.08 if variance == "fixed_small" else 0.15
    _check(f(x_N, jr.key(1)), tol_var=tol_var)


@pytest.mark.parametrize("eta,steps", [(0.0, 1000), (0.0, 500), (1.0, 1000)])
def test_ddim_recovers_gaussian(eta, steps):
    sched = jd.respace(FULL, steps)
    x_N = jr.normal(jr.key(2), (B, 2, 2, 1))
    out = jax.jit(lambda x, k: jd.ddim_sample(exact_eps_discrete(FULL), x, k, sched, eta=eta))(
        x_N, jr.key(3))
    _check(out)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_vpsde_recovers_gaussian(method):
    sde = jd.VPSDE()
    x_T = jr.normal(jr.key(4), (B, 2, 2, 1))
    f = jax.jit(lambda x, k: jd.vpsde_sample(exact_eps_continuous(sde), x, k, sde,
                                             t_start=1.0, num_steps=1000, t_end=1e-3,
                                             method=method))
    _check(f(x_T, jr.key(5)))


def test_ddim_discretisation_error_shrinks_with_steps():
    """Deterministic DDIM contracts a Gaussian (Cauchy-Schwarz); the bias vanishes as steps grow."""
    x_N = jr.normal(jr.key(2), (B, 2, 2, 1))
    errs = []
    for steps in (25, 100, 1000):
        out = jd.ddim_sample(exact_eps_discrete(FULL), x_N, None, jd.respace(FULL, steps))
        errs.append(float(jnp.abs(out.var(0) - SIG**2).max()))
    assert errs[0] > errs[1] > errs[2]


def test_partial_chain_purification_is_consistent():
    """Forward to t_star then reverse (DiffPure): output is distributed as the data again."""
    x0 = MU + SIG * jr.normal(jr.key(6), (B, 2, 2, 1))
    sched = jd.truncated(FULL, 0.3)
    n = sched.num_steps - 1
    xt = jd.q_sample(x0, n, jr.normal(jr.key(7), x0.shape), sched)
    out = jd.ddpm_sample(exact_eps_discrete(FULL), xt, jr.key(8), sched)
    _check(out)


def test_ddim_eta0_deterministic_and_key_replays_noise():
    x = jr.normal(jr.key(9), (4, 2, 2, 1))
    eps_fn = exact_eps_discrete(FULL)
    sched = jd.respace(FULL, 20)
    a = jd.ddim_sample(eps_fn, x, jr.key(1), sched)
    b = jd.ddim_sample(eps_fn, x, jr.key(2), sched)
    np.testing.assert_array_equal(a, b)
    c = jd.ddpm_sample(eps_fn, x, jr.key(1), sched)
    d = jd.ddpm_sample(eps_fn, x, jr.key(1), sched)
    e = jd.ddpm_sample(eps_fn, x, jr.key(2), sched)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(c, e)


def test_noise_does_not_depend_on_batch_size():
    """Per-example keys folded in by the caller make results independent of the batch."""
    eps_fn = exact_eps_discrete(FULL)
    sched = jd.truncated(FULL, 0.1, 10)
    x = jr.normal(jr.key(10), (6, 2, 2, 1))
    keys = jax.vmap(lambda i: jr.fold_in(jr.key(3), i))(jnp.arange(6))
    f = jax.vmap(lambda xi, k: jd.ddpm_sample(eps_fn, xi[None], k, sched)[0])
    full = f(x, keys)
    part = f(x[2:4], keys[2:4])
    np.testing.assert_allclose(full[2:4], part, atol=1e-6)


def test_trajectory_and_remat_gradient():
    eps_fn = lambda x, lab: 0.1 * jnp.tanh(x) * (1 + lab.reshape(-1, 1, 1, 1) / 1000)
    sched = jd.truncated(FULL, 0.1, 10)
    x = jr.normal(jr.key(11), (2, 2, 2, 1))
    out, traj = jd.ddpm_sample(eps_fn, x, jr.key(0), sched, return_trajectory=True)
    assert traj.shape == (10, 2, 2, 2, 1)
    np.testing.assert_array_equal(traj[-1], out)
    loss = lambda x, remat: jnp.sum(jd.ddpm_sample(eps_fn, x, jr.key(0), sched, remat=remat) ** 2)
    np.testing.assert_allclose(jax.grad(loss)(x, True), jax.grad(loss)(x, False), rtol=1e-6)


def test_generate_and_bad_names():
    eps_fn = exact_eps_discrete(FULL)
    s = jd.respace(FULL, 25)
    for sampler in jd.SAMPLERS:
        out = jd.generate(eps_fn, jr.key(0), (3, 2, 2, 1), s, sampler=sampler)
        assert out.shape == (3, 2, 2, 1) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="sampler"):
        jd.generate(eps_fn, jr.key(0), (3, 2, 2, 1), s, sampler="euler")
    with pytest.raises(ValueError, match="t_star"):
        jd.vpsde_sample(eps_fn, jnp.zeros((1, 2, 2, 1)), jr.key(0), jd.VPSDE(), t_start=1.5)
