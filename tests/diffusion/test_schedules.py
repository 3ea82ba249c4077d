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


@pytest.mark.parametrize("beta_start,beta_end,n", [(1e-4, 0.02, 1000), (2e-4, 0.03, 1000),
                                                    (1e-4, 0.02, 500)])
def test_vpsde_from_schedule_recovers_the_linear_training_betas(beta_start, beta_end, n):
    """beta_min = N beta_1, beta_max = N beta_N, from the full schedule and from respaced /
    truncated chains of it (only abar at the kept steps survives there)."""
    full = jd.linear_schedule(n, beta_start=beta_start, beta_end=beta_end)
    want = (float(full.betas[0]) * n, float(full.betas[-1]) * n)
    for sched in (full, jd.respace(full, 25), jd.truncated(full, 0.1, 10)):
        sde = jd.VPSDE.from_schedule(sched)
        np.testing.assert_allclose((sde.beta_min, sde.beta_max), want, rtol=1e-5)
        assert sde.num_train_steps == n
    assert jd.VPSDE.from_schedule(jd.linear_schedule(1000)) == jd.VPSDE()


def test_vpsde_samplers_refuse_a_schedule_without_a_vp_sde():
    """A cosine schedule has no linear-beta VP-SDE: the 'sde' purifier refuses it instead of
    silently running beta 0.1..20 (what it did before)."""
    from jaxrob.purify import diffpure

    with pytest.raises(ValueError, match="linear beta schedule"):
        jd.VPSDE.from_schedule(jd.cosine_schedule(1000))
    eps_fn = lambda x, t: jnp.zeros_like(x)
    with pytest.raises(ValueError, match="linear beta schedule"):
        diffpure(eps_fn, jd.cosine_schedule(1000), t_star=0.1, num_steps=2, sampler="sde")
    pur = diffpure(eps_fn, jd.linear_schedule(1000, beta_end=0.03), t_star=0.1, num_steps=2,
                   sampler="ode")
    np.testing.assert_allclose(pur.sde.beta_max, 30.0, rtol=1e-6)
    assert diffpure(eps_fn, jd.linear_schedule(1000), t_star=0.1, num_steps=2).sde is None


# --------------------------------------------------------------------------- respacing precision


def _float64_chain(betas64, keep):
    """Independent float64 respacing of ``betas64`` at positions ``keep`` (log-space sums)."""
    log_abar = np.cumsum(np.log1p(-betas64))[keep]
    log_abar_prev = np.concatenate([[0.0], log_abar[:-1]])
    betas = -np.expm1(log_abar - log_abar_prev)
    one_m, one_m_prev = -np.expm1(log_abar), -np.expm1(log_abar_prev)
    var = betas * one_m_prev / one_m
    return {
        "betas": betas,
        "alphas_cumprod": np.exp(log_abar),
        "one_minus_alphas_cumprod": one_m,
        "posterior_variance": var,
        "ddim_sigma": np.sqrt(var),  # DDIM eta = 1: sqrt((1 - abar') / (1 - abar) (1 - abar/abar'))
    }


def _stored(s):
    f64 = lambda a: np.asarray(a, np.float64)
    betas, one_m, one_m_prev = (
        f64(s.betas),
        f64(s.one_minus_alphas_cumprod),
        f64(s.one_minus_alphas_cumprod_prev),
    )
    np.testing.assert_allclose(  # ddim_step's sigma^2 is eta^2 * posterior_variance
        f64(s.posterior_variance), betas * one_m_prev / one_m, rtol=3e-7, atol=0
    )
    return {
        "betas": betas,
        "alphas_cumprod": f64(s.alphas_cumprod),
        "one_minus_alphas_cumprod": one_m,
        "posterior_variance": f64(s.posterior_variance),
        "ddim_sigma": np.sqrt(f64(s.posterior_variance)),
    }


def _evenly(n, k):
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def _linear64():
    return np.linspace(1e-4, 0.02, 1000, dtype=np.float64)


def _cosine64(n=1000, s=0.008):
    f = lambda t: np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2
    i = np.arange(n, dtype=np.float64)
    return np.minimum(1 - f(i + 1) / f(i), 0.999)


@pytest.mark.parametrize(
    "name, keep",
    [
        ("linear", _evenly(1000, 50)),
        ("linear", _evenly(1000, 10)),
        ("linear", _evenly(1000, 100)),
        ("linear", np.arange(0, 1000, 20)),  # DDIM's 50 "leading" steps: 0, 20, ..., 980
        ("linear", np.array([0, 1, 2, 500, 998, 999])),  # single steps next to wide windows
        ("linear", np.array([999])),  # one step over the whole chain: beta = 1 - abar_N
        ("cosine", _evenly(1000, 50)),
        ("cosine", _evenly(1000, 10)),  # the last window holds the clipped beta = 0.999
        ("cosine", np.arange(0, 1000, 20)),
    ],
)
def test_respace_matches_float64_at_every_step(name, keep):
    base, betas64 = {
        "linear": (jd.linear_schedule(1000), _linear64()),
        "cosine": (jd.cosine_schedule(1000), _cosine64()),
    }[name]
    got, want = _stored(jd.respace(base, keep)), _float64_chain(betas64, keep)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=0, err_msg=key)


@pytest.mark.parametrize("t_star", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [None, 10, 100])
def test_truncated_matches_float64_at_every_step(t_star, num_steps):
    s = jd.truncated(jd.linear_schedule(1000), t_star, num_steps)
    keep = np.asarray(s.model_steps)
    assert keep[-1] == round(t_star * 1000) - 1
    want = _float64_chain(_linear64(), keep)
    for key, value in _stored(s).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-6, atol=0, err_msg=key)


def test_respace_high_noise_ddim_sigma():
    """The reported case: t = 980 of DDIM's 50 steps, sigma(eta=1) = 0.569741 (float64)."""
    keep = np.arange(0, 1000, 20)
    r = jd.respace(jd.linear_schedule(1000), keep)
    sigma = float(np.sqrt(np.float64(r.posterior_variance[-1])))
    want = _float64_chain(_linear64(), keep)["ddim_sigma"][-1]
    np.testing.assert_allclose(sigma, want, rtol=1e-6)
    assert round(sigma, 6) == 0.569741


@pytest.mark.torch
@pytest.mark.diffusers
def test_respace_matches_diffusers_ddim_variance():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    sched.set_timesteps(50)
    ts = np.asarray(sched.timesteps)
    np.testing.assert_array_equal(ts, np.arange(980, -1, -20))
    want = np.array([float(sched._get_variance(int(t), int(t) - 20)) for t in ts])[::-1]
    r = jd.respace(jd.linear_schedule(1000), ts[::-1])
    got = np.asarray(r.posterior_variance, np.float64)
    # diffusers works in float32: 1 - abar / abar' loses digits at small betas (1.6e-4 relative
    # at t = 20, where ours agrees with float64 to 1e-7) but is accurate at high noise, where the
    # old respacing was off by 2e-3.
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=0)
    np.testing.assert_allclose(got[25:], want[25:], rtol=1e-5, atol=0)
