"""Square, EAD and targeted PGD / APGD on a tiny logistic-regression classifier of 8x8 digits."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms, predictions

import jaxrob.attacks as ja
from jaxrob.attacks._ead import _shrink
from jaxrob.attacks._square import square_eta, square_p_selection

TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Square.


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0), ("l1", 12.0)])
def test_square_stays_in_ball_and_fools_an_undefended_model(model, norm, eps):
    logits_fn, x, y = model
    assert np.mean(predictions(logits_fn, x) == np.asarray(y)) > 0.9
    res = ja.square(logits_fn, x, y, jr.key(0), eps=eps, norm=norm, n_queries=300)
    assert norms(res.x_adv - x, norm).max() <= eps * (1 + TOL) + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert np.mean(predictions(logits_fn, res.x_adv) == np.asarray(y)) == 0.0
    # loss is the C&W margin at x_adv (positive = misclassified), success its sign
    np.testing.assert_allclose(res.loss, ja.cw_loss(logits_fn(res.x_adv, None), y),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.success, np.asarray(res.loss) > 0)
    q = np.asarray(res.queries)
    assert q.dtype == np.int32 and q.min() >= 1 and q.max() <= 300
    assert q.mean() < 100  # a large eps takes few queries


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5), ("l1", 2.0)])
def test_square_respects_the_budget_and_stops_querying_fooled_examples(model, norm, eps):
    """Every batched model call is logged; per example, queries = calls until its first
    misclassified one, after which it is only ever fed its final x_adv. Every point queried is
    in the ball and in [0, 1]."""
    logits_fn, x, y = model
    calls = []

    def logged(x_, key):
        jax.debug.callback(lambda v: calls.append(np.asarray(v)), x_, ordered=True)
        return logits_fn(x_, key)

    n_queries = 40
    res = ja.square(logged, x, y, jr.key(1), eps=eps, norm=norm, n_queries=n_queries)
    jax.block_until_ready(res)
    assert 1 <= len(calls) <= n_queries
    np.testing.assert_array_equal(calls[0], x)  # query 0: the clean input
    inputs = np.stack(calls)  # (Q, B, H, W, C)
    assert inputs.min() >= 0.0 and inputs.max() <= 1.0
    assert max(norms(v - np.asarray(x), norm).max() for v in inputs) <= eps * (1 + TOL) + TOL
    margins = np.stack([np.asarray(ja.cw_loss(logits_fn(v, None), y)) for v in calls])  # (Q, B)
    q, x_adv, yy = np.asarray(res.queries), np.asarray(res.x_adv), np.asarray(y)
    assert q.max() <= n_queries
    fooled = margins > 0
    done_any = success_seen = 0
    for b in range(x.shape[0]):
        if fooled[:, b].any():
            first = int(np.argmax(fooled[:, b]))
            assert q[b] == first + 1
            np.testing.assert_array_equal(x_adv[b], inputs[first, b])
            for later in inputs[first:, b]:  # no new point tried after success
                np.testing.assert_array_equal(later, x_adv[b])
            assert predictions(logits_fn, x_adv[b:b + 1])[0] != yy[b]
            success_seen += 1
            done_any += first == 0
        else:
            # never fooled: the whole budget, and the best margin of the queries from the
            # (unconditionally kept) initialisation on
            assert q[b] == len(calls) == n_queries
            np.testing.assert_allclose(res.loss[b], margins[1:, b].max(), rtol=1e-6)
    assert done_any >= 1  # some examples were misclassified already: one query, x_adv = x
    assert 0 < success_seen < x.shape[0]  # not vacuous either way
    for b in np.flatnonzero(fooled[0]):
        np.testing.assert_array_equal(x_adv[b], np.asarray(x[b]))


def test_square_linf_initialisation_is_vertical_stripes(model):
    logits_fn, x, y = model
    eps = 0.1
    res = ja.square(logits_fn, x, y, jr.key(2), eps=eps, n_queries=2)  # clean + init only
    keep = np.asarray(res.queries) == 2
    assert keep.sum() > 50
    xa, x0 = np.asarray(res.x_adv)[keep], np.asarray(x)[keep]
    up, down = np.clip(x0 + eps, 0, 1), np.clip(x0 - eps, 0, 1)
    # per (example, column, channel) one sign for the whole column
    col_up = np.all(np.isclose(xa, up, atol=1e-7), axis=1)
    col_down = np.all(np.isclose(xa, down, atol=1e-7), axis=1)
    assert np.all(col_up | col_down)
    assert col_up.mean() > 0.2 and col_down.mean() > 0.2


def test_square_p_schedule_is_rescaled_to_the_budget():
    p = 0.8
    on_10k = [(10, 1), (11, 2), (50, 2), (51, 4), (200, 4), (201, 8), (500, 8), (501, 16),
              (1000, 16), (1001, 32), (2001, 64), (4001, 128), (6001, 256), (8001, 512)]
    for it, div in on_10k:
        assert square_p_selection(it, 10000, p) == pytest.approx(p / div)
    # n_queries = 5000: update it counts as 2 * it on the 10000-query scale
    assert square_p_selection(5, 5000, p) == pytest.approx(p)
    assert square_p_selection(6, 5000, p) == pytest.approx(p / 2)
    assert square_p_selection(4001, 5000, p) == pytest.approx(p / 512)


@pytest.mark.parametrize("s", [1, 3, 5, 8])
def test_square_l2_eta_is_the_nested_rectangle_pattern(s):
    eta = square_eta(s)
    np.testing.assert_allclose(np.sqrt((eta**2).sum()), 1.0, rtol=1e-12)
    # closed form of AutoAttack's loop: sum_{k = d}^{K-1} 1 / (k + 1)^2, d the Chebyshev
    # distance to the half's centre, K = s // 2 + 1; top half positive, bottom half negative
    ref = np.zeros((s, s))
    for sign, (r0, n) in ((1, (0, s // 2)), (-1, (s // 2, s - s // 2))):
        half = np.zeros((n, s))
        for r in range(n):
            for c in range(s):
                d = max(abs(r - n // 2), abs(c - s // 2))
                half[r, c] = sum(1 / (k + 1) ** 2 for k in range(d, s // 2 + 1))
        if n:
            ref[r0:r0 + n] = sign * half / np.sqrt((half**2).sum())
    np.testing.assert_allclose(eta, ref / np.sqrt((ref**2).sum()), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# EAD.


def test_shrinkage_is_the_prox_of_the_l1_term_on_the_box():
    z = jr.uniform(jr.key(0), (4000,), minval=-0.5, maxval=1.5)
    x = jr.uniform(jr.key(1), (4000,))
    beta = 0.1
    out = np.asarray(_shrink(z, x, beta))
    grid = np.linspace(0.0, 1.0, 20001)
    zz, xx = np.asarray(z)[:, None], np.asarray(x)[:, None]
    # pixel-wise argmin over [0, 1] of 0.5 (v - z)^2 + beta |v - x|
    brute = grid[np.argmin(0.5 * (grid - zz) ** 2 + beta * np.abs(grid - xx), axis=1)]
    np.testing.assert_allclose(out, brute, atol=1e-4)


@pytest.mark.parametrize("rule,method", [("EN", "fista"), ("L1", "ista")])
def test_ead_finds_sparse_adversarials_in_the_box(model, rule, method):
    logits_fn, x, y = model
    x, y = x[:32], y[:32]
    res = ja.ead(logits_fn, x, y, jr.key(0), num_steps=100, binary_search_steps=6,
                 decision_rule=rule, method=method)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    s = np.asarray(res.success)
    assert s.all()  # an undefended linear model: every example is broken
    np.testing.assert_array_equal(predictions(logits_fn, res.x_adv) != np.asarray(y), s)
    np.testing.assert_allclose(res.norm, norms(res.x_adv - x, "l1"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.loss, ja.cw_loss(logits_fn(res.x_adv, None), y), rtol=1e-5,
                               atol=1e-5)
    # sparser than C&W-L2 from the same budget of search steps, on average
    cw = ja.cw_l2(logits_fn, x, y, jr.key(0), num_steps=100, learning_rate=0.05,
                  binary_search_steps=6)
    assert np.mean(res.norm) < np.mean(norms(cw.x_adv - x, "l1")[np.asarray(cw.success)])


# ---------------------------------------------------------------------------------------------
# Targeted PGD / APGD.


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_targeted_attacks_reach_their_target(model, attack, loss):
    logits_fn, x, y = model
    target = (y + 3) % 10
    kw = dict(eps=0.5, num_steps=30, loss=loss, target=target)
    if attack == "pgd":
        res = ja.pgd(logits_fn, x, y, jr.key(0), step_size=0.05, random_start=True, **kw)
    else:
        res = ja.apgd(logits_fn, x, y, jr.key(0), **kw)
    assert norms(res.x_adv - x, "linf").max() <= 0.5 + TOL
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    pred = predictions(logits_fn, res.x_adv)
    np.testing.assert_array_equal(pred, np.asarray(target))
    np.testing.assert_array_equal(res.success, pred == np.asarray(target))
    # loss is the targeted loss at x_adv
    ref = ja.TARGETED_LOSSES[loss](logits_fn(res.x_adv, None), y, target)
    np.testing.assert_allclose(res.loss, ref, rtol=1e-5, atol=1e-5)


def test_targeted_dlr_and_least_likely(model):
    logits_fn, x, y = model
    yy = np.asarray(y)
    z0 = np.array(logits_fn(x, None))
    z0[np.arange(len(yy)), yy] = np.inf
    least = z0.argmin(1)
    res = ja.apgd(logits_fn, x, y, jr.key(0), eps=0.5, num_steps=30, loss="ce",
                  target="least_likely")
    np.testing.assert_array_equal(predictions(logits_fn, res.x_adv), least)
    assert np.all(np.asarray(res.success))
    res = ja.pgd(logits_fn, x, y, jr.key(0), eps=0.5, step_size=0.05, num_steps=30, loss="cw",
                 target="least_likely")
    np.testing.assert_array_equal(predictions(logits_fn, res.x_adv), least)
    # APGD-T's targeted DLR is positive exactly when z_t > z_y: it gets there for every example
    target = (y + 5) % 10
    res = ja.apgd(logits_fn, x, y, jr.key(0), eps=0.5, num_steps=30, loss="dlr", target=target)
    z = np.asarray(logits_fn(res.x_adv, None))
    rows = np.arange(len(yy))
    assert np.all(z[rows, np.asarray(target)] > z[rows, yy])
    assert np.all(np.asarray(res.loss) > 0)
    # hand-computed targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    zz = jnp.array([[4.0, 1.0, 3.0, 0.0, 2.0]])
    np.testing.assert_allclose(ja.dlr_loss_targeted(zz, jnp.array([0]), jnp.array([2])),
                               [-(4.0 - 3.0) / (4.0 - 0.5 * (2.0 + 1.0))], rtol=1e-6)


def test_untargeted_results_and_attack_result_are_unchanged(model):
    logits_fn, x, y = model
    x, y = x[:16], y[:16]
    for attack, kw in ((ja.pgd, dict(num_steps=4, random_start=True)),
                       (ja.apgd, dict(num_steps=6))):
        a = attack(logits_fn, x, y, jr.key(3), eps=0.1, **kw)
        b = attack(logits_fn, x, y, jr.key(3), eps=0.1, target=None, **kw)
        np.testing.assert_array_equal(a.x_adv, b.x_adv)
        np.testing.assert_array_equal(a.loss, b.loss)
        assert a.success is None and a.queries is None and a.norm is None
    # the new field is appended: positional construction and the old fields keep their places
    assert ja.AttackResult._fields[:5] == ("x_adv", "loss", "iterates", "norm", "success")
    r = ja.AttackResult(x, jnp.zeros(16), None)
    assert r.queries is None


# ---------------------------------------------------------------------------------------------
# Input checks: raised before anything is traced or compiled.


_X = jnp.full((2, 8, 8, 1), 0.5)
_Y = jnp.array([0, 1])
_F = lambda x, key: x.reshape(x.shape[0], -1)[:, :10]
_F3 = lambda x, key: x.reshape(x.shape[0], -1)[:, :3]


@pytest.mark.parametrize("call,match", [
    (lambda: ja.square(_F, _X, _Y, jr.key(0), eps=0.1, norm="l0"), "norm: expected"),
    (lambda: ja.square(_F, _X, _Y, jr.key(0), eps=0.1, n_queries=0), "n_queries: expected a"),
    (lambda: ja.square(_F, _X, _Y, jr.key(0), eps=0.1, n_queries=2.5), "n_queries"),
    (lambda: ja.square(_F, _X, _Y, jr.key(0), eps=-0.1), "eps: expected a finite"),
    (lambda: ja.square(_F, _X, _Y, jr.key(0), eps=0.1, p_init=0.0), "p_init"),
    (lambda: ja.square(_F, _X, jnp.array([0, 10]), jr.key(0), eps=0.1), r"labels in \[0, 10\)"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([0, 2])),
     r"target: equals the label y for examples \[0\]"),
    (lambda: ja.apgd(_F, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([3, 10])),
     r"target: expected classes in \[0, 10\)"),
    (lambda: ja.apgd(_F, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([3, -1])),
     r"target: expected classes in \[0, 10\)"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, target="most_likely"),
     "target: expected an int array"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([1.0, 2.0])),
     "target: expected an int array"),
    (lambda: ja.pgd(_F, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([1, 2, 3])),
     r"target: expected shape \(2,\)"),
    (lambda: ja.apgd(_F, _X, _Y, jr.key(0), eps=0.1, target="least_likely",
                     loss=lambda z, y: ja.ce_loss(z, y)), "loss: a targeted attack"),
    (lambda: ja.apgd(_F3, _X, _Y, jr.key(0), eps=0.1, target=jnp.array([2, 2]), loss="dlr"),
     "targeted DLR needs at least 4 classes"),
    (lambda: ja.ead(_F, _X, _Y, jr.key(0), decision_rule="L2"), "decision_rule: expected"),
    (lambda: ja.ead(_F, _X, _Y, jr.key(0), method="adam"), "method: expected"),
    (lambda: ja.ead(_F, _X, _Y, jr.key(0), beta=-1.0), "beta: expected a finite"),
    (lambda: ja.ead(_F, _X, _Y, jr.key(0), c=0.0), "c: expected a finite number > 0"),
    (lambda: ja.ead(_F, _X, _Y, jr.key(0), binary_search_steps=0), "binary_search_steps"),
])
def test_bad_inputs_raise_clear_errors_before_any_work(call, match):
    from jaxrob.attacks._apgd import _apgd, _apgd_targeted
    from jaxrob.attacks._ead import _ead
    from jaxrob.attacks._pgd import _pgd, _pgd_targeted
    from jaxrob.attacks._square import _square

    jitted = (_square, _ead, _pgd, _pgd_targeted, _apgd, _apgd_targeted)
    before = [f.cache_size() for f in jitted]
    with pytest.raises(ValueError, match=match):
        call()
    assert [f.cache_size() for f in jitted] == before  # nothing was compiled
