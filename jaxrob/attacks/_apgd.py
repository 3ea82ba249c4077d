"""APGD (Auto-PGD) of Croce & Hein (2020) with AutoAttack's step-size rules, Linf, L2 and L1.

A step-size-free PGD with momentum: the step starts at ``2 eps`` and is halved, and the iterate
reset to the best point so far, at checkpoints where progress stalled. Follows AutoAttack's
``autopgd_base.py`` (``attack_single_run``), including its integer checkpoint schedule, with
one deliberate difference: the count of loss increases in the first window compares iteration 1
with the loss at the starting point (AutoAttack compares it with a zero it has not filled in yet).

L1 is APGD-L1 of Croce & Hein (2021), AutoAttack's L1 branch: sparse sign steps of unit L1 norm
on the largest gradient entries, the exact projection onto the L1 ball intersected with the box
(:func:`jaxrob.attacks.project_l1`), no momentum, and its own checkpoint rule (adapting the
sparsity and the step); optionally AutoAttack's ``use_largereps`` schedule (radii 3, 2, 1 x eps).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from jaxrob._checks import check_choice, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Array, Images, Key, Labels
from jaxrob.attacks._common import (
    AttackResult,
    best_over_restarts,
    check_attack_inputs,
    check_eot,
    check_scalar,
    expand,
    per_example_norm,
    project,
    project_l1,
    resolve_loss,
    resolve_target,
    score_targeted,
    steepest_direction,
    targets_or_least_likely,
)
from jaxrob.attacks._eot import eot_value_and_grad
from jaxrob.attacks._losses import LogitsFn, TargetedLogitsLoss

APGD_LOSSES = ("ce", "cw", "dlr")
APGD_NORMS = ("linf", "l2", "l1")


def apgd_checkpoints(num_steps: int) -> list[int]:
    """Iteration counts after which APGD checks its progress (AutoAttack's integer rules).

    ``w_1 = max(floor(0.22 N), 1)`` and window lengths shrinking by ``max(floor(0.03 N), 1)``
    down to ``max(floor(0.06 N), 1)``: the discrete form of ``p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, ``w_j = ceil(p_j N)``.

    Args:
      num_steps: N, the number of APGD iterations.

    Returns:
      Increasing checkpoint iteration counts ``w_j <= N`` (checkpoint after iteration ``w_j``).
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    k = max(int(0.22 * num_steps), 1)
    decr, k_min = max(int(0.03 * num_steps), 1), max(int(0.06 * num_steps), 1)
    checks, w = [], k
    while w <= num_steps:
        checks.append(w)
        k = max(k - decr, k_min)
        w += k
    return checks


def _schedule(num_steps: int, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Per iteration i (0-based): is it a checkpoint, and the increase-count threshold rho * k."""
    is_check = np.zeros(num_steps, bool)
    thresh = np.zeros(num_steps, np.float32)
    prev = 0
    for w in apgd_checkpoints(num_steps):
        is_check[w - 1] = True
        thresh[w - 1] = rho * (w - prev)
        prev = w
    return is_check, thresh


def _apgd_init(key, x, eps, norm):
    """AutoAttack's start: ``x + eps * t / ||t||`` (t uniform for Linf, normal for L2)."""
    if norm == "linf":
        t = jr.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jr.normal(key, x.shape, x.dtype)
    d = eps * t / expand(per_example_norm(t, norm) + 1e-12)
    return project(x + d, x, eps, norm)


def _apgd_run(loss_fn, x, y, key, eps, *, norm, num_steps, rho, alpha, random_start,
              eot_samples, eot_chunk, eot_mesh, return_iterates, track_fn=None,
              use_largereps=False) -> AttackResult:
    """One APGD run. ``track_fn`` (AutoAttack's bookkeeping, off by default): a
    ``logits_fn(x, key)`` whose prediction at every evaluated point, under the key of that
    point's EoT sample 0, flags it misclassified (``pred != y``); the result then has
    ``success`` = some point was, and ``x_adv`` = the last such point (AutoAttack's
    ``x_best_adv``), the highest-loss point where none was."""
    if norm == "l1":
        return _apgd_l1_run(loss_fn, x, y, key, eps, num_steps=num_steps,
                            random_start=random_start, use_largereps=use_largereps,
                            eot_samples=eot_samples, eot_chunk=eot_chunk, eot_mesh=eot_mesh,
                            return_iterates=return_iterates, track_fn=track_fn)
    k_init, k_steps = jr.split(key)
    vg = lambda x_, t: eot_value_and_grad(loss_fn, x_, y, jr.fold_in(k_steps, t),
                                          samples=eot_samples, chunk=eot_chunk, mesh=eot_mesh)
    # The model key of EoT sample 0 at evaluation t (eot_value_and_grad's fold_in(key_t, 0)).
    wrong = lambda x_, t: jnp.argmax(
        track_fn(x_, jr.fold_in(jr.fold_in(k_steps, t), 0)), axis=1) != y
    x0 = _apgd_init(k_init, x, eps, norm) if random_start else x
    loss0_B, grad0 = vg(x0, 0)
    batch = x.shape[0]
    is_check, thresh = _schedule(num_steps, rho)

    def body(c, inp):
        i, check, thr = inp
        # Gradient step, then the momentum step of Eq. (2), both projected.
        a = jnp.where(i > 0, alpha, 1.0)
        z = project(c["x"] + expand(c["step"]) * steepest_direction(c["grad"], norm), x, eps,
                    norm)
        x_new = project(c["x"] + a * (z - c["x"]) + (1.0 - a) * (c["x"] - c["x_old"]), x, eps,
                        norm)
        loss_B, grad = vg(x_new, i + 1)
        tracked = {}
        if track_fn is not None:
            wrong_B = wrong(x_new, i + 1)
            tracked = {"found": c["found"] | wrong_B,
                       "x_found": jnp.where(expand(wrong_B), x_new, c["x_found"])}

        n_incr = c["n_incr"] + (loss_B > c["loss_prev"]).astype(jnp.float32)
        better_B = loss_B > c["loss_best"]
        x_best = jnp.where(expand(better_B), x_new, c["x_best"])
        grad_best = jnp.where(expand(better_B), grad, c["grad_best"])
        loss_best = jnp.where(better_B, loss_B, c["loss_best"])

        # Checkpoint: halve the step (and restart from the best point) where the loss rose in at
        # most a fraction rho of the window's steps, or where neither the step nor the best loss
        # changed since the previous checkpoint.
        oscillating = n_incr <= thr
        stalled = ~c["reduced_last"] & (c["loss_best_last"] >= loss_best)
        reduce_B = check & (oscillating | stalled)
        return {
            "x": jnp.where(expand(reduce_B), x_best, x_new),
            "x_old": c["x"],
            "grad": jnp.where(expand(reduce_B), grad_best, grad),
            "step": jnp.where(reduce_B, c["step"] / 2.0, c["step"]),
            "loss_prev": loss_B,
            "n_incr": jnp.where(check, 0.0, n_incr),
            "x_best": x_best,
            "grad_best": grad_best,
            "loss_best": loss_best,
            "loss_best_last": jnp.where(check, loss_best, c["loss_best_last"]),
            "reduced_last": jnp.where(check, reduce_B, c["reduced_last"]),
            **tracked,
        }, (x_new if return_iterates else None)

    init = {
        "x": x0, "x_old": x0, "grad": grad0,
        "step": jnp.full((batch,), 2.0, jnp.float32) * eps,
        "loss_prev": loss0_B, "n_incr": jnp.zeros((batch,), jnp.float32),
        "x_best": x0, "grad_best": grad0, "loss_best": loss0_B,
        "loss_best_last": loss0_B, "reduced_last": jnp.ones((batch,), bool),
    }
    if track_fn is not None:
        init["found"] = wrong(x0, 0)
        init["x_found"] = x0
    xs = (jnp.arange(num_steps), jnp.asarray(is_check), jnp.asarray(thresh))
    final, its = jax.lax.scan(body, init, xs)
    if return_iterates:
        its = jnp.concatenate([x0[None], its], axis=0)
    if track_fn is not None:
        x_adv = jnp.where(expand(final["found"]), final["x_found"], final["x_best"])
        return AttackResult(x_adv, final["loss_best"], its, success=final["found"])
    return AttackResult(final["x_best"], final["loss_best"], its)


def largereps_schedule(num_steps: int) -> list[tuple[float, int]]:
    """AutoAttack's ``use_largereps`` schedule of APGD-L1: ``[(eps factor, iterations)]``.

    Radii ``3 eps, 2 eps, eps`` for ``ceil(0.3 N)``, ``ceil(0.3 N)`` and the remaining
    ``N - 2 ceil(0.3 N)`` iterations (``N >= 3``), each phase starting from the previous
    phase's best point projected onto its ball.
    """
    first = math.ceil(0.3 * num_steps)
    last = num_steps - 2 * first
    if last < 1:
        raise ValueError(f"num_steps: use_largereps splits the iterations 30/30/40% over "
                         f"three radii, expected at least 3, got {num_steps}")
    return [(3.0, first), (2.0, first), (1.0, last)]


def _l0(d_BHWC):
    return jnp.sum(d_BHWC != 0.0, axis=(1, 2, 3)).astype(jnp.float32)


def _apgd_l1_phase(vg, wrong, x, eps, x0, *, num_steps, from_init, return_iterates):
    """One APGD-L1 run from ``x0`` (Croce & Hein 2021, AutoAttack's L1 branch): sparse
    steepest-ascent steps, no momentum; every ``max(floor(0.04 N), 1)`` iterations the
    sparsity ``k`` follows the best point's and the step is reset (the best point's sparsity
    fell by over 5%) or divided by 1.5 (else), within ``[eps / 10, eps]``."""
    batch = x.shape[0]
    n_fts = math.prod(x.shape[1:])
    loss0_B, grad0 = vg(x0, 0)
    if from_init:  # AutoAttack's custom start: the sparsity of the start
        sp0_B = _l0(x0 - x)
        topk0_B = sp0_B / n_fts / 1.5
    else:
        sp0_B = jnp.full((batch,), float(n_fts), jnp.float32)
        topk0_B = jnp.full((batch,), 0.2, jnp.float32)
    every = max(int(0.04 * num_steps), 1)
    is_check = (np.arange(1, num_steps + 1) % every) == 0
    eps = jnp.asarray(eps, jnp.float32)

    def body(c, inp):
        i, check = inp
        # Keep the gradient's k largest magnitudes, k = topk * d; unit-L1 sign step on them.
        g_BD = c["grad"].reshape(batch, -1)
        sorted_BD = jnp.sort(jnp.abs(g_BD), axis=1)
        k_B = jnp.clip((1.0 - c["topk"]) * jnp.float32(n_fts), 0, n_fts - 1).astype(jnp.int32)
        thr_B = jnp.take_along_axis(sorted_BD, k_B[:, None], axis=1)[:, 0]
        s = jnp.sign(jnp.where(jnp.abs(c["grad"]) >= expand(thr_B), c["grad"], 0.0))
        s = s / expand(per_example_norm(s, "l1") + 1e-10)
        x_new = project_l1(c["x"] + expand(c["step"]) * s, x, eps)
        loss_B, grad = vg(x_new, i + 1)
        tracked = {}
        if wrong is not None:
            wrong_B = wrong(x_new, i + 1)
            tracked = {"found": c["found"] | wrong_B,
                       "x_found": jnp.where(expand(wrong_B), x_new, c["x_found"])}
        better_B = loss_B > c["loss_best"]
        x_best = jnp.where(expand(better_B), x_new, c["x_best"])
        grad_best = jnp.where(expand(better_B), grad, c["grad_best"])
        loss_best = jnp.where(better_B, loss_B, c["loss_best"])
        sp_B = _l0(x_best - x)
        sparser_B = sp_B / c["sp_old"] < 0.95
        step_B = jnp.clip(jnp.where(sparser_B, eps, c["step"] / 1.5), eps / 10.0, eps)
        reset_B = check & sparser_B
        return {
            "x": jnp.where(expand(reset_B), x_best, x_new),
            "grad": jnp.where(expand(reset_B), grad_best, grad),
            "step": jnp.where(check, step_B, c["step"]),
            "topk": jnp.where(check, sp_B / n_fts / 1.5, c["topk"]),
            "sp_old": jnp.where(check, sp_B, c["sp_old"]),
            "x_best": x_best, "grad_best": grad_best, "loss_best": loss_best,
            **tracked,
        }, (x_new if return_iterates else None)

    init = {"x": x0, "grad": grad0, "step": jnp.full((batch,), 1.0, jnp.float32) * eps,
            "topk": topk0_B, "sp_old": sp0_B, "x_best": x0, "grad_best": grad0,
            "loss_best": loss0_B}
    if wrong is not None:
        init["found"] = wrong(x0, 0)
        init["x_found"] = x0
    final, its = jax.lax.scan(body, init, (jnp.arange(num_steps), jnp.asarray(is_check)))
    if return_iterates:
        its = jnp.concatenate([x0[None], its], axis=0)
    return final, its


def _apgd_l1_run(loss_fn, x, y, key, eps, *, num_steps, random_start, use_largereps,
                 eot_samples, eot_chunk, eot_mesh, return_iterates, track_fn):
    """APGD-L1 (see :func:`apgd`); with ``use_largereps`` the three phases of
    :func:`largereps_schedule`, phase ``p`` evaluating with ``fold_in(fold_in(k_steps, p),
    t)``. AutoAttack's bookkeeping (``track_fn``) is that of the last phase, as the
    original's ``decr_eps_pgd`` returns it."""
    k_init, k_steps = jr.split(key)

    def closures(k):
        vg = lambda x_, t: eot_value_and_grad(loss_fn, x_, y, jr.fold_in(k, t),
                                              samples=eot_samples, chunk=eot_chunk,
                                              mesh=eot_mesh)
        wrong = None if track_fn is None else (lambda x_, t: jnp.argmax(
            track_fn(x_, jr.fold_in(jr.fold_in(k, t), 0)), axis=1) != y)
        return vg, wrong

    # AutoAttack's L1 start: x + t projected, t standard normal.
    noise = jr.normal(k_init, x.shape, x.dtype)
    if not use_largereps:
        x0 = project_l1(x + noise, x, eps) if random_start else x
        final, its = _apgd_l1_phase(*closures(k_steps), x, eps, x0, num_steps=num_steps,
                                    from_init=False, return_iterates=return_iterates)
    else:
        x_start = project_l1(x + noise, x, 3.0 * eps) if random_start else x
        its_all = []
        for p, (factor, n_p) in enumerate(largereps_schedule(num_steps)):
            x_start = project_l1(x_start, x, factor * eps)
            final, its = _apgd_l1_phase(*closures(jr.fold_in(k_steps, p)), x, factor * eps,
                                        x_start, num_steps=n_p, from_init=True,
                                        return_iterates=return_iterates)
            x_start = final["x_best"]
            its_all.append(its)
        its = jnp.concatenate(its_all, axis=0) if return_iterates else None
    if track_fn is not None:
        x_adv = jnp.where(expand(final["found"]), final["x_found"], final["x_best"])
        return AttackResult(x_adv, final["loss_best"], its, success=final["found"])
    return AttackResult(final["x_best"], final["loss_best"], its)


@filter_jit
def _apgd(loss_fn, x, y, key, eps, *, norm, num_steps, rho, alpha, random_start, num_restarts,
          eot_samples, eot_chunk, eot_mesh, return_iterates, use_largereps):
    run = functools.partial(
        _apgd_run, loss_fn, x, y, eps=eps, norm=norm, num_steps=num_steps, rho=rho, alpha=alpha,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh, return_iterates=return_iterates, use_largereps=use_largereps)
    return best_over_restarts(run, x, key, num_restarts, return_iterates)


@filter_jit
def _apgd_targeted(model, x, y, key, target, eps, *, loss, norm, num_steps, rho, alpha,
                   random_start, num_restarts, eot_samples, eot_chunk, eot_mesh,
                   return_iterates, use_largereps):
    target = targets_or_least_likely(model, x, y, key, target)
    loss_fn = TargetedLogitsLoss(model, target, loss)
    run = functools.partial(
        _apgd_run, loss_fn, x, y, eps=eps, norm=norm, num_steps=num_steps, rho=rho, alpha=alpha,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh, return_iterates=return_iterates, use_largereps=use_largereps)
    res = best_over_restarts(run, x, key, num_restarts, return_iterates)
    return score_targeted(model, res, target, key)


def apgd(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float | Array,
         norm: str = "linf", num_steps: int = 100, loss: str | Callable = "ce",
         target: Labels | str | None = None, random_start: bool = True, num_restarts: int = 1,
         rho: float = 0.75, alpha: float = 0.75, eot_samples: int = 1,
         eot_chunk: int | None = None, eot_mesh=None, return_iterates: bool = False,
         use_largereps: bool = False) -> AttackResult:
    """Auto-PGD: PGD with momentum and an adaptive step size, best (highest-loss) point kept.

    Per iteration ``k`` (``s`` = sign for Linf, ``g / ||g||_2`` for L2; ``P`` the projection on
    the eps-ball intersected with [0, 1]^d):

      ``z = P(x_k + eta_k s(g_k))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)
      (x_k - x_{k-1}))`` (``alpha = 1`` at the first step),

    with ``eta_0 = 2 eps``. At the checkpoints of :func:`apgd_checkpoints`, per example,
    ``eta`` is halved and ``x`` reset to the best point (with its gradient) when the loss rose
    in at most ``rho`` of the window's steps (AutoAttack's ``<=``), or when the step was not
    halved at the previous checkpoint and the best loss has not improved since. The schedule
    depends on ``num_steps``, so (unlike :func:`pgd`) runs of different lengths follow
    different paths. All iterates are projected, so they lie in the ball and in [0, 1].

    L1 (APGD-L1, Croce & Hein 2021, as AutoAttack runs it): no momentum (``alpha`` and ``rho``
    are unused); the step is ``x_{k+1} = P(x_k + eta_k s_k / ||s_k||_1)`` with ``s_k`` the
    sign of the top-``k`` entries of ``|g_k|`` (``k = topk * d``, the entries at
    or above AutoAttack's sorted index ``floor((1 - topk) d)``), ``P`` the exact projection
    onto the L1 ball intersected with [0, 1]^d (:func:`project_l1`), ``eta_0 = eps``, ``topk_0
    = 0.2``. Every ``max(floor(0.04 N), 1)`` iterations, per example: ``topk`` becomes the
    best point's sparsity ``||x_best - x||_0 / (1.5 d)``; where that sparsity fell below 95% of
    its value at the previous check, ``eta`` is reset to ``eps`` and ``x`` to the best point
    (with its gradient), elsewhere ``eta`` is divided by 1.5, within ``[eps / 10, eps]``. The
    random start is ``P(x + t)``, ``t`` standard normal. ``use_largereps`` (AutoAttack's L1
    standard version): three phases at radii ``3 eps, 2 eps, eps`` for 30%, 30% and 40% of the
    iterations (:func:`largereps_schedule`), each starting from the previous phase's best
    point projected onto its ball, with ``topk`` initialised from the start's sparsity;
    phase ``p`` evaluates with ``fold_in(fold_in(k_steps, p), t)``; the result is the last
    phase's (so within ``eps``).

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness of the start and of every iteration (see :mod:`jaxrob.attacks._common`).
      eps: radius of the ball (>= 0).
      norm: ``"linf"``, ``"l2"`` or ``"l1"``.
      num_steps: iterations N (the loss is evaluated N + 1 times per restart; N + 3 with
        ``use_largereps``, one more at the start of each phase).
      loss: ``"ce"`` (default), ``"dlr"`` (APGD-DLR), ``"cw"`` or a callable
        ``loss(logits, y) -> (B,)``; or an :class:`InputLoss` built on ``model`` such as
        :func:`diffattack_loss` (DiffAttack as the paper runs it: APGD with EoT), untargeted.
      target: None (default): untargeted. A (B,) int array of target classes or
        ``"least_likely"`` (as :func:`jaxrob.attacks.pgd`): the targeted form of ``loss`` is
        maximised (:data:`TARGETED_LOSSES`; ``loss="dlr"`` is APGD-T, AutoAttack's
        ``dlr_loss_targeted``, which needs K >= 4 classes; ``"ce"`` is AutoAttack's
        ``ce-targeted``). AutoAttack's APGD-T loops over the 2nd..10th most likely classes as
        targets; here one target per example is given (call once per target for that).
      random_start: AutoAttack's start ``x + eps t / ||t||`` (t uniform / normal), else ``x``.
      num_restarts: independent runs (restart ``r`` uses ``fold_in(key, r)``); best kept.
      rho: oscillation threshold (0.75; unused by L1).
      alpha: momentum weight (0.75; unused by L1).
      eot_samples: EoT samples per gradient (AutoAttack's ``eot_iter``).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.
      eot_mesh: shard each chunk of EoT samples over this mesh's ``eot`` (else ``data``) axis
        (:func:`eot_value_and_grad`); None: no constraint.
      return_iterates: also return every evaluated point (restarts * (N + 1), B, H, W, C;
        N + 3 per restart with ``use_largereps``).
      use_largereps: L1 only: AutoAttack's decreasing-radius schedule (its L1 standard
        version's APGD-CE and APGD-T); needs ``num_steps >= 3``.

    Returns:
      :class:`AttackResult`: ``x_adv`` is the highest-loss point (AutoAttack's ``x_best``; with
      ``"dlr"``/``"cw"`` a positive loss means misclassified), ``loss`` its loss; targeted,
      also ``success``: ``x_adv`` predicted as the target (scored as in :func:`pgd`).

    Raises:
      ValueError: as :func:`pgd` (including the checks of ``target``), ``rho``/``alpha``
        outside (0, 1], ``use_largereps`` with a norm other than L1 or fewer than 3 steps.

    References:
      Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020 (Algorithm 1, Section 3.2); Croce & Hein, "Mind the
      box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021 (L1);
      AutoAttack, github.com/fra31/auto-attack, ``autoattack/autopgd_base.py``.
    """
    y = check_attack_inputs(x, y)
    check_choice(norm, APGD_NORMS, "norm")
    eps = check_scalar(eps, "eps")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    use_largereps = bool(use_largereps)
    if use_largereps:
        if norm != "l1":
            raise ValueError(f"use_largereps: AutoAttack's decreasing-radius schedule is for the "
                             f"L1 norm only, got norm={norm!r}")
        largereps_schedule(num_steps)  # checks num_steps >= 3
    for name, v in (("rho", rho), ("alpha", alpha)):
        if not 0.0 < float(v) <= 1.0:
            raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
    eot_samples, eot_chunk = check_eot(eot_samples, eot_chunk, "eot_samples", "eot_chunk")
    loss_fn = resolve_loss(model, loss, x=x, y=y, key=key)
    if target is not None:
        target = resolve_target(model, x, y, target, loss, key)
        return _apgd_targeted(model, x, y, key, target, eps, loss=loss, norm=norm,
                              num_steps=num_steps, rho=float(rho), alpha=float(alpha),
                              random_start=bool(random_start), num_restarts=num_restarts,
                              eot_samples=eot_samples, eot_chunk=eot_chunk, eot_mesh=eot_mesh,
                              return_iterates=bool(return_iterates),
                              use_largereps=use_largereps)
    return _apgd(loss_fn, x, y, key, eps, norm=norm, num_steps=num_steps, rho=float(rho),
                 alpha=float(alpha), random_start=bool(random_start),
                 num_restarts=num_restarts, eot_samples=eot_samples, eot_chunk=eot_chunk,
                 eot_mesh=eot_mesh, return_iterates=bool(return_iterates),
                 use_largereps=use_largereps)
