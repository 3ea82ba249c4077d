"""Detection-aware attacks on a reconstruction defence that also flags inputs by their score.

DiffDefense (:func:`jaxrob.purify.diffdefense`) both cleans an input (its reconstruction) and
scores it (the reconstruction error; high = attacked). An attack that only fools the classifier
behind the reconstruction may be caught by the score, so the adaptive attacker maximises

    L(x') = base(f(D(x')), y) - weight * e(x'),

the classifier's loss on the reconstruction minus a weighted reconstruction error, with any
attack that takes a ``logits_fn`` and a callable loss (:func:`jaxrob.attacks.pgd`,
:func:`jaxrob.attacks.fgsm`, :func:`jaxrob.attacks.apgd`, EoT included). The two pieces:

* :class:`DetectionAwareModel` ``(x, key) -> (B, K + 1)``: the K logits of the classifier on the
  reconstruction, then the score ``e(x)`` of that same reconstruction as a last column (one
  reconstruction per call, so the EoT sample that moves the prediction is the one scored);
* :func:`detection_aware_loss` ``(weight, base=...)``: the loss above on those K + 1 columns.

With ``weight = 0`` the attack is the plain adaptive attack on the defended classifier; a
negative weight pushes the score up (a sanity check that the score responds to the attack).

Gradients follow the defence's ``gradient`` option: ``"exact"`` differentiates the kept
restart's reconstruction and its error through the unrolled optimisation; ``"bpda"`` takes the
identity for the reconstruction in the classifier's term (as the defence itself does) and, in
the error term, holds the reconstruction constant: ``d e / d x' = 2 (x' - D(x')) / d``, which
pulls the input towards what the model reproduces (the identity there would give ``e == 0`` and
no gradient at all).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrob._checks import check_choice
from jaxrob._keys import CLASSIFIER, fold
from jaxrob._pytree import pytree_dataclass
from jaxrob._types import AnyKey, Array, Images, Labels, PerExample
from jaxrob.attacks._losses import LOSSES, ce_loss, cw_loss, dlr_loss


@pytree_dataclass
class DetectionAwareModel:
    """A classifier behind a scoring reconstruction defence, the score as a last column.

    ``model(x, key) -> (B, K + 1)``: ``classifier(D(x), fold(key, CLASSIFIER))`` (the K logits a
    :class:`jaxrob.purify.DefendedModel` gives) and the reconstruction error of ``D(x)`` (the
    detection score). Attack it with :func:`detection_aware_loss`; a named loss (``"ce"``) would
    take the score for a class. A pytree: both models' parameters are leaves.

    Attributes:
      classifier: ``classifier(x, key) -> logits``.
      defence: a reconstruction defence with ``defence.reconstruct(x, key)`` returning ``.x``
        and ``.error`` and a ``gradient`` option (``"exact"`` or ``"bpda"``), e.g. a
        :class:`jaxrob.purify.DiffDefense`.
    """

    classifier: Callable
    defence: Any

    def reconstruct(self, x: Images, key: AnyKey) -> tuple[Images, PerExample]:
        """``(D(x), e(x))`` with the gradients of the module docstring."""
        if getattr(self.defence, "gradient", "exact") == "bpda":
            rec = self.defence.reconstruct(jax.lax.stop_gradient(x), key)
            out = jax.lax.stop_gradient(rec.x)
            err = jnp.mean(jnp.square(out - x), axis=(1, 2, 3))  # value == rec.error
            return x + jax.lax.stop_gradient(out - x), err
        rec = self.defence.reconstruct(x, key)
        return rec.x, rec.error

    def __call__(self, x: Images, key: AnyKey) -> Array:
        x_rec, err = self.reconstruct(x, key)
        logits = self.classifier(x_rec, fold(key, CLASSIFIER))
        return jnp.concatenate([logits, err[:, None].astype(logits.dtype)], axis=1)

    def manifest(self) -> dict:
        """What an evaluation records about the attacked model."""
        man = getattr(self.defence, "manifest", None)
        return {"purifier": man() if man else repr(self.defence), "score_column": True,
                "classifier": type(getattr(self.classifier, "module", self.classifier)).__name__}


@dataclasses.dataclass(frozen=True)
class DetectionAwareLoss:
    """``loss(scored, y) = base(scored[:, :K], y) - weight * scored[:, K]`` (maximised).

    Build it with :func:`detection_aware_loss`. Frozen and hashable by value, so two attacks
    with the same loss share a compilation.

    Attributes:
      weight: the weight of the reconstruction error (the detection score).
      base: ``"ce"``, ``"cw"`` or ``"dlr"``, the classifier's loss on the K logits.
      kappa: cap of the ``"cw"`` margin (None: uncapped). A capped margin stops rewarding
        misclassification beyond ``kappa``, so the attack then only lowers the score.
    """

    weight: float
    base: str = "ce"
    kappa: float | None = None

    def __call__(self, scored: Array, y: Labels) -> PerExample:
        if scored.ndim != 2 or scored.shape[1] < 3:
            raise ValueError(f"detection_aware_loss: expected (batch, classes + 1) outputs of a "
                             f"DetectionAwareModel, got shape {scored.shape}")
        logits, score = scored[:, :-1], scored[:, -1]
        if self.base == "cw":
            cls_loss = cw_loss(logits, y, kappa=self.kappa)
        else:
            cls_loss = {"ce": ce_loss, "dlr": dlr_loss}[self.base](logits, y)
        return cls_loss - self.weight * score


def detection_aware_loss(weight: float, *, base: str = "ce",
                         kappa: float | None = None) -> DetectionAwareLoss:
    """The detection-aware attack loss ``base(logits, y) - weight * reconstruction_error``.

    Pass it as ``loss=`` to an attack of a :class:`DetectionAwareModel`, e.g.
    ``pgd(DetectionAwareModel(classifier, defence), x, y, key, eps=0.3,
    loss=detection_aware_loss(100.0, base="cw", kappa=2.0), eot_samples=4)``.

    Args:
      weight: weight of the reconstruction error (a mean squared error over pixels, ~1e-3 to
        1e-1 on MNIST; the classifier's loss is O(1)): 0 is the plain adaptive attack, > 0
        evades the detector, < 0 helps it.
      base: the classifier's loss, ``"ce"``, ``"cw"`` or ``"dlr"``.
      kappa: cap of the ``"cw"`` margin; only with ``base="cw"``.

    Returns:
      A :class:`DetectionAwareLoss` (``loss(scored, y) -> (B,)``).
    """
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"weight: expected a finite number, got {weight!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"weight: expected a finite number, got {weight!r}")
    check_choice(base, LOSSES, "base")
    if kappa is not None:
        if base != "cw":
            raise ValueError(f"kappa: only base='cw' takes a confidence cap, got base={base!r}")
        kappa = float(kappa)
    return DetectionAwareLoss(w, base, kappa)
