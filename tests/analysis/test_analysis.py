"""Properties of jaxrob.analysis on tiny maps with known answers (runs in well under a minute)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.analysis as ja
from jaxrob.parallel import make_mesh

SHAPE = (1, 4, 4, 3)
D = 48
_rng = np.random.default_rng(0)


def _orthogonal(n):
    q, r = np.linalg.qr(_rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))[None, :]


# A linear map with a known spectrum: a gap after the top 5, nothing near 0.25 or 1.0.
S_TRUE = np.concatenate([[10.0, 8.0, 6.0, 5.0, 4.0], np.linspace(0.9, 0.3, 20),
                         np.linspace(0.2, 0.05, 23)])
A = jnp.asarray(_orthogonal(D) @ np.diag(S_TRUE) @ _orthogonal(D).T, jnp.float32)
B = jnp.asarray(_rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32)
C = jnp.asarray(_rng.normal(size=(18, 50)) / np.sqrt(50), jnp.float32)
X1 = jr.uniform(jr.key(0), SHAPE, minval=0.1, maxval=0.9)


def linear(x):
    return (A @ x.reshape(-1)).reshape(x.shape)


def smooth(x):  # tanh(B x + 0.1): J = diag(1 - tanh^2) B
    return jnp.tanh(B @ x.reshape(-1) + 0.1).reshape(x.shape)


def nonsquare(x):  # (1, 5, 5, 2) -> (1, 3, 3, 2): D_in = 50, D_out = 18
    return jnp.tanh(C @ x.reshape(-1)).reshape(1, 3, 3, 2)


def near_linear(x):
    return linear(x) + 0.05 * jnp.sin(x)


# ----------------------------------------------------------------------------- Jacobians
def test_jacobian_methods_agree_with_each_other_and_finite_differences():
    exact = np.asarray((1 - jnp.tanh(B @ X1.reshape(-1) + 0.1) ** 2)[:, None] * B)
    jacs = {m: np.asarray(ja.jacobian(smooth, X1, method=m)) for m in ("jacfwd", "jacrev")}
    jacs["jvp_chunks"] = np.asarray(ja.jacobian(smooth, X1, method="jvp_chunks", chunk=5))
    jacs["vjp_chunks"] = np.asarray(ja.jacobian(smooth, X1, method="vjp_chunks", chunk=8))
    for m, jac in jacs.items():
        assert jac.shape == (D, D), m
        np.testing.assert_allclose(jac, exact, atol=1e-5, err_msg=m)
    h = 1e-3
    g = lambda v: smooth(v.reshape(SHAPE)).reshape(-1)
    v = X1.reshape(-1)
    fd = jax.vmap(lambda e: (g(v + h * e) - g(v - h * e)) / (2 * h))(jnp.eye(D)).T
    np.testing.assert_allclose(jacs["jvp_chunks"], np.asarray(fd), rtol=1e-2, atol=1e-3)
    # Non-square map: (D_out, D_in) layout.
    x2 = jr.uniform(jr.key(1), (1, 5, 5, 2))
    j_rev = ja.jacobian(nonsquare, x2, method="vjp_chunks", chunk=7)
    assert j_rev.shape == (18, 50)
    np.testing.assert_allclose(j_rev, ja.jacobian(nonsquare, x2, method="jacfwd"), atol=1e-6)
    s = ja.singular_values(jacs["jacfwd"])
    np.testing.assert_allclose(s, np.linalg.svd(exact.astype(np.float64), compute_uv=False),
                               rtol=1e-4, atol=1e-6)


def test_sharded_jacobian_equals_single_device():
    mesh = make_mesh()
    assert mesh.shape["data"] == 8
    x2 = jr.uniform(jr.key(1), (1, 5, 5, 2))  # 50 inputs and 18 outputs: both padded to x8
    ref = np.asarray(ja.jacobian(nonsquare, x2, method="jacfwd"))
    for method, chunk in (("jvp_chunks", 2), ("vjp_chunks", None)):
        sharded = ja.jacobian(nonsquare, x2, method=method, chunk=chunk, mesh=mesh)
        assert len(sharded.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(sharded), ref, atol=1e-6, err_msg=method)


@pytest.mark.parametrize("method,ad,vectors", [("lanczos", "jvp", True),
                                               ("lanczos", "vjp", False),
                                               ("randomized", "jvp", False),
                                               ("randomized", "vjp", True)])
def test_top_singular_values_match_dense_svd(method, ad, vectors):
    jac = np.asarray(ja.jacobian(near_linear, X1, method="jacrev"), np.float64)
    ref = np.linalg.svd(jac, compute_uv=False)[:5]
    out = ja.top_singular_values(near_linear, X1, k=5, key=jr.key(3), method=method, ad=ad,
                                 return_vectors=vectors)
    s = out[0] if vectors else out
    assert s.shape == (5,)
    np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-3)
    if vectors:
        _, u, v = out
        np.testing.assert_allclose(jac @ np.asarray(v), np.asarray(u) * ref[None, :],
                                   rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.asarray(v).T @ np.asarray(v), np.eye(5), atol=1e-3)


# ----------------------------------------------------------------------------- compression
def test_spectral_compression_of_a_known_linear_map_is_exact():
    want_below, want_above = np.mean(S_TRUE < 0.25), np.mean(S_TRUE > 1.0)
    geo = np.exp(np.mean(np.log(S_TRUE)))
    direct = ja.spectral_compression(jnp.asarray(S_TRUE, jnp.float32))
    assert float(direct.frac_below) == pytest.approx(want_below, abs=1e-7)
    assert float(direct.frac_above) == pytest.approx(want_above, abs=1e-7)
    np.testing.assert_allclose(float(direct.geometric_mean), geo, rtol=1e-6)
    svals = ja.singular_values(ja.jacobian(linear, X1, method="jvp_chunks", chunk=16))
    spec = ja.spectral_compression(svals)
    assert float(spec.frac_below) == pytest.approx(want_below, abs=1e-7)
    assert float(spec.frac_above) == pytest.approx(5 / D, abs=1e-7)
    np.testing.assert_allclose(float(spec.geometric_mean), geo, rtol=1e-4)
    # Strict inequalities; batch axes kept; a zero singular value gives geometric mean 0.
    edge = ja.spectral_compression(jnp.array([[0.25, 1.0, 0.0, 2.0]]))
    np.testing.assert_allclose(edge.frac_below, [0.25])
    np.testing.assert_allclose(edge.frac_above, [0.25])
    np.testing.assert_allclose(edge.geometric_mean, [0.0])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_empirical_compression_of_scalar_map_equals_scalar(norm):
    x = jr.uniform(jr.key(4), (2, 4, 4, 3), minval=0.05, maxval=0.95)
    res = ja.compression_rate_empirical(lambda z: 0.3 * z, x, jr.key(5), eps=0.1, num=8,
                                        norm=norm, chunk=5)
    assert res.rate.shape == (2,)
    np.testing.assert_allclose(res.rate, [0.3, 0.3], rtol=1e-5)
    assert np.all(np.asarray(res.input_norm) > 0)


# ----------------------------------------------------------------------------- fits
def _logistic(x, b, t, k, x0):
    return b + (t - b) / (1 + np.exp(-k * (x - x0)))


def test_fit_sigmoid_recovers_parameters():
    x = np.linspace(0.0, 1.0, 41)
    true = (0.1, 0.9, 8.0, 0.4)
    fit = ja.fit_sigmoid(x, _logistic(x, *true))
    assert fit.converged and fit.names == ("bottom", "top", "k", "x0")
    np.testing.assert_allclose(fit.params, true, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fit.predict(x), _logistic(x, *true), atol=1e-6)
    two = ja.fit_sigmoid(x, _logistic(x, 0.0, 1.0, -6.0, 0.5), asymptotes=(0.0, 1.0))
    np.testing.assert_allclose(two.params, [-6.0, 0.5], rtol=1e-3, atol=1e-3)
    # Noisy data: every true parameter inside its 95% interval.
    xs = np.linspace(0.0, 1.0, 200)
    ys = _logistic(xs, *true) + np.random.default_rng(1).normal(0.0, 0.02, xs.shape)
    noisy = ja.fit_sigmoid(xs, ys, weights=np.ones_like(xs))
    assert np.all(noisy.ci[:, 0] < true) and np.all(np.array(true) < noisy.ci[:, 1])
    assert np.all(noisy.stderr > 0) and np.all(noisy.stderr < 0.5 * np.abs(true))


def test_psychometric_threshold_recovers_threshold_and_slope():
    s = np.linspace(0.0, 2.0, 21)
    n = np.full_like(s, 200.0)
    p = 1 / (1 + np.exp(-6.0 * (s - 1.0)))
    flips = np.random.default_rng(2).binomial(200, p).astype(float)
    fit = ja.psychometric_threshold(s, flips, trials=n)
    assert fit.converged and not fit.separated
    assert fit.threshold_ci[0] < 1.0 < fit.threshold_ci[1]
    assert fit.slope_ci[0] < 6.0 < fit.slope_ci[1]
    # Per-trial 0/1 outcomes give the same maximum-likelihood estimate as counts.
    s_t = np.repeat(s[::4], 4)
    y_t = np.tile([0.0, 1.0, 1.0, 0.0], s[::4].size)
    y_t[-4:] = 1.0
    y_t[:4] = 0.0
    a = ja.psychometric_threshold(s_t, y_t)
    b = ja.psychometric_threshold(s[::4], y_t.reshape(-1, 4).sum(1), trials=np.full(6, 4.0))
    np.testing.assert_allclose([a.threshold, a.slope], [b.threshold, b.slope], rtol=1e-6)
    # A perfect step: infinite slope, threshold between the last non-flip and the first flip.
    step = ja.psychometric_threshold([0.0, 0.5, 1.0, 1.5], [0, 0, 1, 1])
    assert step.separated and step.slope == np.inf and step.threshold == 0.75
    assert step.threshold_ci == (0.5, 1.0)


def test_fuzzy_robustness_curve_and_area():
    fr = ja.fuzzy_robustness(jnp.array([0.0, 0.0, 0.5, 1.0]), num_points=11)
    np.testing.assert_allclose(fr.curve[jnp.array([0, 4, 5, 10])], [0.5, 0.5, 0.75, 1.0])
    assert float(fr.area) == pytest.approx(0.625)
    fine = ja.fuzzy_robustness(jnp.array([0.1, 0.3, 0.35, 0.9]), num_points=2001)
    assert float(jnp.trapezoid(fine.curve, fine.p)) == pytest.approx(float(fine.area),
                                                                     abs=1e-3)


# ----------------------------------------------------------------------------- distances
def test_distances_by_hand_and_ssim_properties():
    x = jnp.zeros((2, 2, 2, 1))
    y = x.at[0, 0, 0, 0].set(0.3).at[0, 1, 1, 0].set(0.4).at[1, 0, 1, 0].set(-0.5)
    np.testing.assert_allclose(ja.l2_distance(x, y), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(ja.linf_distance(x, y), [0.4, 0.5], rtol=1e-6)
    img = jr.uniform(jr.key(6), (2, 16, 16, 2))
    np.testing.assert_allclose(ja.ssim(img, img), [1.0, 1.0], atol=1e-5)
    noise = jr.normal(jr.key(7), img.shape)
    s_small = ja.ssim(img, jnp.clip(img + 0.05 * noise, 0, 1))
    s_big = ja.ssim(img, jnp.clip(img + 0.2 * noise, 0, 1))
    assert np.all(np.asarray(s_big) < np.asarray(s_small))
    assert np.all(np.asarray(s_small) < 1.0)
    np.testing.assert_allclose(ja.ssim(img, s_img := jnp.flip(img, 1)), ja.ssim(s_img, img),
                               atol=1e-6)
    # Constant images: contrast/structure terms are C2/C2 = 1, luminance is closed form.
    c1 = 0.01**2
    want = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    got = ja.ssim(jnp.full((1, 11, 11, 1), 0.2), jnp.full((1, 11, 11, 1), 0.6))
    np.testing.assert_allclose(got, [want], rtol=1e-5)
    states = jnp.stack([img, jnp.clip(img + 0.05 * noise, 0, 1), img + 0.2 * noise])
    traj = ja.trajectory_distances(states, img)
    assert {k: v.shape for k, v in traj.items()} == {k: (3, 2) for k in ("l2", "linf", "ssim")}
    np.testing.assert_allclose(traj["ssim"][1], s_small, rtol=1e-6)
    np.testing.assert_allclose(traj["l2"][2], ja.l2_distance(states[2], img), rtol=1e-6)
    np.testing.assert_allclose(traj["l2"][0], [0, 0], atol=1e-6)


# ----------------------------------------------------------------------------- randomness
def test_displacement_correlations():
    d = jr.normal(jr.key(8), (1, 100))
    same = jnp.concatenate([d, d, 2.0 * d + 1.0], axis=0)
    corr, mean = ja.displacement_correlations(same)
    np.testing.assert_allclose(corr, np.ones((3, 3)), atol=1e-5)
    assert float(mean) == pytest.approx(1.0, abs=1e-5)
    ind = jr.normal(jr.key(9), (20, 2000))
    corr, mean = ja.displacement_correlations(ind)
    np.testing.assert_allclose(corr, np.corrcoef(np.asarray(ind, np.float64)), atol=1e-5)
    assert abs(float(mean)) < 0.02
    batch = jnp.stack([ind, -ind[::-1]], axis=1)  # (N, B=2, D)
    corr_b, mean_b = ja.displacement_correlations(batch)
    assert corr_b.shape == (2, 20, 20) and mean_b.shape == (2,)
    np.testing.assert_allclose(corr_b[0], corr, atol=1e-6)
    np.testing.assert_allclose(mean_b[1], mean, atol=1e-6)


def tiny_purify(x, key):
    """Contract towards 0.5 and add key-driven noise: compression within a key, not across."""
    return jnp.clip(0.6 * x + 0.2 + 0.1 * jr.normal(key, x.shape), 0.0, 1.0)


def test_randomness_decomposition_on_tiny_purifier():
    x = jr.uniform(jr.key(10), (2, 4, 4, 3), minval=0.2, maxval=0.8)
    res = ja.randomness_decomposition(tiny_purify, x, jr.key(11), eps=0.03, num=6)
    assert res.fixed_noise.displacements.shape == (6, 2, D)
    assert res.both.correlation.shape == (2, 6, 6)
    a, b = res.fixed_noise, res.fixed_input
    assert np.all(np.asarray(a.mean_correlation) > 0.95)
    assert np.all(np.asarray(a.mean_correlation) > np.asarray(b.mean_correlation))
    # Fixed noise compresses the input ball (by 0.6); varying noise expands far beyond it.
    np.testing.assert_allclose(a.radius, 0.6 * res.input_radius, rtol=1e-3)
    assert np.all(np.asarray(b.radius) > 3 * np.asarray(res.input_radius))
    assert np.all(np.asarray(res.both.radius) > 3 * np.asarray(res.input_radius))
    # Neither chunking nor the batch changes the result (per-example fold_in keys).
    alone = ja.randomness_decomposition(tiny_purify, x[1:], jr.key(11), eps=0.03, num=6,
                                        chunk=4, indices=jnp.array([1]))
    np.testing.assert_allclose(alone.both.displacements[:, 0], res.both.displacements[:, 1],
                               atol=1e-6)
    np.testing.assert_allclose(alone.fixed_noise.radius, res.fixed_noise.radius[1:],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error():
    x2 = jnp.zeros((2, 16, 16, 1))
    cases = [
        lambda: ja.jacobian(smooth, X1, method="hessian"),
        lambda: ja.jacobian(smooth, X1, method="jvp_chunks", chunk=0),
        lambda: ja.jacobian(smooth, X1, method="jacfwd", chunk=4),
        lambda: ja.jacobian(smooth, jnp.zeros(SHAPE, jnp.int32)),
        lambda: ja.top_singular_values(smooth, X1, k=D + 1, key=jr.key(0)),
        lambda: ja.top_singular_values(smooth, X1, k=5, num_iters=3, key=jr.key(0)),
        lambda: ja.top_singular_values(smooth, X1, k=5, key=jr.key(0), method="arnoldi"),
        lambda: ja.top_singular_values(smooth, X1, k=5, key=jr.key(0), ad="fwd"),
        lambda: ja.singular_values(jnp.zeros((2, 3, 4))),
        lambda: ja.ssim(x2, x2[:1]),
        lambda: ja.ssim(x2[:, :8, :8], x2[:, :8, :8]),
        lambda: ja.l2_distance(x2[0], x2[0]),
        lambda: ja.trajectory_distances(x2, x2),
        lambda: ja.displacement_correlations(jnp.zeros(5)),
        lambda: ja.displacement_correlations(jnp.zeros((1, 5))),
        lambda: ja.randomness_decomposition(tiny_purify, X1, jr.key(0), eps=0.1, num=1),
        lambda: ja.randomness_decomposition(tiny_purify, X1, jr.key(0), eps=0.1, num=4,
                                            norm="l1"),
        lambda: ja.compression_rate_empirical(lambda z: z, X1, jr.key(0), eps=-1.0, num=4),
        lambda: ja.compression_rate_empirical(lambda z: z, X1[0], jr.key(0), eps=0.1, num=4),
        lambda: ja.spectral_compression(jnp.array([-1.0, 1.0])),
        lambda: ja.spectral_compression(jnp.ones(3), low=2.0, high=1.0),
        lambda: ja.fit_sigmoid([0, 1, 2], [0, 1, 1]),
        lambda: ja.fit_sigmoid(np.arange(6.0), np.arange(5.0)),
        lambda: ja.fit_sigmoid(np.arange(6.0), np.arange(6.0), level=95),
        lambda: ja.psychometric_threshold([1.0, 1.0], [0, 1]),
        lambda: ja.psychometric_threshold([0.0, 1.0], [0, 2]),
        lambda: ja.fuzzy_robustness(jnp.array([0.5, 1.5])),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


@jax.custom_vjp
def _tanh_reverse_only(z):  # like models built with fast_vjp=True: no forward mode
    return jnp.tanh(z)


_tanh_reverse_only.defvjp(lambda z: (jnp.tanh(z), jnp.tanh(z)),
                          lambda t, g: (g * (1 - t * t),))


def test_reverse_mode_only_maps_use_ad_vjp():
    f = lambda x: _tanh_reverse_only(B @ x.reshape(-1)).reshape(x.shape)
    jac = np.asarray(ja.jacobian(f, X1, method="vjp_chunks", chunk=16), np.float64)
    s = ja.top_singular_values(f, X1, k=3, key=jr.key(0), ad="vjp", num_iters=D)
    np.testing.assert_allclose(s, np.linalg.svd(jac, compute_uv=False)[:3], rtol=1e-4)
    with pytest.raises(TypeError, match="forward-mode"):
        ja.top_singular_values(f, X1, k=3, key=jr.key(0), ad="jvp")


def test_jacobian_compiles_once_per_function_and_shape():
    from jaxrob.analysis import _jacobian

    f = lambda x: jnp.sin(x) * 2.0
    n0 = _jacobian._jacobian._cache_size()
    for seed in range(3):
        ja.jacobian(f, jr.uniform(jr.key(seed), (1, 2, 2, 1)), method="jvp_chunks", chunk=2)
    assert _jacobian._jacobian._cache_size() == n0 + 1


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_mixed_ad_takes_jvp_of_f_and_vjp_of_its_reverse_twin(method):
    """ad="mixed": J from forward mode of f, J^T from reverse mode of the reverse-only twin."""
    f = lambda x: jnp.tanh(B @ x.reshape(-1)).reshape(x.shape)
    f_rev = lambda x: _tanh_reverse_only(B @ x.reshape(-1)).reshape(x.shape)
    ref = np.linalg.svd(np.asarray(ja.jacobian(f, X1, method="jacfwd"), np.float64),
                        compute_uv=False)[:3]
    s = ja.top_singular_values(f, X1, k=3, key=jr.key(0), method=method, ad="mixed",
                               f_reverse=f_rev, return_vectors=True)[0]
    np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-3)
    with pytest.raises(ValueError, match="f_reverse"):
        ja.top_singular_values(f, X1, k=3, key=jr.key(0), ad="mixed")
    with pytest.raises(ValueError, match="f_reverse"):
        ja.top_singular_values(f, X1, k=3, key=jr.key(0), ad="jvp", f_reverse=f_rev)
