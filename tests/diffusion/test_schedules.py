import jax.numpy as jnp
import numpy as np
import pytest

import jaxrob.diffusion as jd


def test_linear_schedule_matches_ho_et_al():
    s = jd.linear_schedule(1000)
    np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
    assert s.num_steps == 1000
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                               rtol=1e-5)
    # abar is strictly decreasing, in (0, 1)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


@pytest.mark.parametrize("n", [10, 50, 1000, 4000])
def test_schedules_any_length(n):
    for s in (jd.linear_schedule(n), jd.cosine_schedule(n)):
        assert s.num_steps == n
        abar = np.asarray(s.alphas_cumprod)
        assert abar[0] > 0.95 and abar[-1] < 0.01
        assert np.all(np.diff(abar) < 0)


def test_cosine_matches_closed_form():
    s = jd.cosine_schedule(1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    n = np.arange(1, 1000)
    np.testing.assert_allclose(s.alphas_cumprod[:-1], f(n[:-0 or None]) / f(0), rtol=2e-4)


def test_respace_keeps_marginals_and_labels():
    s = jd.linear_schedule(1000)
    keep = np.arange(9, 1000, 10)
    r = jd.respace(s, keep)
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[keep], rtol=1e-5)
    np.testing.assert_array_equal(r.model_steps, keep)
    # respacing a respaced schedule composes
    rr = jd.respace(r, [0, 49, 99])
    np.testing.assert_array_equal(rr.model_steps, keep[[0, 49, 99]])
    np.testing.assert_allclose(rr.alphas_cumprod, s.alphas_cumprod[keep[[0, 49, 99]]], rtol=1e-5)


def test_truncated_diffpure_convention():
    s = jd.linear_schedule(1000)
    assert s.step_for_t_star(0.1) == 99  # DiffPure t=100 -> 100 forward steps
    for k in (10, 20, 100):
        t = jd.truncated(s, 0.1, k)
        assert t.num_steps == k and int(t.model_steps[-1]) == 99
        assert np.all(np.diff(np.asarray(t.model_steps)) > 0)
    np.testing.assert_array_equal(jd.truncated(s, 0.1, 10).model_steps, np.arange(9, 100, 10))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_t_star_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="t_star"):
        jd.linear_schedule().step_for_t_star(bad)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="monotone"):
        jd.linear_schedule(1000, beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match=r"beta in \(0, 1\)"):
        jd.from_betas([0.1, 1.2])
    with pytest.raises(ValueError, match="strictly increasing"):
        jd.from_betas([0.1, 0.2], model_steps=[3, 1])
    with pytest.raises(ValueError, match="1..100"):
        jd.truncated(jd.linear_schedule(), 0.1, 101)
    with pytest.raises(ValueError, match="beta_min"):
        jd.VPSDE(beta_min=20.0, beta_max=0.1)


def test_discretised_vpsde_approaches_ddpm_chain():
    """abar_n of the N-step linear chain -> m(t)^2 of the VP-SDE at t = (n+1)/N as N grows."""
    sde = jd.VPSDE()
    errs = []
    for n_steps in (100, 1000, 10000):
        s = jd.linear_schedule(n_steps)
        t = jnp.arange(1, n_steps + 1) / n_steps
        errs.append(float(jnp.max(jnp.abs(s.alphas_cumprod - sde.marginal_mean_coeff(t) ** 2))))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3
