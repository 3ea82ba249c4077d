"""Shared pieces of the attacks: input checks, norms, projection, random starts, result types.

Key derivation, shared by every attack (documented here once): restart ``r`` uses
``key_r = fold_in(key, r)``; ``k_init, k_steps = split(key_r)``; the random start is drawn from
``k_init`` and the loss / gradient of iteration ``t`` is evaluated with ``fold_in(k_steps, t)``
(EoT sample ``i`` of that iteration with ``fold_in(fold_in(k_steps, t), i)``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_choice, check_images, check_positive_int
from jaxrob._types import Array, Images, Key, PerExample
from jaxrob.attacks._losses import LOSSES, InputLoss, LossFn, loss_from_logits

NORMS = ("linf", "l2")
_TINY = 1e-12


class AttackResult(NamedTuple):
    """What every attack returns.

    Attributes:
      x_adv: (B, H, W, C) adversarial images in [0, 1]. Norm-bounded attacks (FGSM, PGD, APGD):
        the best iterate per example, the one with the highest loss (ties keep the earliest),
        inside the eps-ball around ``x``; Square: its best (highest-margin) query, in the ball.
        Minimum-norm attacks (C&W, EAD, DeepFool): the closest successful point found (C&W,
        EAD: ``x`` where it failed; DeepFool: its last iterate). Protective perturbations
        (:func:`jaxrob.attacks.advdm`, ``sds``, ``photoguard``, ``mist``, ``edit_attack``): the
        last iterate, in the eps-ball.
      loss: (B,) the attack loss at ``x_adv`` as measured when it was chosen (the EoT mean over
        that iteration's keys for randomised losses); minimum-norm attacks report the C&W
        margin ``max_{j != y} z_j - z_y`` there (positive = misclassified); protective
        perturbations their own loss (each names it), measured once more at ``x_adv``.
      iterates: every evaluated point, (num_restarts * (num_steps + 1), B, H, W, C), when the
        attack was asked for them; otherwise None.
      norm: (B,) ``||x_adv - x||`` in the attack's norm (minimum-norm attacks: L2 for C&W, L1
        for EAD, both inf where they failed); None for norm-bounded attacks and Square.
      success: (B,) bool, whether ``x_adv`` was misclassified when last evaluated
        (minimum-norm attacks and Square), or predicted as the target (targeted PGD / APGD);
        None for untargeted gradient attacks (FGSM, PGD, APGD).
      queries: (B,) int32, the model evaluations an example used (query-based attacks: Square,
        whose ``loss`` is the C&W margin at ``x_adv``); None for the other attacks.
    """

    x_adv: Array
    loss: Array
    iterates: Array | None = None
    norm: Array | None = None
    success: Array | None = None
    queries: Array | None = None


# --------------------------------------------------------------------------------------------
# Checks (values only on concrete inputs, so the public functions stay jit-able).


def check_labels(y, x) -> Array:
    shape = getattr(y, "shape", None)
    dtype = getattr(y, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"y: expected an int array of labels, shape ({x.shape[0]},), got "
                         f"{type(y).__name__} {dtype}")
    if tuple(shape) != (x.shape[0],):
        raise ValueError(f"y: expected shape ({x.shape[0]},) (one label per image of x), got "
                         f"{tuple(shape)}")
    if not isinstance(y, jax.core.Tracer) and np.asarray(y).size and np.asarray(y).min() < 0:
        raise ValueError(f"y: expected labels >= 0, got min {int(np.asarray(y).min())}")
    return jnp.asarray(y, jnp.int32)


def check_scalar(value, name: str, *, positive: bool = False) -> Array:
    """A float32 scalar, checked finite and >= 0 (> 0 with ``positive``) when concrete."""
    if isinstance(value, jax.core.Tracer):
        if value.ndim != 0:
            raise ValueError(f"{name}: expected a scalar, got shape {value.shape}")
        return value.astype(jnp.float32)
    try:
        v = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if v.ndim != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {v.shape}")
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return jnp.asarray(value, jnp.float32)


def check_attack_inputs(x, y, *, norm: str | None = None) -> Array:
    """Check images, labels (and the norm name); return the labels as int32."""
    check_images(x, "x")
    if norm is not None:
        check_choice(norm, NORMS, "norm")
    return check_labels(y, x)


def resolve_loss(model, loss, kappa: float | None = None, *, x=None, y=None,
                 key=None) -> LossFn:
    """The loss an attack maximises: ``loss_from_logits(model, loss, kappa=kappa)``.

    Every attack takes the model as ``logits_fn(x, key) -> logits`` and a ``loss`` (a name of
    :data:`LOSSES` or a callable ``loss(logits, y) -> (B,)``), or an :class:`InputLoss` built
    on that model (e.g. :func:`jaxrob.attacks.diffattack_loss`), returned as it is after its
    own check of the batch. With concrete labels ``y`` and
    inputs ``x`` the labels are checked against the model's number of classes (one abstract
    evaluation, no compute).
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable logits_fn(x, key) -> logits, got "
                        f"{type(model).__name__}")
    if loss is None:
        raise TypeError("loss: expected 'ce', 'cw', 'dlr' or a callable loss(logits, y) -> (B,); "
                        "attacks take the model as logits_fn(x, key), not a loss function")
    if isinstance(loss, InputLoss):
        # a loss on the inputs (e.g. DiffAttack's): used as it is, for the model it was built on
        if getattr(loss, "model", model) is not model:
            raise ValueError("loss: this loss was built for another model; build it with the "
                             "model the attack attacks (e.g. diffattack_loss(model, x))")
        if kappa is not None:
            raise ValueError("kappa: only the 'cw' loss takes a confidence cap")
        loss_fn = loss
        if x is not None and y is not None:
            loss.check(x, y)
    else:
        if not callable(loss):
            check_choice(loss, LOSSES, "loss")
        loss_fn = loss_from_logits(model, loss, kappa=kappa)
    if x is not None and y is not None and not isinstance(y, jax.core.Tracer):
        check_num_classes(model, x, y, key)
    return loss_fn


def check_num_classes(model, x, y, key=None) -> int:
    """Raise unless every label is below the model's number of classes (returns it)."""
    key = jr.key(0) if key is None else key
    try:
        out = jax.eval_shape(model, x, key)  # abstract: no compute
    except TypeError as e:
        if "positional argument" in str(e):
            raise TypeError(f"model: expected logits_fn(x, key) -> logits (one callable "
                            f"convention for everything an attack attacks), calling it failed: "
                            f"{e}") from e
        raise
    if len(out.shape) != 2:
        raise ValueError(f"model: expected logits of shape (batch, classes), got {out.shape}")
    k = int(out.shape[-1])
    y_np = np.asarray(y)
    if y_np.size and int(y_np.max()) >= k:
        raise ValueError(f"y: expected labels in [0, {k}) for a model with {k} classes, got "
                         f"max {int(y_np.max())}")
    return k


def resolve_target(model, x, y, target, loss, key=None):
    """Check a targeted attack's ``target`` and ``loss``; return the targets (or None).

    Args:
      model: ``logits_fn(x, key)``; its number of classes K is read abstractly (no compute).
      x, y: the images and (checked) int32 labels.
      target: None (untargeted), ``"least_likely"`` or a (B,) int array of classes.
      loss: the loss name (a callable loss cannot be made targeted).
      key: the attack's key (for the abstract evaluation only).

    Returns:
      None for ``"least_likely"`` (picked inside the attack), else the targets as int32.

    Raises:
      ValueError: a target that is not ``"least_likely"`` or a (B,) int array, outside
        ``[0, K)``, equal to the label ``y``; a callable ``loss``; ``"dlr"`` with K < 4.
    """
    if callable(loss):
        raise ValueError("loss: a targeted attack takes a named loss ('ce', 'cw' or 'dlr', made "
                         "targeted: -CE of the target, z_t - max_{j!=t} z_j, targeted DLR), got "
                         "a callable")
    key = jr.key(0) if key is None else key
    num_classes = int(jax.eval_shape(model, x, key).shape[-1])
    if loss == "dlr" and num_classes < 4:
        raise ValueError(f"loss: the targeted DLR needs at least 4 classes, the model has "
                         f"{num_classes}")
    if isinstance(target, str):
        if target != "least_likely":
            raise ValueError(f"target: expected an int array of target classes or "
                             f"'least_likely', got {target!r}")
        return None
    shape = getattr(target, "shape", None)
    dtype = getattr(target, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"target: expected an int array of target classes, shape "
                         f"({x.shape[0]},), or 'least_likely', got {type(target).__name__} "
                         f"{dtype}")
    if tuple(shape) != (x.shape[0],):
        raise ValueError(f"target: expected shape ({x.shape[0]},) (one target class per image), "
                         f"got {tuple(shape)}")
    if not isinstance(target, jax.core.Tracer) and np.asarray(target).size:
        t = np.asarray(target)
        if t.min() < 0 or t.max() >= num_classes:
            raise ValueError(f"target: expected classes in [0, {num_classes}) for a model with "
                             f"{num_classes} classes, got min {int(t.min())}, max "
                             f"{int(t.max())}")
        if not isinstance(y, jax.core.Tracer):
            same = np.flatnonzero(t == np.asarray(y))
            if same.size:
                raise ValueError(f"target: equals the label y for examples {same[:8].tolist()}; "
                                 f"a targeted attack needs a class other than the true one")
    return jnp.asarray(target, jnp.int32)


def least_likely_target(logits_BK: Array, y_B: Array) -> Array:
    """(B,) the class other than ``y`` with the lowest logit."""
    onehot_BK = jax.nn.one_hot(y_B, logits_BK.shape[1], dtype=bool)
    return jnp.argmin(jnp.where(onehot_BK, jnp.inf, logits_BK), axis=1).astype(jnp.int32)


def targets_or_least_likely(model, x: Images, y: Array, key: Key, target) -> Array:
    """Inside a jitted attack: ``target``, or when it is None the least likely class other than
    ``y`` under ``model(x, fold_in(key, LEAST_LIKELY))``."""
    if target is not None:
        return target
    return least_likely_target(model(x, jr.fold_in(key, tags.LEAST_LIKELY)), y)


def score_targeted(model, res: AttackResult, target: Array, key: Key) -> AttackResult:
    """``res`` with ``success = argmax model(x_adv, fold_in(key, TARGET_HIT)) == target``."""
    pred_B = jnp.argmax(model(res.x_adv, jr.fold_in(key, tags.TARGET_HIT)), axis=1)
    return res._replace(success=pred_B == target)


def check_eot(samples, chunk, samples_name: str = "samples",
              chunk_name: str = "chunk") -> tuple[int, int]:
    samples = check_positive_int(samples, samples_name)
    if chunk is None:
        return samples, samples
    chunk = check_positive_int(chunk, chunk_name)
    if samples % chunk:
        raise ValueError(f"{chunk_name}={chunk} does not divide {samples_name}={samples}; "
                         f"pick a chunk size that divides the number of EoT samples")
    return samples, chunk


def eot_mean(fn, key: Key, samples: int, chunk: int):
    """``mean_j fn(fold_in(key, j))`` over ``j = 0 .. samples - 1``, for any pytree output.

    The EoT average of quantities other than a loss and its gradient (C&W's objective gradient
    and logits, DeepFool's logits and Jacobian rows). As :func:`eot_value_and_grad`: the samples
    are a ``vmap`` over ``chunk`` keys at a time inside a ``lax.scan`` accumulating the sums, so
    the result does not depend on ``chunk`` up to float summation order. ``chunk`` must divide
    ``samples`` (checked by :func:`check_eot`).
    """

    def body(acc, idx_C):
        out = jax.vmap(lambda i: fn(jr.fold_in(key, i)))(idx_C)
        return jax.tree.map(lambda a, o: a + jnp.sum(o, axis=0), acc, out), None

    shapes = jax.eval_shape(fn, key)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    idx_NC = jnp.arange(samples, dtype=jnp.uint32).reshape(samples // chunk, chunk)
    total, _ = jax.lax.scan(body, init, idx_NC)
    return jax.tree.map(lambda t: t / samples, total)


def eot_logits(logits_fn, x, key, *, eot_samples, eot_chunk):
    """``logits_fn(x, key)`` (one sample) or its mean over ``fold_in(key, j)``, ``j < S``."""
    if eot_samples == 1:
        return logits_fn(x, key)
    return eot_mean(lambda k: logits_fn(x, k), key, eot_samples, eot_chunk)


# --------------------------------------------------------------------------------------------
# Geometry of the threat model.


def expand(v_B: Array) -> Array:
    """(B,) -> (B, 1, 1, 1), to broadcast against NHWC images."""
    return v_B[:, None, None, None]


def per_example_norm(d_BHWC: Array, norm: str) -> Array:
    """(B,) Linf / L2 / L1 norm of each example."""
    if norm == "linf":
        return jnp.max(jnp.abs(d_BHWC), axis=(1, 2, 3))
    if norm == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(d_BHWC), axis=(1, 2, 3)))
    if norm == "l1":
        return jnp.sum(jnp.abs(d_BHWC), axis=(1, 2, 3))
    raise ValueError(f"norm: expected one of ['l1', 'l2', 'linf'], got {norm!r}")


def steepest_direction(g_BHWC: Array, norm: str) -> Array:
    """Unit-norm steepest-ascent direction: ``sign(g)`` (Linf) or ``g / ||g||_2`` (L2)."""
    if norm == "linf":
        return jnp.sign(g_BHWC)
    return g_BHWC / expand(per_example_norm(g_BHWC, "l2") + _TINY)


def _project_l1_one(v_D: Array, x_D: Array, eps: Array) -> Array:
    """One flattened example: the ``d`` closest to ``v`` with ``||d||_1 <= eps`` and
    ``0 <= x + d <= 1`` (see :func:`project_l1`)."""
    n = v_D.shape[0]
    a_D = jnp.abs(v_D)
    b_D = jnp.where(v_D > 0, 1.0 - x_D, x_D)  # room towards v's side inside the box
    s_D = a_D - b_D  # term i stays at its cap b_i while lam <= s_i
    # f(lam) = sum_i clip(a_i - lam, 0, b_i) = P(lam) - Q(lam), P(q) = sum_i max(a_i - q, 0),
    # Q(q) = sum_i max(s_i - q, 0): piecewise linear and non-increasing, kinks at the a_i, s_i.
    a_sorted, s_sorted = jnp.sort(a_D), jnp.sort(s_D)
    pre_a = jnp.concatenate([jnp.zeros((1,), a_D.dtype), jnp.cumsum(a_sorted)])
    pre_s = jnp.concatenate([jnp.zeros((1,), s_D.dtype), jnp.cumsum(s_sorted)])
    q_Q = jnp.maximum(jnp.concatenate([a_D, s_D, jnp.zeros((1,), a_D.dtype)]), 0.0)
    ia_Q = jnp.searchsorted(a_sorted, q_Q, side="right")
    is_Q = jnp.searchsorted(s_sorted, q_Q, side="right")
    na_Q, ns_Q = n - ia_Q, n - is_Q  # how many a_i (s_i) lie above q
    f_Q = (pre_a[n] - pre_a[ia_Q] - q_Q * na_Q) - (pre_s[n] - pre_s[is_Q] - q_Q * ns_Q)
    # The root of f(lam) = eps lies after the largest kink with f >= eps, where f has slope
    # -(number of i with s_i <= lam < a_i).
    j = jnp.argmax(jnp.where(f_Q >= eps, q_Q, -1.0))
    lam = q_Q[j] + (f_Q[j] - eps) / jnp.maximum(na_Q[j] - ns_Q[j], 1).astype(a_D.dtype)
    # One Newton step on f evaluated directly: the prefix sums' rounding grows with d.
    r_D = a_D - lam
    free = (r_D > 0.0) & (r_D < b_D)
    lam = lam + (jnp.sum(jnp.clip(r_D, 0.0, b_D)) - eps) / jnp.maximum(jnp.sum(free), 1)
    f0 = jnp.sum(jnp.minimum(a_D, b_D))  # f(0): the box alone
    lam = jnp.where(f0 <= eps, 0.0, jnp.maximum(lam, 0.0))
    return jnp.sign(v_D) * jnp.clip(a_D - lam, 0.0, b_D)


def project_l1(x_adv: Images, x: Images, eps: float | Array) -> Images:
    """Euclidean projection of ``x_adv`` onto ``{z : ||z - x||_1 <= eps, 0 <= z <= 1}``.

    With ``v = x_adv - x`` the projection is ``x + d``, ``d_i = sign(v_i) min(max(|v_i| -
    lam, 0), b_i)``, ``b_i`` the room to the box on ``v_i``'s side (``1 - x_i`` or ``x_i``)
    and ``lam >= 0`` the smallest value with ``||d||_1 <= eps`` (the KKT conditions: the box
    and the L1 ball decouple coordinate-wise given the multiplier ``lam``). ``||d||_1`` is
    piecewise linear in ``lam`` with kinks at ``|v_i|`` and ``|v_i| - b_i``; it is evaluated
    at all kinks from sorted prefix sums and ``lam`` is found exactly on the right piece:
    ``O(d log d)`` per example. This is the projection AutoAttack's APGD-L1 uses
    (``L1_projection`` of ``autopgd_base.py``, Croce & Hein 2021); written here independently.

    Args:
      x_adv: (B, H, W, C) the points to project (anywhere).
      x: (B, H, W, C) the centres, in [0, 1].
      eps: the L1 radius (>= 0), a scalar.

    Returns:
      (B, H, W, C) the projected points (in the ball up to float rounding, in [0, 1]).
    """
    batch = x.shape[0]
    d_BD = jax.vmap(_project_l1_one, in_axes=(0, 0, None))(
        (x_adv - x).reshape(batch, -1), x.reshape(batch, -1), jnp.asarray(eps, x.dtype))
    return jnp.clip(x + d_BD.reshape(x.shape), 0.0, 1.0)


def project(x_adv: Images, x: Images, eps: float | Array, norm: str) -> Images:
    """Project onto the eps-ball around ``x``, then clip to [0, 1].

    Clipping after the ball projection keeps the point in the ball: ``x`` is in [0, 1], so the
    clip moves every coordinate towards ``x`` and cannot lengthen ``x_adv - x`` in any norm.
    L1: the exact projection onto the intersection of the ball and the box
    (:func:`project_l1`; clipping after a plain L1-ball projection would not be the closest
    point).
    """
    if norm == "l1":
        return project_l1(x_adv, x, eps)
    d = x_adv - x
    if norm == "linf":
        d = jnp.clip(d, -eps, eps)
    else:
        n_B = per_example_norm(d, "l2")
        d = d * expand(jnp.minimum(1.0, eps / (n_B + _TINY)))
    return jnp.clip(x + d, 0.0, 1.0)


def uniform_in_ball(key: Key, x: Images, eps: Array, norm: str) -> Images:
    """``x`` plus a point uniform in the Linf / L2 eps-ball, clipped to [0, 1]."""
    if norm == "linf":
        d = jr.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:
        k_dir, k_rad = jr.split(key)
        dim = x.shape[1] * x.shape[2] * x.shape[3]
        u = jr.normal(k_dir, x.shape, x.dtype)
        r_B = eps * jr.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / dim)
        d = u / expand(per_example_norm(u, "l2") + _TINY) * expand(r_B)
    return project(x + d, x, eps, norm)


def best_over_restarts(run, x: Images, key: Key, num_restarts: int,
                       return_iterates: bool) -> AttackResult:
    """Run ``run(key_r) -> AttackResult`` for ``key_r = fold_in(key, r)``; keep the best loss."""

    def body(carry, r):
        x_best, l_best = carry
        res = run(jr.fold_in(key, r))
        better_B = res.loss > l_best
        x_best = jnp.where(expand(better_B), res.x_adv, x_best)
        return (x_best, jnp.where(better_B, res.loss, l_best)), res.iterates

    if num_restarts == 1:
        return run(jr.fold_in(key, 0))
    init = (x, jnp.full((x.shape[0],), -jnp.inf, jnp.float32))
    (x_best, l_best), its = jax.lax.scan(body, init, jnp.arange(num_restarts))
    if return_iterates:
        its = its.reshape((-1,) + its.shape[2:])
    return AttackResult(x_best, l_best, its)


def as_per_example(loss_B: Array, x: Images, name: str = "loss_fn") -> PerExample:
    """Check (statically) that a loss is per-example, shape (B,)."""
    if loss_B.shape != (x.shape[0],):
        raise ValueError(f"{name}: expected a per-example loss of shape ({x.shape[0]},), got "
                         f"{loss_B.shape} (for a logits_fn(x, key), pass loss='ce'/'cw'/'dlr')")
    return loss_B
