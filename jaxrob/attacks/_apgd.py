"""APGD (Auto-PGD) of Croce & Hein (2020) with AutoAttack's step-size rules, Linf and L2.

A step-size-free PGD with momentum: the step starts at ``2 eps`` and is halved, and the iterate
reset to the best point so far, at checkpoints where progress stalled. Follows AutoAttack's
``autopgd_base.py`` (``attack_single_run``), including its integer checkpoint schedule, with
one deliberate difference: the count of loss increases in the first window compares iteration 1
with the loss at the starting point (AutoAttack compares it with a zero it has not filled in yet).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from jaxrob._checks import check_positive_int
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
    resolve_loss,
    resolve_target,
    score_targeted,
    steepest_direction,
    targets_or_least_likely,
)
from jaxrob.attacks._eot import eot_value_and_grad
from jaxrob.attacks._losses import LogitsFn, TargetedLogitsLoss

APGD_LOSSES = ("ce", "cw", "dlr")


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
              eot_samples, eot_chunk, eot_mesh, return_iterates, track_fn=None) -> AttackResult:
    """One APGD run. ``track_fn`` (AutoAttack's bookkeeping, off by default): a
    ``logits_fn(x, key)`` whose prediction at every evaluated point, under the key of that
    point's EoT sample 0, flags it misclassified (``pred != y``); the result then has
    ``success`` = some point was, and ``x_adv`` = the last such point (AutoAttack's
    ``x_best_adv``), the highest-loss point where none was."""
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


@filter_jit
def _apgd(loss_fn, x, y, key, eps, *, norm, num_steps, rho, alpha, random_start, num_restarts,
          eot_samples, eot_chunk, eot_mesh, return_iterates):
    run = functools.partial(
        _apgd_run, loss_fn, x, y, eps=eps, norm=norm, num_steps=num_steps, rho=rho, alpha=alpha,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh,
        return_iterates=return_iterates)
    return best_over_restarts(run, x, key, num_restarts, return_iterates)


@filter_jit
def _apgd_targeted(model, x, y, key, target, eps, *, loss, norm, num_steps, rho, alpha,
                   random_start, num_restarts, eot_samples, eot_chunk, eot_mesh,
                   return_iterates):
    target = targets_or_least_likely(model, x, y, key, target)
    loss_fn = TargetedLogitsLoss(model, target, loss)
    run = functools.partial(
        _apgd_run, loss_fn, x, y, eps=eps, norm=norm, num_steps=num_steps, rho=rho, alpha=alpha,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh, return_iterates=return_iterates)
    res = best_over_restarts(run, x, key, num_restarts, return_iterates)
    return score_targeted(model, res, target, key)


def apgd(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float | Array,
         norm: str = "linf", num_steps: int = 100, loss: str | Callable = "ce",
         target: Labels | str | None = None, random_start: bool = True, num_restarts: int = 1,
         rho: float = 0.75, alpha: float = 0.75, eot_samples: int = 1,
         eot_chunk: int | None = None, eot_mesh=None,
         return_iterates: bool = False) -> AttackResult:
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

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness of the start and of every iteration (see :mod:`jaxrob.attacks._common`).
      eps: radius of the ball (>= 0).
      norm: ``"linf"`` or ``"l2"``.
      num_steps: iterations N (the loss is evaluated N + 1 times per restart).
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
      rho: oscillation threshold (0.75).
      alpha: momentum weight (0.75).
      eot_samples: EoT samples per gradient (AutoAttack's ``eot_iter``).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.
      eot_mesh: shard each chunk of EoT samples over this mesh's ``eot`` (else ``data``) axis
        (:func:`eot_value_and_grad`); None: no constraint.
      return_iterates: also return every evaluated point (restarts * (N + 1), B, H, W, C).

    Returns:
      :class:`AttackResult`: ``x_adv`` is the highest-loss point (AutoAttack's ``x_best``; with
      ``"dlr"``/``"cw"`` a positive loss means misclassified), ``loss`` its loss; targeted,
      also ``success``: ``x_adv`` predicted as the target (scored as in :func:`pgd`).

    Raises:
      ValueError: as :func:`pgd` (including the checks of ``target``), and ``rho``/``alpha``
        outside (0, 1].

    References:
      Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020 (Algorithm 1, Section 3.2); AutoAttack,
      github.com/fra31/auto-attack, ``autoattack/autopgd_base.py``.
    """
    y = check_attack_inputs(x, y, norm=norm)
    eps = check_scalar(eps, "eps")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
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
                              return_iterates=bool(return_iterates))
    return _apgd(loss_fn, x, y, key, eps, norm=norm, num_steps=num_steps, rho=float(rho),
                 alpha=float(alpha), random_start=bool(random_start),
                 num_restarts=num_restarts, eot_samples=eot_samples, eot_chunk=eot_chunk,
                 eot_mesh=eot_mesh,
                 return_iterates=bool(return_iterates))
