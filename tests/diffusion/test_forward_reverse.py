import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.diffusion as jd

S = jd.linear_schedule(1000)


@pytest.mark.parametrize("n", [0, 99, 500, 999])
def test_q_sample_matches_closed_form_marginal(n):
    x0 = jnp.full((20000, 2, 2, 1), 0.7)
    x0 = x0.at[:, 0].set(-0.3)
    xn = jd.q_sample(x0, n, jr.normal(jr.key(0), x0.shape), S)
    m, s = (float(v) for v in jd.q_mean_std(n, S))
    np.testing.assert_allclose(xn.mean(0), m * x0[0], atol=4 * s / np.sqrt(20000) + 1e-6)
    np.testing.assert_allclose(xn.std(0), s, rtol=0.03)


def test_parameterisations_roundtrip():
    k1, k2 = jr.split(jr.key(1))
    x0 = jr.uniform(k1, (4, 3, 3, 2), minval=-1, maxval=1)
    eps = jr.normal(k2, x0.shape)
    n = jnp.array([0, 10, 500, 999])
    xt = jd.q_sample(x0, n, eps, S)
    np.testing.assert_allclose(jd.predict_x0(xt, n, eps, S), x0, atol=2e-4)
    np.testing.assert_allclose(jd.predict_eps(xt, n, x0, S), eps, atol=2e-3)
    np.testing.assert_allclose(jd.score_to_eps(jd.eps_to_score(eps, n, S), n, S), eps, atol=1e-5)


@pytest.mark.parametrize("n", [1, 10, 300, 999])
def test_posterior_equals_bayes_rule(n):
    """q(x_{n-1}|x_n, x0) ∝ q(x_{n-1}|x0) q(x_n|x_{n-1}): Gaussian product, in closed form."""
    x0 = jnp.array([0.3, -0.8]).reshape(2, 1, 1, 1)
    xt = jnp.array([1.1, 0.2]).reshape(2, 1, 1, 1)
    mean, var = jd.posterior_mean_var(x0, xt, n, S)
    betas64 = np.linspace(1e-4, 0.02, 1000)  # reference in float64
    abar_prev = np.prod(1 - betas64[:n])
    alpha, beta = 1 - betas64[n], betas64[n]
    prec = 1 / (1 - abar_prev) + alpha / beta
    bayes_var = 1 / prec
    bayes_mean = bayes_var * (np.sqrt(abar_prev) * np.asarray(x0) / (1 - abar_prev)
                              + np.sqrt(alpha) * np.asarray(xt) / beta)
    np.testing.assert_allclose(np.broadcast_to(var, mean.shape), bayes_var, rtol=1e-4)
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-4, atol=1e-6)


def test_ddpm_step_at_zero_adds_no_noise_and_mean_formula():
    x = jr.normal(jr.key(2), (3, 2, 2, 1))
    eps = jr.normal(jr.key(3), x.shape)
    noise = jr.normal(jr.key(4), x.shape)
    out0 = jd.ddpm_step(x, 0, eps, noise, S)
    np.testing.assert_allclose(out0, jd.predict_x0(x, 0, eps, S), atol=1e-5)
    # unclipped DDPM mean = (x - beta/sqrt(1-abar) eps)/sqrt(alpha)  (Ho et al. Alg. 2)
    n = 57
    mean = jd.ddpm_step(x, n, eps, jnp.zeros_like(x), S)
    b, ab = S.betas[n], S.alphas_cumprod[n]
    np.testing.assert_allclose(mean, (x - b / jnp.sqrt(1 - ab) * eps) / jnp.sqrt(1 - b),
                               rtol=1e-4, atol=1e-5)


def test_ddim_eta1_has_ddpm_variance_and_eta0_is_deterministic():
    x = jr.normal(jr.key(5), (2, 2, 2, 1))
    eps = jr.normal(jr.key(6), x.shape)
    z = jr.normal(jr.key(7), x.shape)
    n = 300
    d1 = jd.ddim_step(x, n, eps, z, S, eta=1.0) - jd.ddim_step(x, n, eps, 0 * z, S, eta=1.0)
    p1 = jd.ddpm_step(x, n, eps, z, S) - jd.ddpm_step(x, n, eps, 0 * z, S)
    np.testing.assert_allclose(d1, p1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jd.ddim_step(x, n, eps, z, S, eta=0.0),
                               jd.ddim_step(x, n, eps, -z, S, eta=0.0))


def test_unknown_variance_is_rejected():
    x = jnp.zeros((1, 1, 1, 1))
    with pytest.raises(ValueError, match="fixed_small"):
        jd.ddpm_step(x, 1, x, x, S, variance="learned")


def test_steps_are_jittable_and_differentiable():
    f = jax.jit(lambda x: jnp.sum(jd.ddpm_step(x, 5, 0.1 * x, jnp.ones_like(x), S) ** 2))
    g = jax.grad(f)(jnp.ones((2, 2, 2, 1)))
    assert g.shape == (2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(g)))
