"""Per-example attack losses on logits, all *maximised* by the attacker.

Each loss maps logits (B, K) and int labels (B,) to a (B,) array. :func:`loss_from_logits` turns a
classifier ``logits_fn(x, key) -> logits`` into the ``loss_fn(x, y, key) -> (B,)`` that every
attack in :mod:`jaxrob.attacks` takes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrob._checks import check_choice
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Array, Images, Labels, Logits, LogitsFn, PerExample

LossFn = Callable[[Array, Array, Array], Array]
"""``loss_fn(x, y, key) -> per-example loss (B,)``, maximised by the attacker."""


def _check_logits(logits, y, name: str, min_classes: int = 2) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name}: expected logits of shape (batch, classes), got {logits.shape}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{name}: needs at least {min_classes} classes, got logits of shape "
                         f"{logits.shape}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"{name}: expected labels of shape ({logits.shape[0]},) to match the "
                         f"logits {logits.shape}, got {y.shape}")


def _pick(logits_BK: Array, i_B: Array) -> Array:
    """``logits_BK[b, i_B[b]]`` (B,), differentiated as a gather (all of it to that entry)."""
    return jnp.take_along_axis(logits_BK, i_B[:, None].astype(jnp.int32), axis=1)[:, 0]


def _true_and_max_other(logits_BK: Array, y_B: Array) -> tuple[Array, Array]:
    """``(z_y, max_{j != y} z_j)``, each (B,).

    The maximum is read at its ``argmax`` (the lowest such index on a tie, which receives the
    whole derivative), not taken with ``jnp.max``: its derivative marks the entries *equal* to
    the maximum, which XLA can evaluate twice with different rounding when it fuses the logits'
    computation into both (a model's random per-class offset under ``jit(vmap(grad))`` over
    keys, as in :func:`jaxrob.attacks.eot_grad`). It then marks none: a NaN/inf gradient or a
    vanished margin term (docs/known_faults.md). The values are unchanged.
    """
    onehot_BK = jax.nn.one_hot(y_B, logits_BK.shape[1], dtype=bool)
    j_B = jnp.argmax(jnp.where(onehot_BK, -jnp.inf, logits_BK), axis=1)
    return _pick(logits_BK, y_B), _pick(logits_BK, j_B)


def ce_loss(logits: Logits, y: Labels) -> PerExample:
    """Cross-entropy ``logsumexp(z) - z_y`` per example.

    Args:
      logits: (B, K) logits.
      y: (B,) int true labels.

    Returns:
      (B,) cross-entropy of the true class.
    """
    _check_logits(logits, y, "ce_loss")
    logp_BK = jax.nn.log_softmax(logits, axis=1)
    return -jnp.take_along_axis(logp_BK, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def cw_loss(logits: Logits, y: Labels, *, kappa: float | None = None) -> PerExample:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y``, optionally capped at ``kappa``.

    Positive exactly when the example is misclassified. With ``kappa`` the loss is
    ``min(max_{j != y} z_j - z_y, kappa)``: the negative of C&W's ``f_6`` with confidence
    ``kappa``, which stops rewarding the attacker once the margin exceeds ``kappa``.

    Ties: the derivative of ``max_{j != y} z_j`` is that of the logit ``argmax`` selects (the
    lowest index among tied classes), not an average over the tied ones.

    Args:
      logits: (B, K) logits.
      y: (B,) int true labels.
      kappa: confidence cap, or None for the plain (uncapped) margin.

    Returns:
      (B,) margin loss.

    References:
      Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.
    """
    _check_logits(logits, y, "cw_loss")
    z_true_B, z_other_B = _true_and_max_other(logits, y)
    margin_B = z_other_B - z_true_B
    return margin_B if kappa is None else jnp.minimum(margin_B, kappa)


def dlr_loss(logits: Logits, y: Labels) -> PerExample:
    """Difference of Logits Ratio, ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``z_pi1 >= z_pi2 >= z_pi3`` are the sorted logits. The loss is invariant to shifting and
    (positive) rescaling of the logits, and positive exactly when the example is misclassified.
    Each selected logit is differentiated as the one entry that selects it (``argmax`` /
    ``jax.lax.top_k`` indices; the lower index among tied classes), never by comparing values.

    Args:
      logits: (B, K) logits with K >= 3.
      y: (B,) int true labels.

    Returns:
      (B,) DLR loss.

    References:
      Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020, Eq. (6).
    """
    _check_logits(logits, y, "dlr_loss", min_classes=3)
    z_true_B, z_other_B = _true_and_max_other(logits, y)
    # top_k's derivative gathers at the indices it returns (no equality test, unlike
    # jnp.max's), so it is safe under EoT's jit(vmap(grad)) (see _true_and_max_other)
    top3_B3 = jax.lax.top_k(logits, 3)[0]
    return -(z_true_B - z_other_B) / (top3_B3[:, 0] - top3_B3[:, 2] + 1e-12)


LOSSES: dict[str, Callable[..., Array]] = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}


# --------------------------------------------------------------------------------------------
# Targeted losses: maximised by the attacker, who wants the prediction to become ``target``.


def _check_target(logits, target, name: str) -> None:
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{name}: expected targets of shape ({logits.shape[0]},) to match the "
                         f"logits {logits.shape}, got {target.shape}")


def ce_loss_targeted(logits: Logits, y: Labels, target: Labels) -> PerExample:
    """Negative cross-entropy of the target class, ``z_t - logsumexp(z)`` (AutoAttack's
    ``ce_loss_targeted``); ``y`` is unused.

    Args:
      logits: (B, K) logits.
      y: (B,) int true labels (unused; the signature of every targeted loss).
      target: (B,) int target classes.

    Returns:
      (B,) ``log p_t``, maximised by moving the prediction towards ``target``.
    """
    _check_logits(logits, y, "ce_loss_targeted")
    _check_target(logits, target, "ce_loss_targeted")
    return -ce_loss(logits, target)


def cw_loss_targeted(logits: Logits, y: Labels, target: Labels) -> PerExample:
    """Targeted C&W margin ``z_t - max_{j != t} z_j``, positive exactly when ``t`` is predicted;
    ``y`` is unused.

    Args:
      logits: (B, K) logits.
      y: (B,) int true labels (unused).
      target: (B,) int target classes.

    Returns:
      (B,) targeted margin.
    """
    _check_logits(logits, y, "cw_loss_targeted")
    _check_target(logits, target, "cw_loss_targeted")
    return -cw_loss(logits, target)


def dlr_loss_targeted(logits: Logits, y: Labels, target: Labels) -> PerExample:
    """Targeted DLR, ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (APGD-T's loss).

    ``z_pi1 >= ... >= z_pi4`` are the sorted logits. Invariant to shifting and positively
    rescaling the logits; positive exactly when ``z_t > z_y``. The sorted logits are
    differentiated at the indices ``jax.lax.top_k`` returns (the lower index among ties).

    Args:
      logits: (B, K) logits with K >= 4.
      y: (B,) int true labels.
      target: (B,) int target classes.

    Returns:
      (B,) targeted DLR loss.

    References:
      Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020, Eq. (7); AutoAttack ``autopgd_base.py``,
      ``APGDTargetedAttack.dlr_loss_targeted``.
    """
    _check_logits(logits, y, "dlr_loss_targeted", min_classes=4)
    _check_target(logits, target, "dlr_loss_targeted")
    z_true_B, z_target_B = _pick(logits, y), _pick(logits, target)
    top4_B4 = jax.lax.top_k(logits, 4)[0]
    scale_B = top4_B4[:, 0] - 0.5 * (top4_B4[:, 2] + top4_B4[:, 3]) + 1e-12
    return -(z_true_B - z_target_B) / scale_B


TARGETED_LOSSES: dict[str, Callable[..., Array]] = {
    "ce": ce_loss_targeted, "cw": cw_loss_targeted, "dlr": dlr_loss_targeted}


class InputLoss:
    """Base of losses an attack takes as they are: ``loss(x, y, key) -> (B,)`` on the *inputs*
    (e.g. :class:`jaxrob.attacks.DiffAttackLoss`, which needs the purifier's intermediate
    states, not only the logits). Passed as an attack's ``loss=``, it is used instead of a loss
    on the model's logits; it carries its model in ``.model``, which must be the attack's."""

    def check(self, x: Images, y: Labels) -> None:
        """Raise ``ValueError`` if the loss cannot score this batch (before any work)."""


@pytree_dataclass
class LogitsLoss:
    """``loss_fn(x, y, key)`` built from a model ``logits_fn(x, key)`` and a loss.

    A pytree: the model's parameters are leaves (traced by the jitted attacks), the loss name
    (or callable) and ``kappa`` are static, so attacking new parameters of the same shapes
    reuses the compilation.
    """

    logits_fn: LogitsFn
    name: str | Callable = static_field(default="ce")
    kappa: float | None = static_field(default=None)

    def __call__(self, x: Images, y: Labels, key: AnyKey | None) -> PerExample:
        logits = self.logits_fn(x, key)
        if callable(self.name):
            return self.name(logits, y)
        if self.name == "cw":
            return cw_loss(logits, y, kappa=self.kappa)
        return LOSSES[self.name](logits, y)


def loss_from_logits(logits_fn: LogitsFn, name: str | Callable = "ce", *,
                     kappa: float | None = None) -> LossFn:
    """Build ``loss_fn(x, y, key) -> (B,)`` from a model and a loss.

    Args:
      logits_fn: ``logits_fn(x, key) -> (B, K)`` logits (deterministic models ignore ``key``).
      name: ``"ce"`` (:func:`ce_loss`), ``"cw"`` (:func:`cw_loss`), ``"dlr"``
        (:func:`dlr_loss`), or a callable ``loss(logits, y) -> (B,)`` maximised by the attacker
        (static: pass the same function object to reuse compilations).
      kappa: confidence cap of the ``"cw"`` loss (None: uncapped); only valid with ``"cw"``.

    Returns:
      A :class:`LogitsLoss`.
    """
    if not callable(name):
        check_choice(name, LOSSES, "loss")
    if not callable(logits_fn):
        raise TypeError(f"logits_fn: expected a callable logits_fn(x, key), got "
                        f"{type(logits_fn).__name__}")
    if kappa is not None and name != "cw":
        raise ValueError(f"kappa: only the 'cw' loss takes a confidence cap, got kappa={kappa} "
                         f"with loss {name!r}")
    return LogitsLoss(logits_fn, name, None if kappa is None else float(kappa))


@pytree_dataclass
class TargetedLogitsLoss:
    """``loss_fn(x, y, key)`` of a targeted attack: a :data:`TARGETED_LOSSES` entry towards
    ``target``.

    A pytree: the model's parameters and the (B,) targets are leaves (traced), the loss name is
    static, so new targets or parameters of the same shapes reuse the compilation.
    """

    logits_fn: LogitsFn
    target: Array
    name: str = static_field(default="ce")

    def __call__(self, x: Images, y: Labels, key: AnyKey | None) -> PerExample:
        return TARGETED_LOSSES[self.name](self.logits_fn(x, key), y, self.target)
