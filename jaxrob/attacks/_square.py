"""Square attack (Andriushchenko et al. 2020): score-based random search, Linf, L2 and L1.

Follows AutoAttack's ``square.py`` (``SquareAttack.attack_single_run``, margin loss, one
restart): the same initialisations (Linf: vertical stripes of +-eps; L2: a grid of
``eta``-patterned tiles scaled to norm eps; L1: the same grid with the L1 pattern, projected
onto the L1 ball cap the box), the same square updates and window sizes from ``p_selection``
(breakpoints rescaled from 10000 queries to ``n_queries``), and a candidate is kept only when
it raises the margin. The examples of a batch are updated together under masks,
in one ``lax.while_loop`` that ends when every example is misclassified or the budget is spent.

Queries. Every evaluation of the model on an example counts, the clean one included: query 0
scores ``x`` (an example already misclassified stops there, ``x_adv = x``), query 1 the
initialisation (kept unconditionally, as in the original), queries 2 .. ``n_queries - 1`` the
square updates ``i = 0 .. n_queries - 3``. An example stops at the first misclassified query: its
count stops, its ``x_adv`` no longer changes, and later batched forward passes feed it its
``x_adv`` (computed alongside the others, not counted, their output discarded).

Keys (the restart-0 scheme of :mod:`jaxrob.attacks._common`): ``k_init, k_steps =
split(fold_in(key, 0))``; query ``q`` calls the model with ``fold_in(k_steps, q)``; the random
draws of query ``q`` (stripes, squares, signs) come from ``fold_in(k_init, q)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from jaxrob._checks import check_choice, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Array, Images, Key, Labels
from jaxrob.attacks._common import (
    AttackResult,
    check_attack_inputs,
    check_scalar,
    expand,
    per_example_norm,
    project_l1,
    resolve_loss,
)
from jaxrob.attacks._losses import LogitsFn, cw_loss

_TINY = 1e-12
SQUARE_NORMS = ("linf", "l2", "l1")
# L1: the original projects onto a radius shrunk by this factor, so that float rounding in the
# projection cannot leave the ball.
_L1_SHRINK = 1.0 - 1e-6
# p_selection's breakpoints, on AutoAttack's reference budget of 10000 queries: p_init / 2**j
# for iterations in (_BREAKS[j - 1], _BREAKS[j]].
_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p_selection(it: int, n_queries: int, p_init: float) -> float:
    """The fraction of pixels a square covers at update ``it`` (AutoAttack's ``p_selection``).

    ``it`` is rescaled to a budget of 10000, ``int(it / n_queries * 10000)``; then ``p_init``
    is halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 updates.

    Args:
      it: the 0-based update index.
      n_queries: the query budget the schedule is stretched over.
      p_init: the initial fraction.

    Returns:
      ``p``.
    """
    it = int(it / n_queries * 10000)
    halvings = sum(it > b for b in _BREAKS)
    return p_init / 2**halvings


def _square_sizes(n_updates: int, n_queries: int, p_init: float, h: int, w: int,
                  norm: str) -> np.ndarray:
    """(n_updates,) side length of the square of each update (host numpy, static)."""
    sizes = np.zeros(max(n_updates, 1), np.int32)
    for it in range(n_updates):
        s = int(round(math.sqrt(square_p_selection(it, n_queries, p_init) * h * w)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2  # odd
        sizes[it] = min(s, h, w)
    return sizes


def _lp(delta: np.ndarray, norm: str) -> float:
    return float(np.sum(np.abs(delta)) if norm == "l1" else np.sqrt(np.sum(delta**2)))


def _eta_rectangles(a: int, b: int, norm: str = "l2") -> np.ndarray:
    """AutoAttack's ``eta_rectangles``: nested rectangles around the centre, the k-th weighted
    ``1 / (k + 1)^2`` (L2) or ``1 / (k + 1)^4`` (L1), unit norm."""
    delta = np.zeros((a, b), np.float64)
    ca, cb = a // 2, b // 2
    power = 4 if norm == "l1" else 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        delta[max(ca - k, 0):min(ca - k + 2 * k + 1, a),
              max(cb - k, 0):min(cb - k + 2 * k + 1, b)] += 1.0 / (k + 1) ** power
    n = _lp(delta, norm)
    return delta / n if n > 0 else delta


def square_eta(s: int, norm: str = "l2") -> np.ndarray:
    """(s, s) AutoAttack's ``eta(s)`` before its random transpose: the top half a positive
    rectangle pattern, the bottom half a negative one, unit norm.

    Args:
      s: the side of the square.
      norm: ``"l2"`` (weights ``1 / (k + 1)^2``, unit L2 norm) or ``"l1"`` (weights
        ``1 / (k + 1)^4``, more concentrated at the centres, unit L1 norm).

    Returns:
      (s, s) float64 pattern.
    """
    delta = np.zeros((s, s), np.float64)
    if s // 2:
        delta[: s // 2] = _eta_rectangles(s // 2, s, norm)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s, norm)
    return delta / _lp(delta, norm)


def _sq_mask(vh_B, vw_B, s, h, w):
    """(B, H, W, 1) indicator of the s x s squares at (vh, vw), and the local coordinates."""
    r_BH1 = jnp.arange(h)[None, :, None] - vh_B[:, None, None]
    c_B1W = jnp.arange(w)[None, None, :] - vw_B[:, None, None]
    inside_BHW = (r_BH1 >= 0) & (r_BH1 < s) & (c_B1W >= 0) & (c_B1W < s)
    return inside_BHW[..., None], r_BH1, c_B1W


def _positions(key, batch, s, h, w):
    """AutoAttack's ``random_int(0, h - s)``: ``floor(U * (h - s))``, in [0, h - s - 1] (its last
    position h - s is never drawn; 0 when s == h)."""
    k_h, k_w = jr.split(key)
    vh = jnp.floor(jr.uniform(k_h, (batch,)) * (h - s)).astype(jnp.int32)
    vw = jnp.floor(jr.uniform(k_w, (batch,)) * (w - s)).astype(jnp.int32)
    return vh, vw


def _init_linf(key, x, eps):
    """Vertical stripes: ``x + eps * sign`` with one sign per (example, column, channel)."""
    b, _, w, c = x.shape
    signs = jr.rademacher(key, (b, 1, w, c), x.dtype)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def _normalize_l2(d):
    return d / expand(per_example_norm(d, "l2") + _TINY)


def _tiles(key, x, norm):
    """AutoAttack's L2 / L1 start before scaling: tiles of ``+-eta(s)`` (s = h // 5, a sign per
    example, tile and channel, a random transpose per example and tile)."""
    b, h, w, c = x.shape
    s = max(h // 5, 1)
    sp = (h - 5 * s) // 2  # the original starts the columns at the rows' offset too
    nh, nw = h // s, w // s
    rows, cols = np.arange(h) - sp, np.arange(w) - sp
    tile_r, tile_c = rows // s, cols // s
    valid = ((rows >= 0) & (tile_r < nh))[:, None] & ((cols >= 0) & (tile_c < nw))[None, :]
    tile_r, tile_c = np.clip(tile_r, 0, nh - 1), np.clip(tile_c, 0, nw - 1)
    loc_r, loc_c = rows % s, cols % s
    eta = square_eta(s, norm).astype(np.float32)
    e_1HW = jnp.asarray(eta[loc_r[:, None], loc_c[None, :]] * valid)[None]
    et_1HW = jnp.asarray(eta.T[loc_r[:, None], loc_c[None, :]] * valid)[None]
    k_sign, k_tr = jr.split(key)
    signs = jr.rademacher(k_sign, (b, nh, nw, c), x.dtype)[:, tile_r][:, :, tile_c]
    tr_BHW = (jr.uniform(k_tr, (b, nh, nw)) > 0.5)[:, tile_r][:, :, tile_c]
    pattern_BHW = jnp.where(tr_BHW, et_1HW, e_1HW)
    return pattern_BHW[..., None] * signs


def _init_l2(key, x, eps):
    """The L2 tiles scaled to L2 norm eps, clipped to [0, 1]."""
    return jnp.clip(x + _normalize_l2(_tiles(key, x, "l2")) * eps, 0.0, 1.0)


def _init_l1(key, x, eps):
    """The L1 tiles (L1 norm: the number of tiles per channel, times the channels) projected
    onto the L1 ball (radius shrunk by ``_L1_SHRINK``) cap the box, as the original does
    (``L1_projection``), not rescaled."""
    return project_l1(x + _tiles(key, x, "l1"), x, eps * _L1_SHRINK)


def _update_linf(key, x, x_best, eps, s):
    b, h, w, c = x.shape
    k_pos, k_sign = jr.split(key)
    vh, vw = _positions(k_pos, b, s, h, w)
    mask, _, _ = _sq_mask(vh, vw, s, h, w)
    signs = jr.rademacher(k_sign, (b, 1, 1, c), x.dtype)
    x_new = x_best + jnp.where(mask, 2.0 * eps * signs, 0.0)
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)


def _update_l2(key, x, x_best, eps, s, eta_idx, eta_table, norm):
    """L2 (and L1, ``norm="l1"``): move the perturbation's mass in two random windows into a
    fresh ``+-eta(s)`` pattern in the first (AutoAttack's L2 and L1 branches)."""
    b, h, w, c = x.shape
    k_pos, k_pos2, k_sign, k_tr = jr.split(key, 4)
    vh, vw = _positions(k_pos, b, s, h, w)
    vh2, vw2 = _positions(k_pos2, b, s, h, w)
    m1, r_BH1, c_B1W = _sq_mask(vh, vw, s, h, w)
    m2, _, _ = _sq_mask(vh2, vw2, s, h, w)
    f1, f2 = m1.astype(x.dtype), m2.astype(x.dtype)
    if norm == "l1":
        hw_norm = lambda d: jnp.sum(jnp.abs(d), axis=(1, 2), keepdims=True)
    else:
        hw_norm = lambda d: jnp.sqrt(jnp.sum(jnp.square(d), axis=(1, 2), keepdims=True))

    delta = x_best - x
    norm_w1 = hw_norm(delta * f1)  # (B, 1, 1, C)
    norm_img = expand(per_example_norm(delta, norm))  # (B, 1, 1, 1)
    norm_ws = hw_norm(delta * jnp.maximum(f1, f2))
    # eta(s) in window 1, transposed for a random half of the examples.
    size = eta_table.shape[1]
    r_BHW = jnp.broadcast_to(jnp.clip(r_BH1, 0, size - 1), (b, h, w))
    c_BHW = jnp.broadcast_to(jnp.clip(c_B1W, 0, size - 1), (b, h, w))
    tr_B11 = (jr.uniform(k_tr, (b,)) > 0.5)[:, None, None]
    eta_BHW = eta_table[eta_idx][jnp.where(tr_B11, c_BHW, r_BHW), jnp.where(tr_B11, r_BHW, c_BHW)]
    signs = jr.rademacher(k_sign, (b, 1, 1, c), x.dtype)
    new = eta_BHW[..., None] * f1 * signs + delta * f1 / (_TINY + norm_w1)
    if norm == "l1":
        # The original's L1 budget per channel: the window's mass plus the channel's share of
        # what the image has left, times the channels (it may overshoot eps: the projection
        # below brings the image back into the ball).
        budget = (jnp.maximum(eps - norm_img, 0.0) / c + norm_ws) * c
    else:
        budget = jnp.sqrt(jnp.maximum(jnp.square(eps) - jnp.square(norm_img), 0.0) / c
                          + jnp.square(norm_ws))
    new = new / (_TINY + hw_norm(new)) * budget
    delta = jnp.where(m1, new, jnp.where(m2, 0.0, delta))
    if norm == "l1":
        return project_l1(x + delta, x, eps * _L1_SHRINK)
    return jnp.clip(x + _normalize_l2(delta) * eps, 0.0, 1.0)


@filter_jit
def _square(model, x, y, key, eps, *, norm, n_queries, p_init):
    b, h, w, _ = x.shape
    k_init, k_steps = jr.split(jr.fold_in(key, 0))
    margin = lambda x_, q: cw_loss(model(x_, jr.fold_in(k_steps, q)), y)

    # Query 0: the clean input.
    m_best = margin(x, 0)
    x_best = x
    queries = jnp.ones((b,), jnp.int32)
    if n_queries == 1:
        return AttackResult(x_best, m_best, success=m_best > 0, queries=queries)

    # Query 1: the initialisation, kept where the clean input was classified correctly.
    init = {"linf": _init_linf, "l2": _init_l2, "l1": _init_l1}[norm]
    active = m_best <= 0
    x_init = jnp.where(expand(active), init(jr.fold_in(k_init, 1), x, eps), x)
    m_init = margin(x_init, 1)
    x_best = x_init
    m_best = jnp.where(active, m_init, m_best)
    queries = queries + active

    n_updates = n_queries - 2
    sizes_np = _square_sizes(n_updates, n_queries, p_init, h, w, norm)
    sizes = jnp.asarray(sizes_np)
    if norm == "linf":
        update = lambda k, xb, i: _update_linf(k, x, xb, eps, sizes[i])
    else:
        # eta(s) of every size the schedule uses, zero-padded to (min(h, w), min(h, w)).
        distinct = sorted(set(sizes_np.tolist()))
        side = min(h, w)
        table_np = np.zeros((len(distinct), side, side), np.float32)
        for j, s in enumerate(distinct):
            table_np[j, :s, :s] = square_eta(s, norm)
        index = jnp.asarray(np.searchsorted(distinct, sizes_np).astype(np.int32))
        table = jnp.asarray(table_np)
        update = lambda k, xb, i: _update_l2(k, x, xb, eps, sizes[i], index[i], table, norm)

    def cond(c):
        i, _, m, _ = c
        return (i < n_updates) & jnp.any(m <= 0)

    def body(c):
        i, x_best, m_best, queries = c
        active = m_best <= 0
        x_new = update(jr.fold_in(k_init, i + 2), x_best, i)
        x_cand = jnp.where(expand(active), x_new, x_best)
        m_new = margin(x_cand, i + 2)
        better = active & (m_new > m_best)
        return (i + 1, jnp.where(expand(better), x_cand, x_best),
                jnp.where(better, m_new, m_best), queries + active)

    init_c = (jnp.zeros((), jnp.int32), x_best, m_best, queries)
    _, x_best, m_best, queries = jax.lax.while_loop(cond, body, init_c)
    return AttackResult(x_best, m_best, success=m_best > 0, queries=queries)


def square(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float | Array,
           norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8) -> AttackResult:
    """Square attack: random square-shaped updates kept when they raise the margin (no gradients).

    Per example, the attack maximises the C&W margin ``m = max_{j != y} z_j - z_y`` (AutoAttack's
    ``margin`` loss with the sign flipped: positive = misclassified). Starting from the
    initialisation, each update draws a square of side ``s`` (``s^2 ~ p h w``, ``p`` from
    :func:`square_p_selection`) at a random position and

    * Linf: sets it to ``x_best +- 2 eps`` (one sign per channel), projected on the ball and
      [0, 1];
    * L2: writes into it the pattern ``+-eta(s)`` plus the current perturbation there, empties a
      second random square and rescales the new mass to the L2 budget left (AutoAttack's
      ``attack_single_run``), then scales the whole perturbation to norm eps and clips to [0, 1];
    * L1: the same two windows with the L1 pattern (weights ``1 / (k + 1)^4``, unit L1 norm):
      window 1 gets ``+-eta(s)`` plus its current perturbation rescaled to the window's L1 mass
      plus the image's unused L1 budget, window 2 is emptied, and the image is projected onto
      the L1 ball (radius ``eps (1 - 1e-6)``, as the original) cap the box with
      :func:`jaxrob.attacks.project_l1` (AutoAttack's ``L1_projection``). The start is the grid
      of L1 tiles projected the same way.

    The candidate replaces ``x_best`` only when its margin is strictly higher; an example stops as
    soon as its margin is positive. See the module docstring for the query count and the keys.

    Differences from AutoAttack's ``square.py``: the budget counts every model evaluation (the
    clean check and the initialisation included), so an example never uses more than
    ``n_queries`` (the original's loop adds up to ``n_queries`` updates to its initial query and
    checks the clean input on top); squares, positions, signs and transposes are drawn per
    example (the original's Linf square and every transpose are shared by the batch); a zero
    margin (a tie) is not a success (the original stops at ``margin <= 0``); one restart.
    The window schedule is always rescaled to ``n_queries`` (the original's ``resc_schedule``,
    its default; AutoAttack itself turns it off).

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1] (the window schedule assumes square images, as
        the original does).
      y: (B,) int labels.
      key: randomness of the search and the model's keys (module docstring).
      eps: radius of the ball (>= 0).
      norm: ``"linf"``, ``"l2"`` or ``"l1"``.
      n_queries: the most model evaluations per example (>= 1; 1: only the clean check).
      p_init: the initial fraction of pixels a square covers, in (0, 1] (0.8).

    Returns:
      :class:`AttackResult` with ``x_adv`` (the best point: in the ball and in [0, 1]),
      ``loss`` the C&W margin there (as measured by its query), ``success`` = margin > 0,
      ``queries`` the (B,) model evaluations each example used.

    Raises:
      ValueError: bad images or labels, unknown ``norm``, ``eps < 0``, ``n_queries < 1``,
        ``p_init`` outside (0, 1].

    References:
      Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
      adversarial attack via random search", ECCV 2020; Croce & Hein, "Mind the box: l1-APGD
      for sparse adversarial attacks on image classifiers", ICML 2021 (L1); AutoAttack,
      github.com/fra31/auto-attack, ``autoattack/square.py``.
    """
    y = check_attack_inputs(x, y)
    check_choice(norm, SQUARE_NORMS, "norm")
    eps = check_scalar(eps, "eps")
    n_queries = check_positive_int(n_queries, "n_queries")
    try:
        p_ok = 0.0 < float(p_init) <= 1.0
    except (TypeError, ValueError):
        p_ok = False
    if not p_ok:
        raise ValueError(f"p_init: expected a number in (0, 1], got {p_init!r}")
    resolve_loss(model, "cw", x=x, y=y, key=key)  # checks the model and the labels
    return _square(model, x, y, key, eps, norm=norm, n_queries=n_queries, p_init=float(p_init))
