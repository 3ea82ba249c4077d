"""Attack detection from a per-example score: ROC curve, AUC, detection rate at a fixed FPR.

A detector flags an input as attacked when its score is high (e.g. DiffDefense's reconstruction
error, :class:`jaxrob.purify.Reconstruction`). Given the scores of clean and of attacked
examples, :func:`roc_curve` and :func:`roc_auc` measure how well the score separates them
independently of a threshold; :func:`detection_rate` fixes the threshold on the clean scores
alone (a false-positive budget, as a deployed detector must) and reports the fraction of attacked
examples caught. Host-side numpy: the scores are small per-example arrays; scikit-learn is not
needed (its ``roc_auc_score`` agrees).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _scores(scores, name: str) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-example scores, got "
                         f"shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite scores, got {int((~np.isfinite(a)).sum())} "
                         f"non-finite")
    return a


def roc_curve(clean_scores, attacked_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the detector "attacked if score >= threshold".

    Args:
      clean_scores: (N,) scores of clean examples (negatives).
      attacked_scores: (M,) scores of attacked examples (positives).

    Returns:
      ``(fpr, tpr, thresholds)``: for every distinct score in decreasing order (preceded by
      ``+inf``, where nothing is flagged) the fraction of clean and of attacked examples with a
      score ``>=`` it. ``fpr`` and ``tpr`` rise from 0 to 1.
    """
    neg = _scores(clean_scores, "clean_scores")
    pos = _scores(attacked_scores, "attacked_scores")
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([neg, pos]))[::-1]])
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # number of scores >= t = size - number of scores < t
    fpr = (neg.size - np.searchsorted(neg_sorted, thresholds, side="left")) / neg.size
    tpr = (pos.size - np.searchsorted(pos_sorted, thresholds, side="left")) / pos.size
    return fpr, tpr, thresholds


def roc_auc(clean_scores, attacked_scores) -> float:
    """Area under the ROC curve: ``P(s_attacked > s_clean) + P(s_attacked = s_clean) / 2``.

    The trapezoidal area under :func:`roc_curve` (ties count one half, the Mann-Whitney
    statistic). 1 for a perfect detector, 0.5 for a score independent of the attack.

    Args:
      clean_scores: (N,) scores of clean examples.
      attacked_scores: (M,) scores of attacked examples.
    """
    fpr, tpr, _ = roc_curve(clean_scores, attacked_scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


class Detection(NamedTuple):
    """:func:`detection_rate`'s answer.

    Attributes:
      rate: fraction of attacked examples flagged (score > threshold).
      threshold: the threshold fixed on the clean scores.
      fpr: the realised false-positive rate on the clean scores (<= the requested one; less when
        clean scores tie at the threshold).
    """

    rate: float
    threshold: float
    fpr: float


def detection_rate(clean_scores, attacked_scores, *, fpr: float) -> Detection:
    """Detection rate at a threshold fixed on clean data for a false-positive rate ``fpr``.

    The threshold is the ``k + 1``-th largest clean score with ``k = floor(fpr * N)``: at most
    ``k`` clean examples score above it. An input is flagged when its score is strictly above.

    Args:
      clean_scores: (N,) scores of clean examples (they alone fix the threshold).
      attacked_scores: (M,) scores of attacked examples.
      fpr: the false-positive budget, in (0, 1).

    Returns:
      A :class:`Detection` ``(rate, threshold, fpr)``.
    """
    try:
        budget = float(fpr)
    except (TypeError, ValueError):
        raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr!r}") from None
    if not 0.0 < budget < 1.0:
        raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr!r}")
    neg = _scores(clean_scores, "clean_scores")
    pos = _scores(attacked_scores, "attacked_scores")
    k = int(np.floor(budget * neg.size + 1e-9))  # 0.29 * 100 is 28.999...
    threshold = float(np.sort(neg)[::-1][k])
    return Detection(rate=float(np.mean(pos > threshold)), threshold=threshold,
                     fpr=float(np.mean(neg > threshold)))
