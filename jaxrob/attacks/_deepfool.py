"""DeepFool (Linf or L2): step to the linearised decision boundary, once per iteration; optional
EoT (the linearisation of the expected logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

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
    per_example_norm,
    resolve_loss,
)
from jaxrob.attacks._losses import LogitsFn, cw_loss

_DUAL = {"l2": "l2", "linf": "l1"}


def _logits_and_rows(logits_fn, x_adv, key, cot_MBK, *, eot_samples, eot_chunk):
    """Logits (B, K) and the gradients of the candidates' logits (M, B, H, W, C) at ``x_adv``:
    under ``key`` (``eot_samples = 1``), else their means over ``fold_in(key, j)``, j < S."""

    def one(k):
        z_BK, vjp = jax.vjp(lambda v: logits_fn(v, k), x_adv)
        (g_MBHWC,) = jax.vmap(vjp)(cot_MBK)  # gradient of each candidate's logit
        return z_BK, g_MBHWC

    if eot_samples == 1:
        return one(key)
    return eot_mean(one, key, eot_samples, eot_chunk)


@filter_jit
def _deepfool(logits_fn, x, y, key, overshoot, *, norm, num_steps, num_candidates, eot_samples,
              eot_chunk):
    batch = x.shape[0]
    eot = dict(eot_samples=eot_samples, eot_chunk=eot_chunk)
    z0_BK = eot_logits(logits_fn, x, jr.fold_in(key, 0), **eot)
    if z0_BK.ndim != 2 or z0_BK.shape[1] < 2:
        raise ValueError(f"logits_fn: expected logits of shape ({batch}, K) with K >= 2, got "
                         f"{z0_BK.shape}")
    num_classes = z0_BK.shape[1]
    n = num_classes - 1 if num_candidates is None else min(num_candidates, num_classes - 1)
    # Candidate classes: the n highest clean logits other than the true class, true class first.
    onehot_BK = jax.nn.one_hot(y, num_classes, dtype=bool)
    others_Bn = jax.lax.top_k(jnp.where(onehot_BK, -jnp.inf, z0_BK), n)[1]
    classes_BM = jnp.concatenate([y[:, None], others_Bn], axis=1)  # M = n + 1
    cot_MBK = jnp.moveaxis(jax.nn.one_hot(classes_BM, num_classes, dtype=x.dtype), 1, 0)
    arange_B = jnp.arange(batch)

    def body(i, carry):
        r_tot, x_adv, active_B = carry
        z_BK, g_MBHWC = _logits_and_rows(logits_fn, x_adv, jr.fold_in(key, i), cot_MBK, **eot)
        active_B = active_B & (jnp.argmax(z_BK, axis=1) == y)
        z_BM = jnp.take_along_axis(z_BK, classes_BM, axis=1)
        f_Bn = z_BM[:, 1:] - z_BM[:, :1]
        w_nBHWC = g_MBHWC[1:] - g_MBHWC[:1]
        # Box constraint: drop the components that would push a pixel already at 0 (1) further
        # down (up); the clip would undo them, and the linearised step would fall short.
        x_1BHWC = x_adv[None]
        blocked = ((x_1BHWC <= 0.0) & (w_nBHWC < 0.0)) | ((x_1BHWC >= 1.0) & (w_nBHWC > 0.0))
        w_nBHWC = jnp.where(blocked, 0.0, w_nBHWC)
        wnorm_nB = jax.vmap(lambda w: per_example_norm(w, _DUAL[norm]))(w_nBHWC)
        dist_Bn = jnp.abs(f_Bn) / (wnorm_nB.T + 1e-8)
        l_B = jnp.argmin(dist_Bn, axis=1)
        w_B = w_nBHWC[l_B, arange_B]
        f_B = jnp.abs(f_Bn[arange_B, l_B]) + 1e-4
        wn_B = wnorm_nB[l_B, arange_B] + 1e-8
        if norm == "l2":
            r = expand(f_B / jnp.square(wn_B)) * w_B
        else:
            r = expand(f_B / wn_B) * jnp.sign(w_B)
        r_tot = r_tot + jnp.where(expand(active_B), r, 0.0)
        x_adv = jnp.clip(x + (1.0 + overshoot) * r_tot, 0.0, 1.0)
        return r_tot, x_adv, active_B

    init = (jnp.zeros_like(x), x, jnp.ones((batch,), bool))
    _, x_adv, _ = jax.lax.fori_loop(0, num_steps, body, init)
    z_BK = eot_logits(logits_fn, x_adv, jr.fold_in(key, num_steps), **eot)
    success_B = jnp.argmax(z_BK, axis=1) != y
    return AttackResult(x_adv, cw_loss(z_BK, y), norm=per_example_norm(x_adv - x, norm),
                        success=success_B)


def deepfool(logits_fn: LogitsFn, x: Images, y: Labels, key: Key, *, norm: str = "l2",
             overshoot: float = 0.02, num_steps: int = 50,
             num_candidates: int | None = None, eot_samples: int = 1,
             eot_chunk: int | None = None) -> AttackResult:
    """DeepFool: step to the nearest linearised decision boundary until misclassified.

    At ``x_i`` with logits ``z``, for each candidate class ``k != y``: ``f_k = z_k - z_y``,
    ``w_k = grad z_k - grad z_y``; ``l = argmin_k |f_k| / ||w_k||_q`` (q = 2 for L2, q = 1 for
    Linf) and the step is ``r_i = (|f_l| + 1e-4) / ||w_l||_2^2 w_l`` (L2) or
    ``(|f_l| + 1e-4) / ||w_l||_1 sign(w_l)`` (Linf);
    ``x_{i+1} = clip(x + (1 + overshoot) sum_{j <= i} r_j, 0, 1)``.

    Differences from the paper: the box [0, 1] is part of the linearisation (components of
    ``w_k`` that would push a pixel already at 0 or 1 out of the box are zeroed before the
    norms and the step are computed; without this a clipped step falls short and the attack
    crawls towards the boundary); the true label ``y`` is attacked (the original attacks the
    predicted label). Examples stop moving once misclassified (checked at every iterate). The
    loop is a ``lax.fori_loop`` of ``num_steps`` iterations (finished examples still cost their
    forward / backward passes). Iteration ``i`` calls ``logits_fn`` with ``k_i = fold_in(key,
    i)`` (the candidate classes are chosen from the logits at ``x`` under ``k_0``).

    EoT (randomised models): with ``eot_samples = S > 1``, ``z`` and the gradients in ``w_k``
    are the means over the keys ``fold_in(k_i, j)``, ``j < S``, so each step is DeepFool's step
    on the linearisation of the expected logits (its Jacobian rows are the mean rows); the
    candidate classes, the misclassification test that stops an example, and the final
    ``success`` / ``loss`` use the EoT-mean logits too. ``S = 1`` uses ``k_i`` itself, exactly
    as before EoT existed.

    Args:
      logits_fn: ``logits_fn(x, key) -> (B, K)``.
      x: (B, H, W, C) float32 images in [0, 1].
      y: (B,) int labels.
      key: randomness passed to ``logits_fn``.
      norm: ``"l2"`` or ``"linf"``.
      overshoot: relative overshoot of the accumulated perturbation (0.02).
      num_steps: maximum number of iterations.
      num_candidates: only the classes with the highest clean logits (the original's 10) are
        candidates; None: all K - 1 other classes.
      eot_samples: EoT samples per linearisation (1: no EoT).
      eot_chunk: EoT samples per vmap (must divide ``eot_samples``); None: all.

    Returns:
      :class:`AttackResult` with the final ``x_adv``, its distance to ``x`` in ``norm``,
      whether it is misclassified and its C&W margin ``loss`` (evaluated with
      ``fold_in(key, num_steps)``; with EoT, of the mean logits over its samples).

    Raises:
      ValueError: bad images or labels, an unknown ``norm``, non-positive ``num_steps`` /
        ``num_candidates`` / ``eot_samples``, or ``eot_chunk`` not dividing ``eot_samples``.

    References:
      Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool deep
      neural networks", CVPR 2016 (Algorithm 2; Linf via Eq. (12) with q = 1); Athalye,
      Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018 (EoT).
    """
    y = check_attack_inputs(x, y, norm=norm)
    overshoot = check_scalar(overshoot, "overshoot")
    num_steps = check_positive_int(num_steps, "num_steps")
    if num_candidates is not None:
        num_candidates = check_positive_int(num_candidates, "num_candidates")
    eot_samples, eot_chunk = check_eot(eot_samples, eot_chunk, "eot_samples", "eot_chunk")
    resolve_loss(logits_fn, "cw", x=x, y=y, key=key)  # checks the model and the labels
    return _deepfool(logits_fn, x, y, key, overshoot, norm=norm, num_steps=num_steps,
                     num_candidates=num_candidates, eot_samples=eot_samples,
                     eot_chunk=eot_chunk)
