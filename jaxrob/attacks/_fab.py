"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020), untargeted and targeted (FAB-T).

Follows AutoAttack's ``fab_base.py`` / ``fab_pt.py`` / ``fab_projections.py``. Each iteration
linearises the classifier at the current point ``x_k``, picks the decision hyperplane closest to
``x_k`` in the attack's norm (untargeted: among every class ``j != y``,
``|f_j - f_y| / ||grad f_j - grad f_y||_*``; targeted: the one hyperplane ``f_t = f_y``), and
projects onto it, under the box [0, 1]^d, both ``x_k`` (``d_1``) and the original image
``x_0`` (``d_2``). The next point is the convex combination, with extrapolation ``eta``,

    ``x_{k+1} = clip((1 - a) (x_k + eta d_1) + a (x_0 + eta d_2), 0, 1)``,
    ``a = min(||d_1|| / (||d_1|| + ||d_2||), alpha_max)``,

which biases the iterates towards ``x_0``. A misclassified ``x_{k+1}`` is recorded when it is
the closest adversarial point so far and then pulled back towards ``x_0``:
``x_{k+1} <- x_0 + beta (x_{k+1} - x_0)``. Run 0 starts at ``x_0``; further restarts start at
``x_0 + (eps / 2) t / ||t||`` (t uniform in [-1, 1] for Linf, normal for L2 and L1).

Unlike the minimum-norm attacks (C&W, EAD, DeepFool), the result is eps-bounded, as in
AutoAttack: a run's point counts only when it is misclassified and within ``eps`` of ``x``;
otherwise ``x_adv = x``. FAB-T runs once per target class: the 2nd, 3rd, ..., (n + 1)-th most
likely class of the clean logits, each with ``num_restarts`` runs, on the examples no earlier
run has broken.

Keys: run ``q`` (``q = target rank index * num_restarts + restart``) uses
``key_q = fold_in(key, q)``; ``k_init, k_steps = split(key_q)``, ``k_grad, k_pred =
split(k_steps)``. The random start comes from ``k_init``; iteration ``t`` linearises with the
model key ``fold_in(k_grad, t)`` and checks its new point with ``fold_in(k_pred, t)``; the run's
result is scored with ``fold_in(key_q, FAB_SCORE)``. The clean prediction uses
``fold_in(key, FAB_CLEAN)``, the clean ranking of FAB-T's targets ``fold_in(key, FAB_TARGET)``
(tags of :mod:`jaxrob._keys`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr

import jaxrob._keys as tags
from jaxrob._checks import check_choice, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Array, Images, Key, Labels
from jaxrob.attacks._common import (
    AttackResult,
    check_attack_inputs,
    check_num_classes,
    check_scalar,
    expand,
    per_example_norm,
    resolve_loss,
)
from jaxrob.attacks._losses import LogitsFn, cw_loss

FAB_NORMS = ("linf", "l2", "l1")
_DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}
_BIG = 1e12


# --------------------------------------------------------------------------------------------
# Projections onto a hyperplane under the box [0, 1]^d: the smallest d (in the norm) with
# <w, t + d> = b and 0 <= t + d <= 1 (or, where the box makes the hyperplane unreachable, the
# box corner that gets closest). Rows are independent; t, w are (N, D), b is (N,). Every branch
# of the original's boolean indexing is computed for all rows and selected with ``where``.


def _take(a_ND, i_N):
    return jnp.take_along_axis(a_ND, i_N[:, None], axis=1)[:, 0]


def _run_bisect(pred, n_rows: int, n: int, lo: int, hi: int):
    """The original's ceil(log2(n)) halvings of [lo, hi] per row: lo moves up to the midpoint
    where ``pred(mid)`` holds, hi down to it elsewhere; returns lo."""

    def body(_, c):
        lb, ub = c
        mid = (lb + ub) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lb), jnp.where(ok, ub, mid)

    init = (jnp.full((n_rows,), lo, jnp.int32), jnp.full((n_rows,), hi, jnp.int32))
    return jax.lax.fori_loop(0, math.ceil(math.log2(n)) if n > 1 else 0, body, init)[0]


@jax.jit
def projection_linf(t_ND: Array, w_ND: Array, b_N: Array) -> Array:
    """Smallest-Linf ``d`` with ``<w, t + d> = b``, ``t + d`` in [0, 1] (``fab_projections``)."""
    n, dim = t_ND.shape
    sign_N = jnp.where(jnp.sum(w_ND * t_ND, axis=1) - b_N >= 0, 1.0, -1.0)
    w = w_ND * sign_N[:, None]
    b = b_N * sign_N
    nz = w != 0
    a = (w < 0).astype(t_ND.dtype)
    d = jnp.where(nz, a - t_ND, 0.0)
    p = a - t_ND * (2.0 * a - 1.0)  # distance to the bound each coordinate moves towards
    indp = jnp.argsort(p, axis=1)
    b = b - jnp.sum(w * t_ND, axis=1)
    b0 = jnp.sum(w * d, axis=1)
    indp2 = indp[:, ::-1]
    ws = jnp.take_along_axis(w, indp2, axis=1)
    bs2 = -ws * jnp.take_along_axis(d, indp2, axis=1)
    s = jnp.cumsum(jnp.abs(ws), axis=1)
    sb = jnp.cumsum(bs2, axis=1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * _take(p, indp[:, 0])
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & ~c_l

    def ok(mid):
        indcurr = _take(indp, dim - 1 - mid)
        return b - (_take(sb, mid) - _take(s, mid) * _take(p, indcurr)) > 0

    lb = _run_bisect(ok, n, dim, 0, dim - 1)
    safe = lambda v: jnp.where(v == 0, 1.0, v)
    lmbd_l = jnp.maximum((b - sb[:, -1]) / safe(-s[:, -1]), 0.0)[:, None]
    d_l = (2.0 * a - 1.0) * lmbd_l
    lmbd_2 = jnp.maximum((b - _take(sb, lb)) / safe(-_take(s, lb)), 0.0)[:, None]
    d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1.0 - a)
    d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
    return jnp.where(nz, d, 0.0)


@jax.jit
def projection_l2(t_ND: Array, w_ND: Array, b_N: Array) -> Array:
    """Smallest-L2 ``d`` with ``<w, t + d> = b``, ``t + d`` in [0, 1] (``fab_projections``)."""
    n, dim = t_ND.shape
    c = jnp.sum(w_ND * t_ND, axis=1) - b_N
    sign_N = jnp.where(c >= 0, 1.0, -1.0)
    w = w_ND * sign_N[:, None]
    c = c * sign_N
    small = jnp.abs(w) < 1e-8
    w_safe = jnp.where(small, 1.0, w)
    # r_i: the step alpha at which coordinate i of t - alpha w reaches the box
    r = jnp.clip(jnp.maximum(t_ND / w_safe, (t_ND - 1.0) / w_safe), -_BIG, _BIG)
    r = jnp.where(small | (r == -_BIG), _BIG, r)
    indr = jnp.argsort(r, axis=1)
    rs = jnp.take_along_axis(r, indr, axis=1)
    rs2 = jnp.concatenate([rs[:, 1:], jnp.zeros((n, 1), rs.dtype)], axis=1)
    rs = jnp.where(rs == _BIG, 0.0, rs)
    rs2 = jnp.where(rs2 == _BIG, 0.0, rs2)
    w3s = jnp.take_along_axis(jnp.square(w), indr, axis=1)
    w5 = jnp.sum(w3s, axis=1, keepdims=True)
    ws = w5 - jnp.cumsum(w3s, axis=1)
    d = jnp.where(small, 0.0, -(r * w))
    s = jnp.concatenate([-w5 * rs[:, :1], jnp.cumsum((rs - rs2) * ws, axis=1) - w5 * rs[:, :1]],
                        axis=1)
    c4 = s[:, 0] + c < 0
    c3 = jnp.sum(d * w, axis=1) + c > 0
    c2 = ~(c4 | c3)
    lb = _run_bisect(lambda mid: _take(s, mid) + c > 0, n, dim, 0, dim - 1)
    d_4 = -(c / jnp.where(w5[:, 0] == 0, 1.0, w5[:, 0]))[:, None] * w
    ws_lb = _take(ws, lb)
    alpha = jnp.where(ws_lb == 0, 0.0,
                      (_take(s, lb) + c) / jnp.where(ws_lb == 0, 1.0, ws_lb) + _take(rs, lb))
    d_2 = jnp.where(alpha[:, None] > r, d, -alpha[:, None] * w)
    d = jnp.where(c4[:, None], d_4, jnp.where(c2[:, None], d_2, d))
    return jnp.where(small, 0.0, d)


@jax.jit
def projection_l1(t_ND: Array, w_ND: Array, b_N: Array) -> Array:
    """Smallest-L1 ``d`` with ``<w, t + d> = b``, ``t + d`` in [0, 1] (``fab_projections``):
    coordinates with the largest ``|w_i|`` first, each moved to its bound, the last one
    partially."""
    n, dim = t_ND.shape
    c = jnp.sum(w_ND * t_ND, axis=1) - b_N
    sign_N = jnp.where(c >= 0, 1.0, -1.0)
    w = w_ND * sign_N[:, None]
    c = c * sign_N
    r = jnp.minimum(jnp.abs(1.0 / jnp.where(w == 0, 1.0 / _BIG, w)), _BIG)
    indr = jnp.argsort(r, axis=1)
    pos = jnp.argsort(indr, axis=1)  # each coordinate's rank in that order
    d = jnp.where(w != 0, (w < 0).astype(t_ND.dtype) - t_ND, 0.0)
    ds = jnp.take_along_axis(jnp.minimum(-w * t_ND, w * (1.0 - t_ND)), indr, axis=1)
    s = jnp.cumsum(jnp.concatenate([c[:, None], ds], axis=1), axis=1)  # (N, D + 1)
    c2 = s[:, -1] < 0
    lb = _run_bisect(lambda mid: _take(s, mid) > 0, n, dim, 0, dim + 1)
    i_N = _take(indr, jnp.minimum(lb, dim - 1))
    w_i = _take(w, i_N)
    alpha = -_take(s, lb) / jnp.where(w_i == 0, 1.0, w_i)
    d_2 = jnp.where(pos < lb[:, None], d, 0.0)
    d_2 = jnp.where(jnp.arange(dim)[None, :] == i_N[:, None], alpha[:, None], d_2)
    d = jnp.where(c2[:, None], d_2, d)
    return jnp.where(jnp.abs(w) > 1e-8, d, 0.0)


_PROJECTIONS = {"linf": projection_linf, "l2": projection_l2, "l1": projection_l1}


# --------------------------------------------------------------------------------------------
# One run.


def _flat_norm(d_ND, norm):
    if norm == "linf":
        return jnp.max(jnp.abs(d_ND), axis=1)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(d_ND), axis=1))
    return jnp.sum(jnp.abs(d_ND), axis=1)


def fab_start(key: Key, x: Images, eps: Array, norm: str) -> Images:
    """FAB's random restart: ``clip(x + (eps / 2) t / ||t||, 0, 1)``, t uniform in [-1, 1]
    (Linf) or standard normal (L2, L1)."""
    if norm == "linf":
        t = jr.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jr.normal(key, x.shape, x.dtype)
    return jnp.clip(x + 0.5 * eps * t / expand(per_example_norm(t, norm)), 0.0, 1.0)


def _boundary(model, x1, y, target, key, targeted: bool):
    """``(df (B, M), dg (B, M, D))``: logit differences to the true class and their gradients;
    untargeted M = K with ``df_y = 1e10`` (never chosen), targeted M = 1 (``f_t - f_y``)."""
    b = x1.shape[0]
    if targeted:
        def diff(v):
            z = model(v, key)
            zt = jnp.take_along_axis(z, target[:, None], axis=1)[:, 0]
            zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
            return jnp.sum(zt - zy), zt - zy

        g, df_B = jax.grad(diff, has_aux=True)(x1)
        return df_B[:, None], g.reshape(b, 1, -1)
    z_BK, vjp = jax.vjp(lambda v: model(v, key), x1)
    k = z_BK.shape[1]
    cot_KBK = jnp.broadcast_to(jnp.eye(k, dtype=z_BK.dtype)[:, None, :], (k, b, k))
    (g_KBHWC,) = jax.vmap(vjp)(cot_KBK)
    g_BKD = jnp.moveaxis(g_KBHWC.reshape(k, b, -1), 0, 1)
    onehot_BK = jax.nn.one_hot(y, k, dtype=bool)
    zy_B = jnp.take_along_axis(z_BK, y[:, None], axis=1)
    gy_B1D = jnp.take_along_axis(g_BKD, y[:, None, None], axis=1)
    df_BK = jnp.where(onehot_BK, 1e10, z_BK - zy_B)
    return df_BK, g_BKD - gy_B1D


def fab_run(model, x: Images, y: Array, key: Key, eps: Array, rand_start, target=None, *,
            norm: str, num_steps: int, alpha_max: float, eta: float,
            beta: float) -> tuple[Images, Array]:
    """One FAB run on every example (traced ``rand_start``: start at a random point).

    Returns ``(adv, dist)``: per example the closest misclassified iterate found and its
    distance to ``x`` in ``norm`` (``adv = x``, ``dist = inf`` where none was found). The
    caller keeps it only within eps (and decides which examples it was for).
    """
    b = x.shape[0]
    k_init, k_steps = jr.split(key)
    k_grad, k_pred = jr.split(k_steps)
    project = _PROJECTIONS[norm]
    x0_BD = x.reshape(b, -1)
    x1 = jnp.where(rand_start, fab_start(k_init, x, eps, norm), x)

    def body(t, c):
        x1, adv, dist = c
        df_BM, dg_BMD = _boundary(model, x1, y, target, jr.fold_in(k_grad, t), target is not None)
        dual_BM = jax.vmap(lambda g: _flat_norm(g, _DUAL[norm]))(dg_BMD)
        ind_B = jnp.argmin(jnp.abs(df_BM) / (1e-12 + dual_BM), axis=1)
        w_BD = jnp.take_along_axis(dg_BMD, ind_B[:, None, None], axis=1)[:, 0]
        x1_BD = x1.reshape(b, -1)
        b_B = -_take(df_BM, ind_B) + jnp.sum(w_BD * x1_BD, axis=1)
        d3 = project(jnp.concatenate([x1_BD, x0_BD]), jnp.concatenate([w_BD, w_BD]),
                     jnp.concatenate([b_B, b_B]))
        a0 = jnp.maximum(_flat_norm(d3, norm), 1e-8)
        a1, a2 = a0[:b], a0[b:]
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1_BD = jnp.clip((x1_BD + eta * d3[:b]) * (1.0 - alpha)
                         + (x0_BD + eta * d3[b:]) * alpha, 0.0, 1.0)
        x1 = x1_BD.reshape(x.shape)
        wrong_B = jnp.argmax(model(x1, jr.fold_in(k_pred, t)), axis=1) != y
        n_B = _flat_norm(x1_BD - x0_BD, norm)
        closer = wrong_B & (n_B < dist)
        adv = jnp.where(expand(closer), x1, adv)
        dist = jnp.where(closer, n_B, dist)
        x1 = jnp.where(expand(wrong_B), x + beta * (x1 - x), x1)
        return x1, adv, dist

    init = (x1, x, jnp.full((b,), jnp.inf, jnp.float32))
    _, adv, dist = jax.lax.fori_loop(0, num_steps, body, init)
    return adv, dist


def fab_targets(model, x: Images, key: Key, rank) -> Array:
    """(B,) the ``rank``-th most likely class of ``model(x, fold_in(key, FAB_TARGET))``
    (rank 2: the runner-up; AutoAttack's ``sort(logits)[:, -rank]``)."""
    z_BK = model(x, jr.fold_in(key, tags.FAB_TARGET))
    return jnp.argsort(z_BK, axis=1)[:, z_BK.shape[1] - rank].astype(jnp.int32)


@filter_jit
def _fab(model, x, y, key, eps, *, norm, num_steps, num_restarts, targeted, n_target_classes,
         alpha_max, eta, beta):
    z0_BK = model(x, jr.fold_in(key, tags.FAB_CLEAN))
    done_B = jnp.argmax(z0_BK, axis=1) != y  # misclassified already: x_adv = x
    runs = n_target_classes * num_restarts if targeted else num_restarts
    opts = dict(norm=norm, num_steps=num_steps, alpha_max=alpha_max, eta=eta, beta=beta)

    def one(q, c):
        x_adv, dist, done_B = c
        key_q = jr.fold_in(key, q)
        restart = q % num_restarts
        target = fab_targets(model, x, key, 2 + q // num_restarts) if targeted else None
        adv, d_B = fab_run(model, x, y, key_q, eps, restart > 0, target, **opts)
        wrong_B = jnp.argmax(model(adv, jr.fold_in(key_q, tags.FAB_SCORE)), axis=1) != y
        new_B = ~done_B & wrong_B & (d_B <= eps)
        return (jnp.where(expand(new_B), adv, x_adv), jnp.where(new_B, d_B, dist),
                done_B | new_B)

    def body(q, c):
        # The original runs each restart / target only on the examples still unbroken; a batch
        # with none left skips the run.
        return jax.lax.cond(jnp.any(~c[2]), one, lambda q_, c_: c_, q, c)

    init = (x, jnp.where(done_B, 0.0, jnp.inf), done_B)
    x_adv, dist, _ = jax.lax.fori_loop(0, runs, body, init)
    z_BK = model(x_adv, jr.fold_in(key, tags.FAB_SCORE))
    margin_B = cw_loss(z_BK, y)
    return AttackResult(x_adv, margin_B, norm=dist, success=margin_B > 0)


def check_fab_options(*, norm, num_steps, num_restarts, n_target_classes, alpha_max, eta,
                      beta) -> tuple:
    check_choice(norm, FAB_NORMS, "norm")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
    for name, v, lo, hi in (("alpha_max", alpha_max, 0.0, 1.0), ("beta", beta, 0.0, 1.0)):
        try:
            ok = lo <= float(v) <= hi
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {v!r}")
    try:
        eta_ok = float(eta) >= 1.0
    except (TypeError, ValueError):
        eta_ok = False
    if not eta_ok:
        raise ValueError(f"eta: expected an extrapolation factor >= 1, got {eta!r}")
    return num_steps, num_restarts, n_target_classes, float(alpha_max), float(eta), float(beta)


def check_target_count(n_target_classes: int, num_classes: int, name: str) -> None:
    if n_target_classes > num_classes - 1:
        raise ValueError(f"n_target_classes: {name} targets the 2nd .. (n + 1)-th most likely "
                         f"classes, so at most K - 1 = {num_classes - 1} for a model with "
                         f"{num_classes} classes, got {n_target_classes}")


def fab(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float | Array,
        norm: str = "linf", num_steps: int = 100, num_restarts: int = 1,
        targeted: bool = False, n_target_classes: int = 9, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9) -> AttackResult:
    """FAB: minimal-norm steps to the linearised decision boundary, kept within eps.

    See the module docstring for the iteration (AutoAttack's ``FABAttack.attack_single_run``),
    the restarts and the keys. Untargeted, each iteration takes the Jacobian of all K logits
    (K vector-Jacobian products); targeted (FAB-T), the gradient of ``f_t - f_y`` only. A point
    counts as adversarial when it is misclassified (any class other than ``y``, targeted
    too). Examples misclassified at ``x`` are not attacked (``x_adv = x``, ``norm`` 0).

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness of the restarts and the model's keys (module docstring).
      eps: the radius within which a point counts (> 0); also the scale of random restarts.
      norm: ``"linf"``, ``"l2"`` or ``"l1"``.
      num_steps: iterations per run (100).
      num_restarts: runs per target (untargeted: per example); run 0 starts at ``x``, the
        others at random points (1).
      targeted: FAB-T: one target per run, the 2nd .. (``n_target_classes`` + 1)-th most likely
        class at ``x``.
      n_target_classes: FAB-T's number of targets, at most K - 1 (9).
      alpha_max: the largest weight of the step from ``x`` (0.1).
      eta: extrapolation of the projections (1.05).
      beta: pull-back towards ``x`` after a success (0.9).

    Returns:
      :class:`AttackResult`: ``x_adv`` the closest misclassified point found within eps of ``x``
      (``x`` where none), in [0, 1]; ``loss`` the C&W margin there (positive = misclassified);
      ``norm`` its distance to ``x`` (inf where none found within eps); ``success``
      ``loss > 0``, scored with ``fold_in(key, FAB_SCORE)``.

    Raises:
      ValueError: bad images or labels, ``norm`` not linf/l2/l1, ``eps <= 0``, non-positive
        counts, ``n_target_classes > K - 1`` when targeted, ``alpha_max`` / ``beta`` outside
        [0, 1], ``eta < 1``.

    References:
      Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
      attack", ICML 2020; AutoAttack, github.com/fra31/auto-attack, ``autoattack/fab_base.py``,
      ``fab_projections.py``.
    """
    y = check_attack_inputs(x, y)
    eps = check_scalar(eps, "eps", positive=True)
    (num_steps, num_restarts, n_target_classes, alpha_max, eta, beta) = check_fab_options(
        norm=norm, num_steps=num_steps, num_restarts=num_restarts,
        n_target_classes=n_target_classes, alpha_max=alpha_max, eta=eta, beta=beta)
    resolve_loss(model, "cw", x=x, y=y, key=key)  # checks the model and the labels
    if targeted:
        check_target_count(n_target_classes, check_num_classes(model, x, y, key), "FAB-T")
    return _fab(model, x, y, key, eps, norm=norm, num_steps=num_steps, num_restarts=num_restarts,
                targeted=bool(targeted), n_target_classes=n_target_classes if targeted else 1,
                alpha_max=alpha_max,
                eta=eta, beta=beta)
