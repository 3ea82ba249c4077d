"""FAB (its box-constrained projections, FAB / FAB-T) and AutoAttack on the digits classifier.

Compilation dominates: every AutoAttack run here uses the same pytree model (a noise scale leaf,
0 for the deterministic model) and batch_size=8 (one bucket), so each attack compiles once for
the whole file; only the batch-size test adds the 16-example bucket.
"""

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms, predictions
from scipy.optimize import linprog

import jaxrob.attacks as ja
from jaxrob._pytree import pytree_dataclass, static_field

TOL = 1e-6


@pytree_dataclass
class Noisy:
    """The digits classifier plus ``scale`` times Gaussian noise drawn from the key (a leaf, so
    the deterministic model, scale 0, and the randomised one share every compilation)."""

    base: Callable = static_field()
    scale: jax.Array

    def __call__(self, x, key):
        z = self.base(x, key)
        return z + self.scale * jr.normal(key, z.shape)


@pytest.fixture(scope="module")
def det(model):
    logits_fn, x, y = model
    return Noisy(logits_fn, jnp.float32(0.0)), x[:16], y[:16]


# ---------------------------------------------------------------------------------------------
# Projections onto {z : <w, z> = b} inside the box [0, 1]^D.


def _problem(seed, n=6, dim=12, scale=0.05):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.2, 0.8, (n, dim)).astype(np.float32)
    w = rng.normal(size=(n, dim)).astype(np.float32)
    w[:, :2] = 0.0  # coordinates the hyperplane does not see
    b = (np.sum(w * t, 1) + scale * rng.normal(size=n) * np.abs(w).sum(1)).astype(np.float32)
    return t, w, b


def test_projections_match_the_closed_forms_when_the_box_is_inactive():
    t, w, b = _problem(0, scale=0.01)  # close hyperplanes: no coordinate reaches the box
    c = (w * t).sum(1) - b
    d_l2 = np.asarray(ja.projection_l2(t, w, b))
    np.testing.assert_allclose(d_l2, -(c / (w**2).sum(1))[:, None] * w, atol=1e-5)
    d_linf = np.asarray(ja.projection_linf(t, w, b))
    np.testing.assert_allclose(d_linf, -(c / np.abs(w).sum(1))[:, None] * np.sign(w), atol=1e-5)
    d_l1 = np.asarray(ja.projection_l1(t, w, b))
    i = np.abs(w).argmax(1)
    want = np.zeros_like(w)
    want[np.arange(len(i)), i] = -c / w[np.arange(len(i)), i]
    np.testing.assert_allclose(d_l1, want, atol=1e-5)


def _l2_exact(t, w, b):
    """min ||d||_2 s.t. <w, t + d> = b, t + d in [0, 1]: d = clip(t - a w, 0, 1) - t for the
    a >= 0 (after orienting w) that meets the hyperplane, by bisection (the box corner where it
    cannot be met)."""
    out = []
    for ti, wi, bi in zip(t.astype(np.float64), w.astype(np.float64), b, strict=True):
        s = 1.0 if wi @ ti - bi >= 0 else -1.0
        g = lambda a, ti=ti, wi=wi, s=s, bi=bi: s * (wi @ np.clip(ti - a * s * wi, 0, 1) - bi)
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
        out.append(np.clip(ti - hi * s * wi, 0, 1) - ti)
    return np.stack(out)


def _lpnorms(t, w, b, norm):
    """The optimal ||d|| of min ||d||_inf or ||d||_1 s.t. <w, t + d> = b, t + d in [0, 1]."""
    dim = t.shape[0]
    if norm == "linf":  # variables (d, s): min s, -s <= d_i <= s
        cost = np.r_[np.zeros(dim), 1.0]
        a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
        a_eq = np.r_[w, 0.0][None]
        bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)]
    else:  # variables (d, e): min sum e, -e <= d <= e
        cost = np.r_[np.zeros(dim), np.ones(dim)]
        a_ub = np.block([[np.eye(dim), -np.eye(dim)], [-np.eye(dim), -np.eye(dim)]])
        a_eq = np.r_[w, np.zeros(dim)][None]
        bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)] * dim
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=a_eq, b_eq=[b - w @ t],
                  bounds=bounds)
    assert res.status == 0
    return res.fun


def test_projections_are_the_smallest_feasible_step_under_the_box():
    t, w, b = _problem(1, scale=0.3)  # far hyperplanes: the box is active, still reachable
    t64, w64 = t.astype(np.float64), w.astype(np.float64)
    for norm, proj in (("l2", ja.projection_l2), ("linf", ja.projection_linf),
                       ("l1", ja.projection_l1)):
        d = np.asarray(proj(t, w, b), np.float64)
        z = t64 + d
        assert z.min() >= -TOL and z.max() <= 1 + TOL, norm
        np.testing.assert_allclose((w64 * z).sum(1), b, atol=1e-4, err_msg=norm)
        assert np.all(d[:, :2] == 0), norm  # untouched where w = 0
        if norm == "l2":
            np.testing.assert_allclose(d, _l2_exact(t, w, b), atol=1e-4)
        else:
            best = [_lpnorms(t64[i], w64[i], float(b[i]), norm) for i in range(len(b))]
            np.testing.assert_allclose(norms(d, norm), best, rtol=1e-4, atol=1e-5,
                                       err_msg=norm)


# ---------------------------------------------------------------------------------------------
# FAB / FAB-T.


# One compilation each (~5 s idle): FAB-T in Linf runs in every AutoAttack test below, the
# projections of all three norms are checked above, so the other cases are slow-marked.
@pytest.mark.parametrize("norm,eps,targeted", [
    ("l2", 3.0, False),
    pytest.param("linf", 0.3, False, marks=pytest.mark.slow),
    pytest.param("l2", 3.0, True, marks=pytest.mark.slow),
    pytest.param("l1", 10.0, False, marks=pytest.mark.slow)])
def test_fab_stays_in_the_ball_and_fools_an_undefended_model(model, norm, eps, targeted):
    logits_fn, x, y = model
    res = ja.fab(logits_fn, x, y, jr.key(0), eps=eps, norm=norm, num_steps=20,
                 targeted=targeted, n_target_classes=3)
    n = norms(res.x_adv - x, norm)
    assert n.max() <= eps * (1 + TOL) + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    pred, yy = predictions(logits_fn, res.x_adv), np.asarray(y)
    assert np.mean(pred == yy) == 0.0
    np.testing.assert_array_equal(res.success, True)
    clean_wrong = predictions(logits_fn, x) != yy
    assert clean_wrong.any()  # not attacked: x_adv = x, distance 0
    np.testing.assert_array_equal(np.asarray(res.x_adv)[clean_wrong], np.asarray(x)[clean_wrong])
    np.testing.assert_allclose(np.asarray(res.norm), n, rtol=1e-5, atol=1e-6)
    if norm == "l1":
        return
    # A linear model: no adversarial point is closer than the nearest hyperplane f_j = f_y
    # without the box (dual norm), and FAB's first step alone, to the box projection onto that
    # hyperplane with a 5% overshoot, is adversarial.
    w = np.asarray(jax.jacobian(lambda v: logits_fn(v, None)[0])(x[:1])).reshape(10, -1)
    z = np.asarray(logits_fn(x, None))
    dual = {"linf": 1, "l2": 2}[norm]
    proj = {"linf": ja.projection_linf, "l2": ja.projection_l2}[norm]
    ids = np.flatnonzero(~clean_wrong)
    dw = np.stack([w - w[yy[i]] for i in ids])  # (n, K, D)
    gap = np.stack([z[i, yy[i]] - z[i] for i in ids])  # (n, K), 0 at y
    dist = gap / np.maximum(np.linalg.norm(dw, ord=dual, axis=2), 1e-30)
    dist[np.arange(len(ids)), yy[ids]] = np.inf
    j = dist.argmin(1)
    w_j = dw[np.arange(len(ids)), j]
    x_i = np.asarray(x).reshape(x.shape[0], -1)[ids]
    d = np.asarray(proj(x_i, w_j, (w_j * x_i).sum(1) + gap[np.arange(len(ids)), j]))
    found = n[ids]
    assert np.all(found >= dist.min(1) * (1 - 1e-4))
    if not targeted:  # FAB-T aims at fixed targets, not the nearest class
        assert np.all(found <= 1.05 * norms(d, norm) * (1 + 1e-4) + 1e-6)


def test_fab_bad_inputs_raise(model):
    logits_fn, x, y = model
    bad = [dict(eps=0.0), dict(eps=-1.0), dict(eps=0.1, norm="l0"),
           dict(eps=0.1, targeted=True, n_target_classes=10), dict(eps=0.1, num_steps=0),
           dict(eps=0.1, alpha_max=1.5), dict(eps=0.1, eta=0.9), dict(eps=0.1, beta=-0.1)]
    for kw in bad:
        with pytest.raises(ValueError):
            ja.fab(logits_fn, x, y, jr.key(0), **kw)


# ---------------------------------------------------------------------------------------------
# AutoAttack.

AA = dict(eps=0.1, n_iter=10, n_queries=100, batch_size=8)


@pytest.fixture(scope="module")
def standard(det):
    m, x, y = det
    return ja.autoattack(m, x, y, jr.key(0), **AA)


def test_autoattack_standard_runs_every_attack_on_the_still_robust(det, standard):
    m, x, y = det
    r = standard
    assert r.stages == ("clean", "apgd-ce", "apgd-t", "fab-t", "square")
    acc = [r.accuracy[s] for s in r.stages]
    assert all(a >= b for a, b in zip(acc, acc[1:], strict=False))  # running accuracy
    assert acc[0] > acc[-1] > 0  # broke some, not all: the later attacks had work to do
    assert np.mean(r.robust) == pytest.approx(acc[-1])
    np.testing.assert_array_equal(r.robust, r.broken_by == -1)
    for s in range(len(r.stages)):
        assert np.mean((r.broken_by >= 0) & (r.broken_by <= s)) == pytest.approx(1 - acc[s])
    assert norms(r.x_adv - np.asarray(x), "linf").max() <= AA["eps"] * (1 + TOL) + TOL
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    broken = ~r.robust
    assert np.all(predictions(m.base, jnp.asarray(r.x_adv))[broken] != np.asarray(y)[broken])
    np.testing.assert_array_equal(r.x_adv[r.robust], np.asarray(x)[r.robust])
    assert r.consistent and r.final_accuracy == pytest.approx(acc[-1])
    assert not r.looks_randomised and r.randomness == 0.0
    assert not r.outputs_probabilities


def test_autoattack_is_the_intersection_of_its_attacks_alone(det, standard):
    """Per-example keys: each attack breaks the same examples whether it runs alone or after
    the others, so AutoAttack's robust set is the intersection of the attacks' robust sets (and
    its accuracy never above any one's)."""
    m, x, y = det
    robust_all = np.ones(x.shape[0], bool)
    for attack in standard.attacks:
        alone = ja.autoattack(m, x, y, jr.key(0), version="custom", attacks=[attack], **AA)
        assert np.mean(standard.robust) <= alone.accuracy[attack]
        assert np.all(standard.robust <= alone.robust)
        robust_all &= alone.robust
    np.testing.assert_array_equal(standard.robust, robust_all)


def test_autoattack_does_not_depend_on_batch_size_or_chunking(det, standard):
    m, x, y = det
    # Another batch size compiles every attack anew (a 16-example bucket): the two targeted
    # attacks only, whose stages (one per target class) shrink the still-robust set most often.
    kw = dict(version="custom", attacks=["apgd-t", "fab-t"], **AA)
    small = ja.autoattack(m, x, y, jr.key(0), **kw)
    big = ja.autoattack(m, x, y, jr.key(0), **{**kw, "batch_size": 16})
    np.testing.assert_array_equal(big.broken_by, small.broken_by)
    np.testing.assert_allclose(big.x_adv, small.x_adv, atol=1e-6)
    assert 0 < np.mean(small.robust) < np.mean(small.broken_by != 0)  # both attacks broke some
    # Chunking: the second half alone, with its global indices, is the full run's second half.
    half = ja.autoattack(m, x[8:], y[8:], jr.key(0), indices=np.arange(8, 16), **AA)
    np.testing.assert_array_equal(half.broken_by, standard.broken_by[8:])
    np.testing.assert_allclose(half.x_adv, standard.x_adv[8:], atol=1e-6)


def test_autoattack_apgd_t_and_fab_t_reach_zero_at_a_large_eps(det):
    m, x, y = det
    for attack in ("apgd-t", "fab-t"):
        r = ja.autoattack(m, x, y, jr.key(1), version="custom", attacks=[attack],
                          **{**AA, "eps": 0.3, "n_target_classes": 3})
        assert r.accuracy[attack] == 0.0, attack
        assert r.max_perturbation <= 0.3 * (1 + TOL) + TOL
        assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0


def test_autoattack_flags_a_randomised_model(det):
    m, x, y = det
    kw = dict(version="custom", attacks=["apgd-ce"], **AA)
    noisy = m.replace(scale=jnp.float32(0.5))
    with pytest.warns(UserWarning, match="use version='rand'"):
        r = ja.autoattack(noisy, x, y, jr.key(0), **kw)
    assert r.looks_randomised and r.randomness > 1e-4
    r = ja.autoattack(m, x, y, jr.key(0), **kw)
    assert not r.looks_randomised and r.randomness == 0.0


@pytest.mark.slow  # two more compilations (APGD-CE and APGD-DLR with 20 EoT samples), ~20 s
def test_autoattack_rand_version_runs_eot_apgd_without_the_warning(det):
    m, x, y = det
    noisy = m.replace(scale=jnp.float32(0.5))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*use version='rand'")
        r = ja.autoattack(noisy, x[:8], y[:8], jr.key(0), version="rand",
                          **{**AA, "eps": 0.3, "n_iter": 5})
    assert r.attacks == ("apgd-ce", "apgd-dlr") and r.looks_randomised
    assert r.max_perturbation <= 0.3 * (1 + TOL) + TOL
    assert r.accuracy["apgd-dlr"] <= r.accuracy["clean"]


def test_autoattack_bad_inputs_raise_before_any_work(det):
    m, x, y = det
    calls = []

    def logged(x_, key):
        jax.debug.callback(lambda: calls.append(1))  # runs on evaluation, not on tracing
        return m(x_, key)

    bad = [dict(version="strong"),
           dict(version="custom", attacks=["apgd-ce", "pgd"]),
           dict(version="custom"),
           dict(version="standard", attacks=["apgd-ce"]),
           dict(norm="L1", version="standard"),  # the names are lower case
           dict(norm="l0", version="custom", attacks=["fab"]),
           dict(n_target_classes=10),  # 10 classes: at most 9 targets
           dict(version="custom", attacks=["fab-t"], n_target_classes=12),
           dict(n_queries=0), dict(eps=0.0), dict(eps=-0.1), dict(n_iter=0),
           dict(batch_size=0), dict(indices=np.zeros(16, int))]
    for kw in bad:
        with pytest.raises(ValueError):
            ja.autoattack(logged, x, y, jr.key(0), **{"eps": 0.1, **kw})
    assert not calls  # the model was only ever traced abstractly
