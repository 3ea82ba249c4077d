"""Carlini-Wagner L2: Adam in tanh space on ``||x' - x||^2 + c f(x')``, optional search over c,
optional EoT over a randomised model's keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from jaxrob._checks import check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Images, Key, Labels
from jaxrob.attacks._common import (
    AttackResult,
    check_attack_inputs,
    check_eot,
    check_scalar,
    eot_logits,
    eot_mean,
    expand,
    resolve_loss,
)
from jaxrob.attacks._losses import LogitsFn, cw_loss

_C_UPPER = 1e10  # "no upper bound found yet" in the binary search


def search_init(c, batch: int):
    """The binary search over C&W's constant: ``(c, lower, upper, best distance)`` per
    example, the upper bound "not found yet" and the distance infinite."""
    full = lambda v: jnp.full((batch,), v, jnp.float32)
    return full(1.0) * c, full(0.0), full(_C_UPPER), full(jnp.inf)


def search_c(found_B, c_B, lo_B, hi_B):
    """One binary-search update: success -> a smaller c, failure -> a larger one (x10 until an
    upper bound is known). Returns ``(c, lower, upper)``."""
    hi_B = jnp.where(found_B, jnp.minimum(hi_B, c_B), hi_B)
    lo_B = jnp.where(found_B, lo_B, jnp.maximum(lo_B, c_B))
    return jnp.where(hi_B < _C_UPPER, (lo_B + hi_B) / 2.0, c_B * 10.0), lo_B, hi_B


def _margin(z_BK, y_B):
    """``max_{j != y} z_j - z_y`` (the value of :func:`cw_loss`), differentiated through the
    logit it selects (``argmax`` + gather). ``jnp.max``'s derivative instead marks the entries
    equal to the maximum, which can mark none when XLA recomputes the logits with different
    rounding inside the gradient (seen with a key-dependent model under EoT's vmap in a scan:
    the margin term's gradient silently vanished for some examples)."""
    onehot_BK = jax.nn.one_hot(y_B, z_BK.shape[1], dtype=bool)
    j_B = jnp.argmax(jnp.where(onehot_BK, -jnp.inf, z_BK), axis=1)
    pick = lambda i_B: jnp.take_along_axis(z_BK, i_B[:, None], axis=1)[:, 0]
    return pick(j_B) - pick(y_B)


def cw_objective(logits_fn, w, x, y, c_B, kappa, key):
    """C&W's untargeted objective at ``w`` for one model key: ``(sum of the per-example
    objectives, (logits, squared L2 distance, x'))``, with ``x' = (tanh(w) + 1) / 2``."""
    x_adv = (jnp.tanh(w) + 1.0) / 2.0
    z_BK = logits_fn(x_adv, key)
    margin_B = _margin(z_BK, y)  # max_{j != y} z_j - z_y
    l2sq_B = jnp.sum(jnp.square(x_adv - x), axis=(1, 2, 3))
    f_B = jnp.maximum(-margin_B, -kappa)  # C&W's f_6, untargeted
    return jnp.sum(l2sq_B + c_B * f_B), (z_BK, l2sq_B, x_adv)


def cw_eot_grad(logits_fn, w, x, y, c_B, kappa, key, *, eot_samples, eot_chunk):
    """The gradient of C&W's objective in ``w`` and the logits, EoT-averaged.

    ``eot_samples = 1``: the gradient and logits under ``key`` itself. More: the means over the
    keys ``fold_in(key, j)``, ``j < eot_samples`` (:func:`eot_mean`). Returns ``(grad, logits,
    squared L2 distance, x')`` (the last two do not depend on the key).
    """
    vg = jax.value_and_grad(
        lambda w_, k: cw_objective(logits_fn, w_, x, y, c_B, kappa, k), has_aux=True)
    if eot_samples == 1:
        (_, (z_BK, l2sq_B, x_adv)), g = vg(w, key)
        return g, z_BK, l2sq_B, x_adv

    def one(k):
        (_, (z_BK, _, _)), g = vg(w, k)
        return g, z_BK

    g, z_BK = eot_mean(one, key, eot_samples, eot_chunk)
    x_adv = (jnp.tanh(w) + 1.0) / 2.0
    return g, z_BK, jnp.sum(jnp.square(x_adv - x), axis=(1, 2, 3)), x_adv


@filter_jit
def _cw_l2(logits_fn, x, y, key, c, kappa, learning_rate, *, num_steps, binary_search_steps,
           eot_samples, eot_chunk):
    batch = x.shape[0]
    # x = (tanh(w) + 1) / 2; shrink so that pixels at exactly 0 or 1 have a finite w.
    w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0, 1.0) * (1.0 - 1e-6))
    opt = optax.adam(learning_rate)
    eot = dict(eot_samples=eot_samples, eot_chunk=eot_chunk)

    def search(carry, s):
        c_B, lo_B, hi_B, best_l2sq_B, best_x = carry
        k_s = jr.fold_in(key, s)

        def step(carry2, i):
            w, opt_state, found_B, best_l2sq_B, best_x = carry2
            g, z_BK, l2sq_B, x_adv = cw_eot_grad(logits_fn, w, x, y, c_B, kappa,
                                                 jr.fold_in(k_s, i), **eot)
            success_B = cw_loss(z_BK, y) > kappa
            improve_B = success_B & (l2sq_B < best_l2sq_B)
            best_x = jnp.where(expand(improve_B), x_adv, best_x)
            best_l2sq_B = jnp.where(improve_B, l2sq_B, best_l2sq_B)
            updates, opt_state = opt.update(g, opt_state, w)
            w = optax.apply_updates(w, updates)
            return (w, opt_state, found_B | success_B, best_l2sq_B, best_x), None

        init2 = (w0, opt.init(w0), jnp.zeros((batch,), bool), best_l2sq_B, best_x)
        (_, _, found_B, best_l2sq_B, best_x), _ = jax.lax.scan(step, init2,
                                                               jnp.arange(num_steps))
        c_B, lo_B, hi_B = search_c(found_B, c_B, lo_B, hi_B)
        return (c_B, lo_B, hi_B, best_l2sq_B, best_x), None

    init = (*search_init(c, batch), x)
    (_, _, _, best_l2sq_B, best_x), _ = jax.lax.scan(search, init,
                                                     jnp.arange(binary_search_steps))
    success_B = jnp.isfinite(best_l2sq_B)
    z_BK = eot_logits(logits_fn, best_x, jr.fold_in(key, binary_search_steps), **eot)
    return AttackResult(best_x, cw_loss(z_BK, y), norm=jnp.sqrt(best_l2sq_B), success=success_B)


def cw_l2(logits_fn: LogitsFn, x: Images, y: Labels, key: Key, *, c: float = 1.0,
          kappa: float = 0.0, num_steps: int = 100, learning_rate: float = 0.01,
          binary_search_steps: int = 1, eot_samples: int = 1,
          eot_chunk: int | None = None) -> AttackResult:
    """Carlini-Wagner L2 attack (untargeted) with Adam on ``w``, ``x' = (tanh(w) + 1) / 2``.

    Minimises ``||x' - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` over ``w`` with Adam
    from ``w_0 = arctanh(2x - 1)``, so ``x'`` is in [0, 1] by construction. Among the iterates
    that are misclassified with margin > ``kappa``, the one closest to ``x`` is returned.
    ``binary_search_steps = 1`` (default) runs one fixed ``c``; more steps repeat the
    optimisation from ``w_0`` with a per-example binary search on ``c`` (halve towards the
    last success, x10 until a first success), keeping the best result over all of them.
    Iteration ``i`` of search step ``s`` calls ``logits_fn`` with ``k_si = fold_in(fold_in(key,
    s), i)``.

    EoT (randomised models): with ``eot_samples = S > 1`` the Adam step uses the mean over the
    keys ``fold_in(k_si, j)``, ``j < S``, of the objective's gradient (the distance term is
    deterministic; the margin term is averaged over the model's keys), and the success test
    that decides whether the iterate is kept (margin > ``kappa``) uses the margin of the
    EoT-averaged logits at that iterate. ``S = 1`` uses ``k_si`` itself, exactly as before EoT
    existed.

    Args:
      logits_fn: ``logits_fn(x, key) -> (B, K)``.
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness passed to ``logits_fn``.
      c: initial trade-off constant (> 0), per example during the search.
      kappa: confidence margin (>= 0).
      num_steps: Adam steps per search step.
      learning_rate: Adam step size (> 0).
      binary_search_steps: number of values of ``c`` tried (1: fixed ``c``).
      eot_samples: EoT samples per gradient and success test (1: no EoT).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.

    Returns:
      :class:`AttackResult`: ``x_adv`` (``x`` where no iterate succeeded), ``norm`` the L2
      distance (inf where it failed), ``success``, ``loss`` the C&W margin at ``x_adv``
      (evaluated with ``fold_in(key, binary_search_steps)``; with EoT, the margin of the mean
      logits over that key's ``eot_samples`` samples).

    Raises:
      ValueError: bad images or labels, ``c <= 0``, ``learning_rate <= 0``, non-positive
        ``num_steps`` / ``binary_search_steps`` / ``eot_samples``, or ``eot_chunk`` not
        dividing ``eot_samples``.

    References:
      Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017;
      Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML
      2018 (EoT).
    """
    y = check_attack_inputs(x, y)
    c = check_scalar(c, "c", positive=True)
    kappa = check_scalar(kappa, "kappa")
    learning_rate = check_scalar(learning_rate, "learning_rate", positive=True)
    num_steps = check_positive_int(num_steps, "num_steps")
    binary_search_steps = check_positive_int(binary_search_steps, "binary_search_steps")
    eot_samples, eot_chunk = check_eot(eot_samples, eot_chunk, "eot_samples", "eot_chunk")
    resolve_loss(logits_fn, "cw", x=x, y=y, key=key)  # checks the model and the labels
    return _cw_l2(logits_fn, x, y, key, c, kappa, learning_rate, num_steps=num_steps,
                  binary_search_steps=binary_search_steps, eot_samples=eot_samples,
                  eot_chunk=eot_chunk)


