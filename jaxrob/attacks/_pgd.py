"""FGSM and PGD (Linf sign steps, L2 normalised steps) with EoT gradients and best-iterate tracking.

PGD evaluates the loss and gradient at ``x_0, ..., x_T`` (``T = num_steps``) inside one
``lax.scan`` and keeps, per example, the point with the highest loss. Iteration ``t`` uses the key
``fold_in(k_steps, t)`` (see :mod:`jaxrob.attacks._common`), so a run with more steps visits the
same points first and its best loss is never lower for the same key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr

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
    project,
    resolve_loss,
    resolve_target,
    score_targeted,
    steepest_direction,
    targets_or_least_likely,
    uniform_in_ball,
)
from jaxrob.attacks._eot import eot_value_and_grad
from jaxrob.attacks._losses import LogitsFn, TargetedLogitsLoss


@filter_jit
def _fgsm(loss_fn, x, y, key, eps, *, eot_samples, eot_chunk, eot_mesh):
    k_grad, k_eval = jr.fold_in(key, 0), jr.fold_in(key, 1)
    _, g = eot_value_and_grad(loss_fn, x, y, k_grad, samples=eot_samples, chunk=eot_chunk,
                              mesh=eot_mesh)
    x_adv = project(x + eps * jnp.sign(g), x, eps, "linf")
    loss_B, _ = eot_value_and_grad(loss_fn, x_adv, y, k_eval, samples=eot_samples,
                                   chunk=eot_chunk, mesh=eot_mesh)
    return AttackResult(x_adv, loss_B)


def fgsm(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float,
         loss: str | Callable = "ce", eot_samples: int = 1, eot_chunk: int | None = None,
         eot_mesh=None) -> AttackResult:
    """Fast Gradient Sign Method (Linf): ``clip(x + eps * sign(grad_x loss), 0, 1)``.

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (e.g. a :class:`jaxrob.purify.DefendedModel` or a
        :class:`jaxrob.models.Classifier`; deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: the gradient uses ``fold_in(key, 0)``, the reported loss ``fold_in(key, 1)``.
      eps: Linf radius (>= 0).
      loss: ``"ce"`` (default), ``"cw"``, ``"dlr"`` or a callable ``loss(logits, y) -> (B,)``.
      eot_samples: EoT samples per gradient (:func:`eot_value_and_grad`).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.
      eot_mesh: shard each chunk of EoT samples over this mesh's ``eot`` (else ``data``) axis
        (:func:`eot_value_and_grad`); None: no constraint.

    Returns:
      :class:`AttackResult` with the single-step ``x_adv`` (not the better of ``x`` and
      ``x_adv``) and the loss there; ``iterates`` is None.

    References:
      Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
    """
    y = check_attack_inputs(x, y)
    eps = check_scalar(eps, "eps")
    eot_samples, eot_chunk = check_eot(eot_samples, eot_chunk, "eot_samples", "eot_chunk")
    loss_fn = resolve_loss(model, loss, x=x, y=y, key=key)
    return _fgsm(loss_fn, x, y, key, eps, eot_samples=eot_samples, eot_chunk=eot_chunk,
                 eot_mesh=eot_mesh)


def _pgd_run(loss_fn, x, y, key, eps, step_size, *, norm, num_steps, random_start, eot_samples,
             eot_chunk, eot_mesh, return_iterates) -> AttackResult:
    k_init, k_steps = jr.split(key)
    x0 = uniform_in_ball(k_init, x, eps, norm) if random_start else x

    def body(carry, t):
        x_t, x_best, loss_best_B = carry
        loss_B, g = eot_value_and_grad(loss_fn, x_t, y, jr.fold_in(k_steps, t),
                                       samples=eot_samples, chunk=eot_chunk, mesh=eot_mesh)
        better_B = loss_B > loss_best_B
        x_best = jnp.where(expand(better_B), x_t, x_best)
        loss_best_B = jnp.where(better_B, loss_B, loss_best_B)
        # The step after the last evaluation is never used; computing it keeps the body uniform.
        x_next = project(x_t + step_size * steepest_direction(g, norm), x, eps, norm)
        return (x_next, x_best, loss_best_B), (x_t if return_iterates else None)

    init = (x0, x0, jnp.full((x.shape[0],), -jnp.inf, jnp.float32))
    (_, x_best, loss_best_B), its = jax.lax.scan(body, init, jnp.arange(num_steps + 1))
    return AttackResult(x_best, loss_best_B, its)


@filter_jit
def _pgd(loss_fn, x, y, key, eps, step_size, *, norm, num_steps, random_start, num_restarts,
         eot_samples, eot_chunk, eot_mesh, return_iterates):
    run = functools.partial(
        _pgd_run, loss_fn, x, y, eps=eps, step_size=step_size, norm=norm, num_steps=num_steps,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh,
        return_iterates=return_iterates)
    return best_over_restarts(run, x, key, num_restarts, return_iterates)


@filter_jit
def _pgd_targeted(model, x, y, key, target, eps, step_size, *, loss, norm, num_steps,
                  random_start, num_restarts, eot_samples, eot_chunk, eot_mesh,
                  return_iterates):
    target = targets_or_least_likely(model, x, y, key, target)
    loss_fn = TargetedLogitsLoss(model, target, loss)
    run = functools.partial(
        _pgd_run, loss_fn, x, y, eps=eps, step_size=step_size, norm=norm, num_steps=num_steps,
        random_start=random_start, eot_samples=eot_samples, eot_chunk=eot_chunk,
        eot_mesh=eot_mesh, return_iterates=return_iterates)
    res = best_over_restarts(run, x, key, num_restarts, return_iterates)
    return score_targeted(model, res, target, key)


def pgd(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float | Array,
        norm: str = "linf", step_size: float | Array | None = None, num_steps: int = 10,
        random_start: bool = False, num_restarts: int = 1, loss: str | Callable = "ce",
        target: Labels | str | None = None, eot_samples: int = 1, eot_chunk: int | None = None,
        eot_mesh=None, return_iterates: bool = False) -> AttackResult:
    """Projected gradient ascent on a per-example loss in an Linf or L2 ball, best iterate kept.

    ``x_{t+1} = Proj_{B(x, eps) cap [0,1]^d}(x_t + step_size * s_t)`` with ``s_t = sign(g_t)``
    (Linf) or ``g_t / ||g_t||_2`` (L2), ``g_t`` the (EoT-averaged) input gradient at ``x_t``.
    Every iterate is projected, so it lies in the eps-ball and in [0, 1] by construction. The
    loss is evaluated at ``x_0 .. x_T`` and the highest-loss point per example is returned
    (highest loss, not first misclassified: with the ``"cw"``/``"dlr"`` losses a positive loss
    means misclassified, so the two agree on success).

    The loop is a ``lax.scan`` inside ``jax.jit``; ``eps`` and ``step_size`` are traced, so
    sweeping them does not recompile; the model's parameters are traced too (a pytree model
    such as :class:`jaxrob.purify.DefendedModel`), so new parameters of the same shapes reuse
    the compilation, while the integer/bool options are static.

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key).
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness of the random start and of every iteration (module docstring).
      eps: radius of the ball (>= 0).
      norm: ``"linf"`` or ``"l2"``.
      step_size: step length (> 0); None: ``2.5 * eps / num_steps`` (Madry et al.).
      num_steps: gradient steps T (the loss is evaluated T + 1 times).
      random_start: start uniformly at random in the ball (Linf: per-pixel uniform; L2: uniform
        in the ball) instead of at ``x``.
      num_restarts: independent runs (restart ``r`` uses ``fold_in(key, r)``); the best is kept.
      loss: ``"ce"`` (default), ``"cw"``, ``"dlr"`` or a callable ``loss(logits, y) -> (B,)``
        maximised by the attacker; or a loss on the inputs built on ``model``
        (:class:`InputLoss`, e.g. :func:`diffattack_loss`: DiffAttack's classification plus
        deviated-reconstruction loss), untargeted only.
      target: None (default): untargeted. A (B,) int array of target classes, or
        ``"least_likely"`` (per example, the class other than ``y`` with the lowest clean logit
        under ``model(x, fold_in(key, LEAST_LIKELY))``, :mod:`jaxrob._keys`): the attack
        maximises the targeted form of ``loss`` (:data:`TARGETED_LOSSES`: ``"ce"`` is
        ``-CE(z, t)``, i.e. it minimises the cross-entropy of the target; ``"cw"`` is
        ``z_t - max_{j != t} z_j``; ``"dlr"`` the targeted DLR of APGD-T).
      eot_samples: EoT samples per gradient (:func:`eot_value_and_grad`).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.
      eot_mesh: shard each chunk of EoT samples over this mesh's ``eot`` (else ``data``) axis
        (:func:`eot_value_and_grad`); None: no constraint.
      return_iterates: also return every evaluated point,
        (num_restarts * (num_steps + 1), B, H, W, C).

    Returns:
      :class:`AttackResult` ``(x_adv, loss, iterates)``; targeted, also ``success``: whether
      ``x_adv`` is predicted as the target (one more model evaluation, with
      ``fold_in(key, TARGET_HIT)``).

    Raises:
      ValueError: bad images or labels (labels outside the model's classes), ``eps < 0``,
        ``step_size <= 0``, unknown ``norm`` or ``loss``, non-positive
        ``num_steps``/``num_restarts``/``eot_samples``, or ``eot_chunk`` not dividing
        ``eot_samples``; a ``target`` that is neither ``"least_likely"`` nor a (B,) int array,
        is outside the model's classes or equals ``y``, or comes with a callable ``loss``.

    References:
      Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
      Adversarial Attacks", ICLR 2018.
    """
    y = check_attack_inputs(x, y, norm=norm)
    eps = check_scalar(eps, "eps")
    num_steps = check_positive_int(num_steps, "num_steps")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    step_size = (2.5 * eps / num_steps if step_size is None
                 else check_scalar(step_size, "step_size", positive=True))
    eot_samples, eot_chunk = check_eot(eot_samples, eot_chunk, "eot_samples", "eot_chunk")
    loss_fn = resolve_loss(model, loss, x=x, y=y, key=key)
    if target is not None:
        target = resolve_target(model, x, y, target, loss, key)
        return _pgd_targeted(model, x, y, key, target, eps, step_size, loss=loss, norm=norm,
                             num_steps=num_steps, random_start=bool(random_start),
                             num_restarts=num_restarts, eot_samples=eot_samples,
                             eot_chunk=eot_chunk, eot_mesh=eot_mesh,
                             return_iterates=bool(return_iterates))
    return _pgd(loss_fn, x, y, key, eps, step_size, norm=norm, num_steps=num_steps,
                random_start=bool(random_start), num_restarts=num_restarts,
                eot_samples=eot_samples, eot_chunk=eot_chunk, eot_mesh=eot_mesh,
                return_iterates=bool(return_iterates))
