"""APGD-L1 (Croce & Hein 2021) and AutoAttack's L1 version: the projection onto the L1 ball
intersected with the box, the iterates, the attack's strength, the version's stages."""

import os
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms, predictions
from scipy.optimize import minimize

import jaxrob
import jaxrob.attacks as ja
from jaxrob.attacks._apgd import largereps_schedule
from jaxrob.attacks._autoattack import _TAGS, _plan, _stage

REPO = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = pathlib.Path(os.environ.get("JAXROB_AUTOATTACK_REFERENCE",
                                        REPO.parent / "ext" / "auto-attack"))
TOL = 1e-5


def _random_problems(rng, batch, dim):
    """Centres in [0, 1] (a quarter of the pixels on the box's faces) and points around them."""
    x = rng.uniform(size=(batch, dim, 1, 1)).astype(np.float32)
    x[:, : max(dim // 4, 1)] = np.round(x[:, : max(dim // 4, 1)])
    t = (rng.normal(size=x.shape) * rng.uniform(0.1, 2.0, size=(batch, 1, 1, 1)))
    return x, t.astype(np.float32)


def _qp_reference(x, v, eps):
    """A feasible near-minimiser of ||d - v||_2 s.t. ||d||_1 <= eps, 0 <= x + d <= 1, by
    SLSQP on d = p - n with p, n >= 0 (a smooth QP; no sorting, no multiplier): float64, tiny
    dimensions only. SLSQP may stop short of its tolerance; the caller compares objectives."""
    dim = x.size
    obj = lambda z: np.sum((z[:dim] - z[dim:] - v) ** 2)
    jac = lambda z: np.concatenate([2 * (z[:dim] - z[dim:] - v), -2 * (z[:dim] - z[dim:] - v)])
    cons = {"type": "ineq", "fun": lambda z: eps - z.sum(), "jac": lambda z: -np.ones(2 * dim)}
    bounds = [(0.0, 1.0 - xi) for xi in x] + [(0.0, xi) for xi in x]
    res = minimize(obj, np.zeros(2 * dim), jac=jac, bounds=bounds, constraints=[cons],
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    d = res.x[:dim] - res.x[dim:]
    d = np.clip(d, -x, 1.0 - x)
    l1 = np.abs(d).sum()
    return d if l1 <= eps else d * (eps / l1)  # feasible


@pytest.mark.parametrize("dim", [3, 4, 6])
def test_project_l1_is_feasible_and_the_closest_point(dim):
    rng = np.random.default_rng(dim)
    x, t = _random_problems(rng, 24, dim)
    for eps in (0.0, 0.3, 1.0, 2.5, 10.0):  # 10: the box alone binds
        z = np.asarray(ja.project_l1(jnp.asarray(x + t), jnp.asarray(x), eps), np.float64)
        assert norms(z - x, "l1").max() <= eps * (1 + TOL) + TOL
        assert z.min() >= 0.0 and z.max() <= 1.0
        for b in range(x.shape[0]):
            xb = x[b].ravel().astype(np.float64)
            vb = (x[b] + t[b]).ravel().astype(np.float64) - xb
            ref = _qp_reference(xb, vb, eps)
            ours = z[b].ravel() - xb
            # at least as close as the solver's feasible point, and (the QP being strictly
            # convex) the same point up to the solver's accuracy
            assert np.sum((ours - vb) ** 2) <= np.sum((ref - vb) ** 2) + 1e-6
            np.testing.assert_allclose(ours, ref, atol=1e-3, err_msg=f"{eps} {b}")


def test_project_l1_keeps_feasible_points_and_is_idempotent():
    rng = np.random.default_rng(0)
    x, t = _random_problems(rng, 8, 200)
    x, t = jnp.asarray(x), jnp.asarray(t)
    z = ja.project_l1(x + t, x, 4.0)
    np.testing.assert_allclose(np.asarray(ja.project_l1(z, x, 4.0)), np.asarray(z), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ja.project(z, x, 4.0, "l1")), np.asarray(z),
                               atol=1e-6)
    inside = x + 0.5 * (z - x)  # strictly inside the ball, in the box: unchanged
    np.testing.assert_allclose(np.asarray(ja.project_l1(inside, x, 4.0)), np.asarray(inside),
                               atol=1e-6)


@pytest.mark.torch
def test_project_l1_matches_autoattack_l1_projection():
    """The original's ``L1_projection`` (fra31/auto-attack, $JAXROB_AUTOATTACK_REFERENCE or
    ../ext/auto-attack): ``x + t + L1_projection(x, t, eps)`` is our projection of ``x + t``.
    """
    if not (REFERENCE / "autoattack" / "autopgd_base.py").is_file():
        pytest.skip(f"no fra31/auto-attack checkout at {REFERENCE} "
                    f"(set JAXROB_AUTOATTACK_REFERENCE)")
    import torch

    sys.path.insert(0, str(REFERENCE))
    try:
        from autoattack.autopgd_base import L1_projection
    finally:
        sys.path.remove(str(REFERENCE))
    rng = np.random.default_rng(1)
    for batch, dim, eps in ((32, 6, 0.7), (16, 784, 10.0), (8, 3072, 5.0), (8, 100, 1e3)):
        x, t = _random_problems(rng, batch, dim)
        ours = np.asarray(ja.project_l1(jnp.asarray(x + t), jnp.asarray(x), eps))
        xt, tt = torch.tensor(x), torch.tensor(t)
        theirs = (xt + tt + L1_projection(xt, tt, eps)).numpy()
        # float32 either way; the original's prefix sums round by up to ~5e-5 at d = 3072
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{dim} {eps}")


def test_largereps_schedule_is_autoattacks():
    assert largereps_schedule(100) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert largereps_schedule(10) == [(3.0, 3), (2.0, 3), (1.0, 4)]
    assert largereps_schedule(3) == [(3.0, 1), (2.0, 1), (1.0, 1)]


@pytest.mark.parametrize("target,largereps", [(None, False), (None, True),
                                              ("least_likely", True)])
def test_apgd_l1_iterates_stay_in_the_ball_and_the_box(model, target, largereps):
    logits_fn, x, y = model
    x, y, eps = x[:16], y[:16], 2.0
    res = ja.apgd(logits_fn, x, y, jr.key(0), eps=eps, norm="l1", num_steps=10, loss="dlr",
                  target=target, use_largereps=largereps, return_iterates=True)
    its = np.asarray(res.iterates)
    assert its.shape[0] == (13 if largereps else 11)
    d = its - np.asarray(x)[None]
    l1 = np.abs(d).reshape(its.shape[0], x.shape[0], -1).sum(-1)
    if largereps:  # phases at 3, 2, 1 x eps: 4 + 4 + 5 evaluated points
        radius = np.repeat([3 * eps, 2 * eps, eps], [4, 4, 5])[:, None]
    else:
        radius = eps
    assert np.all(l1 <= radius * (1 + TOL) + TOL)
    assert its.min() >= 0.0 and its.max() <= 1.0
    assert norms(res.x_adv - x, "l1").max() <= eps * (1 + TOL) + TOL
    # The sparse steps move: the points are not all the start.
    assert np.abs(its[-1] - its[0]).max() > 0


def test_apgd_l1_breaks_the_undefended_mnist_classifier(data_dir):
    del data_dir
    f = jaxrob.models.load(str(REPO / "checkpoints" / "mnist_classifier"))
    data = jaxrob.data.load_dataset("mnist", "test[:64]")
    x, y = jnp.asarray(data.images), jnp.asarray(data.labels, jnp.int32)
    res = ja.apgd(f, x, y, jr.key(1), eps=30.0, norm="l1", num_steps=20, loss="ce")
    assert norms(res.x_adv - x, "l1").max() <= 30.0 * (1 + TOL) + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert np.mean(predictions(f, res.x_adv) == np.asarray(y)) <= 1 / 64


def test_autoattack_l1_standard_plan_is_the_originals():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = _plan("standard", None, "l1", 9)
        assert plan == [("apgd-ce", 5), ("apgd-t", 5), ("fab-t", 9), ("square", 1)]
        assert _plan("standard", None, "l1", 3) == [("apgd-ce", 5), ("apgd-t", 3), ("fab-t", 3),
                                                     ("square", 1)]
        assert _plan("rand", None, "l1", 9) == [("apgd-ce", 1), ("apgd-dlr", 1)]
        assert _plan("custom", ["apgd-t"], "l1", 9) == [("apgd-t", 9)]
        assert _plan("custom", ["square"], "l1", 9) == [("square", 5)]
    with pytest.warns(UserWarning, match="'plus' was designed for Linf and L2"):
        assert [a for a, _ in _plan("plus", None, "l1", 9)] == [
            "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]


def test_autoattack_l1_standard_runs_its_four_attacks(model):
    """APGD-CE, APGD-T, FAB-T, Square; the robust accuracy is never above that of any of its
    attacks alone: each attack's stages, run alone on every example with the same per-example
    keys and settings, leave a robust set that contains the version's."""
    logits_fn, x, y = model
    x, y, eps = x[:16], y[:16], 1.5
    key = jr.key(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the original's full version runs
        r = ja.autoattack(logits_fn, x, y, key, eps=eps, norm="l1", n_iter=10,
                          n_target_classes=3, n_queries=60, batch_size=8)
    assert r.stages == ("clean", "apgd-ce", "apgd-t", "fab-t", "square") and r.norm == "l1"
    assert r.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    acc = [r.accuracy[s] for s in r.stages]
    assert all(a >= b for a, b in zip(acc, acc[1:], strict=False))
    assert acc[0] > acc[1]  # APGD-L1 broke some
    assert r.max_perturbation <= eps * (1 + TOL) + TOL
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    broken = ~r.robust
    assert np.all(predictions(logits_fn, jnp.asarray(r.x_adv))[broken] != np.asarray(y)[broken])
    assert r.consistent

    clean = predictions(logits_fn, x) == np.asarray(y)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(16, dtype=jnp.uint32))
    for attack, n_stages in _plan("standard", None, "l1", 3):
        attack_keys = jax.vmap(lambda k, t=_TAGS[attack]: jr.fold_in(k, t))(keys)
        alone = clean.copy()
        for s in range(n_stages):
            for lo in (0, 8):  # the bucket size autoattack compiled
                sl = slice(lo, lo + 8)
                xa, hit = _stage(logits_fn, x[sl], y[sl], attack_keys[sl], jnp.float32(eps),
                                 jnp.int32(s), attack=attack, norm="l1", n_iter=10,
                                 eot_samples=1, n_queries=60,
                                 largereps=attack in ("apgd-ce", "apgd-t"))
                alone[sl] &= ~np.asarray(hit)
                assert norms(np.asarray(xa) - np.asarray(x[sl]), "l1").max() <= (
                    eps * (1 + TOL) + TOL)
        assert not np.any(r.robust & ~alone), attack
        assert r.robust.mean() <= alone.mean()
        if attack == "square":  # the fourth stage is not vacuous at this eps
            assert alone.mean() < clean.mean()


def test_apgd_l1_and_autoattack_l1_bad_inputs_raise_clear_errors(model):
    logits_fn, x, y = model
    x, y = x[:4], y[:4]
    with pytest.raises(ValueError, match="use_largereps: .*L1 norm only"):
        ja.apgd(logits_fn, x, y, jr.key(0), eps=0.1, norm="linf", use_largereps=True)
    with pytest.raises(ValueError, match="num_steps: use_largereps .* at least 3"):
        ja.apgd(logits_fn, x, y, jr.key(0), eps=1.0, norm="l1", num_steps=2,
                use_largereps=True)
    with pytest.raises(ValueError, match="norm: expected one of"):
        ja.apgd(logits_fn, x, y, jr.key(0), eps=1.0, norm="l0")
    with pytest.raises(ValueError, match="norm: expected one of"):
        ja.autoattack(logits_fn, x, y, jr.key(0), eps=1.0, norm="l0")
    with pytest.raises(ValueError, match="norm: expected one of"):
        ja.square(logits_fn, x, y, jr.key(0), eps=1.0, norm="L1")
    with pytest.raises(ValueError, match="n_iter: .* at least 3"):
        ja.autoattack(logits_fn, x, y, jr.key(0), eps=1.0, norm="l1", n_iter=2)
