"""EAD, the elastic-net attack (Chen et al. 2018): L1-regularised C&W by (F)ISTA shrinkage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_choice, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Array, Images, Key, Labels
from jaxrob.attacks._common import (
    AttackResult,
    check_attack_inputs,
    check_scalar,
    expand,
    per_example_norm,
    resolve_loss,
)
from jaxrob.attacks._cw import search_c, search_init
from jaxrob.attacks._losses import LogitsFn, cw_loss

_C_UPPER = 1e10  # "no upper bound found yet" in the binary search (as C&W's and EAD's code)
DECISION_RULES = ("EN", "L1")
EAD_METHODS = ("fista", "ista")


def _shrink(z, x, beta):
    """Projected shrinkage-thresholding ``S_beta`` onto [0, 1]: per pixel, ``z - beta`` (at most
    1) where ``z - x > beta``, ``z + beta`` (at least 0) where ``z - x < -beta``, else ``x``."""
    d = z - x
    return jnp.where(d > beta, jnp.minimum(z - beta, 1.0),
                     jnp.where(d < -beta, jnp.maximum(z + beta, 0.0), x))


@filter_jit
def _ead(logits_fn, x, y, key, c, kappa, beta, learning_rate, *, num_steps, binary_search_steps,
         decision_rule, method):
    batch = x.shape[0]

    def objective(v, c_B, k):
        # g(v) = c f(v) + ||v - x||_2^2, f = max(z_y - max_{j != y} z_j + kappa, 0); the L1 term
        # is handled by the shrinkage.
        margin_B = cw_loss(logits_fn(v, k), y)
        f_B = jnp.maximum(kappa - margin_B, 0.0)
        return jnp.sum(c_B * f_B + jnp.sum(jnp.square(v - x), axis=(1, 2, 3)))

    grad_g = jax.grad(objective)

    def distance(d):
        l1_B = per_example_norm(d, "l1")
        if decision_rule == "L1":
            return l1_B
        return beta * l1_B + jnp.sum(jnp.square(d), axis=(1, 2, 3))

    def search(carry, s):
        c_B, lo_B, hi_B, best_dist_B, best_x = carry
        if binary_search_steps >= 10:  # the last step repeats at the upper bound (C&W, EAD)
            c_B = jnp.where(s == binary_search_steps - 1, jnp.minimum(hi_B, _C_UPPER), c_B)
        k_s = jr.fold_in(key, s)

        def step(carry2, i):
            x_k, y_k, found_B, best_dist_B, best_x = carry2
            k_i = jr.fold_in(k_s, i)
            lr = learning_rate * jnp.sqrt(1.0 - i / num_steps)  # square-root decay
            x_next = _shrink(y_k - lr * grad_g(y_k, c_B, jr.fold_in(k_i, 0)), x, beta)
            if method == "fista":
                y_k = jnp.clip(x_next + i / (i + 3.0) * (x_next - x_k), 0.0, 1.0)
            else:
                y_k = x_next
            margin_B = cw_loss(logits_fn(x_next, jr.fold_in(k_i, 1)), y)
            success_B = margin_B > kappa
            dist_B = distance(x_next - x)
            improve_B = success_B & (dist_B < best_dist_B)
            best_x = jnp.where(expand(improve_B), x_next, best_x)
            best_dist_B = jnp.where(improve_B, dist_B, best_dist_B)
            return (x_next, y_k, found_B | success_B, best_dist_B, best_x), None

        init2 = (x, x, jnp.zeros((batch,), bool), best_dist_B, best_x)
        (_, _, found_B, best_dist_B, best_x), _ = jax.lax.scan(step, init2,
                                                               jnp.arange(num_steps))
        c_B, lo_B, hi_B = search_c(found_B, c_B, lo_B, hi_B)
        return (c_B, lo_B, hi_B, best_dist_B, best_x), None

    init = (*search_init(c, batch), x)
    (_, _, _, best_dist_B, best_x), _ = jax.lax.scan(search, init,
                                                     jnp.arange(binary_search_steps))
    success_B = jnp.isfinite(best_dist_B)
    margin_B = cw_loss(logits_fn(best_x, jr.fold_in(key, binary_search_steps)), y)
    l1_B = jnp.where(success_B, per_example_norm(best_x - x, "l1"), jnp.inf)
    return AttackResult(best_x, margin_B, norm=l1_B, success=success_B)


def ead(logits_fn: LogitsFn, x: Images, y: Labels, key: Key, *, beta: float | Array = 1e-2,
        c: float | Array = 1e-3, kappa: float | Array = 0.0, num_steps: int = 1000,
        learning_rate: float | Array = 1e-2, binary_search_steps: int = 9,
        decision_rule: str = "EN", method: str = "fista") -> AttackResult:
    """EAD: elastic-net attack, ``min c f(x') + ||x' - x||_2^2 + beta ||x' - x||_1`` on [0, 1].

    ``f(x') = max(z_y - max_{j != y} z_j + kappa, 0)`` (untargeted C&W loss). Per search step,
    from ``x_0 = y_0 = x``, iteration ``k = 0 .. N - 1`` with ``a_k = lr sqrt(1 - k / N)``:

      ``x_{k+1} = S_beta(y_k - a_k grad g(y_k))``, ``g = c f + ||. - x||_2^2``,
      ``y_{k+1} = x_{k+1} + k / (k + 3) (x_{k+1} - x_k)`` (FISTA; ISTA: ``y_{k+1} = x_{k+1}``),

    where ``S_beta`` is the projected shrinkage-thresholding operator (Eq. (5) of the paper): it
    keeps ``x_{k+1}`` in [0, 1]. Among the iterates ``x_k`` misclassified with margin > ``kappa``
    the one with the smallest elastic-net distance ``beta ||d||_1 + ||d||_2^2``
    (``decision_rule="EN"``) or L1 distance (``"L1"``) is returned, over all search steps. The
    per-example search on ``c`` is C&W's: halve towards the last success, x10 until a first
    success; with 10 or more steps the last one reruns at the upper bound.

    Differences from the original code (and foolbox's ``EADAttack``): the momentum point
    ``y_k`` is clipped to [0, 1], so the model is only ever evaluated on valid images (the
    original evaluates the gradient at the unclipped extrapolation); success and distance are
    judged with the model evaluated at ``x_{k+1}`` itself (foolbox reuses the logits of
    ``y_k``); no early abort (every search step runs its ``num_steps`` iterations inside one
    ``lax.scan``). Iteration ``k`` of search step ``s`` evaluates the gradient with
    ``fold_in(fold_in(fold_in(key, s), k), 0)`` and the success check with ``..., 1)``.

    Args:
      logits_fn: ``logits_fn(x, key) -> (B, K)``.
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness passed to ``logits_fn``.
      beta: L1 weight and shrinkage threshold (>= 0; 1e-2).
      c: initial trade-off constant (> 0; 1e-3), per example during the search.
      kappa: confidence margin (>= 0).
      num_steps: (F)ISTA iterations per search step (1000).
      learning_rate: initial step size (> 0; 1e-2), decayed as ``sqrt(1 - k / N)``.
      binary_search_steps: values of ``c`` tried per example (9).
      decision_rule: ``"EN"`` (elastic-net distance) or ``"L1"``: how the best point is picked.
      method: ``"fista"`` (default) or ``"ista"``.

    Returns:
      :class:`AttackResult`: ``x_adv`` (``x`` where no iterate succeeded), ``norm`` its L1
      distance to ``x`` (inf where it failed), ``success``, ``loss`` the C&W margin at ``x_adv``
      (evaluated with ``fold_in(key, binary_search_steps)``).

    Raises:
      ValueError: bad images or labels, negative ``beta``/``kappa``, non-positive ``c`` or
        ``learning_rate``, non-positive step counts, unknown ``decision_rule`` or ``method``.

    References:
      Chen, Sharma, Zhang, Yi & Hsieh, "EAD: Elastic-Net Attacks to Deep Neural Networks via
      Adversarial Examples", AAAI 2018 (Algorithm 1).
    """
    y = check_attack_inputs(x, y)
    beta = check_scalar(beta, "beta")
    c = check_scalar(c, "c", positive=True)
    kappa = check_scalar(kappa, "kappa")
    learning_rate = check_scalar(learning_rate, "learning_rate", positive=True)
    num_steps = check_positive_int(num_steps, "num_steps")
    binary_search_steps = check_positive_int(binary_search_steps, "binary_search_steps")
    check_choice(decision_rule, DECISION_RULES, "decision_rule")
    check_choice(method, EAD_METHODS, "method")
    resolve_loss(logits_fn, "cw", x=x, y=y, key=key)  # checks the model and the labels
    return _ead(logits_fn, x, y, key, c, kappa, beta, learning_rate, num_steps=num_steps,
                binary_search_steps=binary_search_steps, decision_rule=decision_rule,
                method=method)
