"""Curve fits with confidence intervals: sigmoid, psychometric threshold, fuzzy robustness.

* :func:`fit_sigmoid`: weighted least squares (Levenberg-Marquardt, numpy float64) of a 4- or
  2-parameter logistic, e.g. robust accuracy vs compression rate (Yuezhang & Wei 2025, Fig. 3b).
* :func:`psychometric_threshold`: binomial maximum-likelihood logistic fit of the class-flip
  probability vs step length along an adversarial direction (the critical threshold and the
  psychometric slope, ``k = 5.91 +- 1.07`` in the paper's rebuttal).
* :func:`fuzzy_robustness`: the cumulative fuzzy robustness curve of per-example attack-success
  probabilities under a randomised defence.

Fits run on the host in float64 (tiny problems; jit would only add compile time).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrob._types import Array


def _quantile(level: float, dof: float | None) -> float:
    """Two-sided ``level`` quantile of Student's t with ``dof`` (normal when dof is None)."""
    q = 0.5 + level / 2.0
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        stats = None
    if stats is None:
        from statistics import NormalDist
        return NormalDist().inv_cdf(q)
    return float(stats.norm.ppf(q) if dof is None else stats.t.ppf(q, dof))


def _check_level(level) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")
    return float(level)


def _as_1d(a, name: str) -> np.ndarray:
    arr = np.asarray(a, np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values")
    return arr


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


class SigmoidFit(NamedTuple):
    r"""What :func:`fit_sigmoid` returns.

    Attributes:
      names: parameter names, ``("bottom", "top", "k", "x0")`` or ``("k", "x0")``.
      params: (p,) estimates.
      stderr: (p,) standard errors, ``sqrt(diag(cov))``.
      ci: (p, 2) confidence intervals ``params +- t_{dof} * stderr``.
      cov: (p, p) covariance of the estimates.
      asymptotes: ``(bottom, top)``: fitted, or the fixed values of the 2-parameter model.
      rss: weighted residual sum of squares.
      dof: ``n - p``.
      converged: whether Levenberg-Marquardt met its tolerance.
    """

    names: tuple[str, ...]
    params: np.ndarray
    stderr: np.ndarray
    ci: np.ndarray
    cov: np.ndarray
    asymptotes: tuple[float, float]
    rss: float
    dof: int
    converged: bool

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.params), strict=True))

    def predict(self, x) -> np.ndarray:
        """The fitted curve at ``x``."""
        p = self.as_dict()
        b, t = self.asymptotes
        return b + (t - b) * _sigmoid(p["k"] * (np.asarray(x, np.float64) - p["x0"]))


def _model_and_jac(theta, x, fixed):
    if fixed is None:
        b, t, k, x0 = theta
    else:
        (b, t), (k, x0) = fixed, theta
    s = _sigmoid(k * (x - x0))
    ds = s * (1.0 - s)
    model = b + (t - b) * s
    d_k = (t - b) * ds * (x - x0)
    d_x0 = -(t - b) * ds * k
    if fixed is None:
        jac = np.stack([1.0 - s, s, d_k, d_x0], axis=1)
    else:
        jac = np.stack([d_k, d_x0], axis=1)
    return model, jac


def _initial_guess(x, y, fixed):
    b, t = (float(np.min(y)), float(np.max(y))) if fixed is None else fixed
    sign = 1.0 if np.dot(x - x.mean(), y - y.mean()) * (t - b) >= 0 else -1.0
    span = max(float(np.ptp(x)), 1e-12)
    mid = 0.5 * (b + t)
    x0 = float(x[np.argmin(np.abs(y - mid))])
    k = sign * 8.0 / span
    frac = (y - b) / (t - b) if t != b else np.full_like(y, 0.5)
    inside = (frac > 0.05) & (frac < 0.95)
    if inside.sum() >= 2 and np.ptp(x[inside]) > 0:
        z = np.log(frac[inside] / (1.0 - frac[inside]))  # logit = k x - k x0
        slope, icpt = np.polyfit(x[inside], z, 1)
        if slope != 0 and np.isfinite(slope):
            k, x0 = float(slope), float(-icpt / slope)
    return np.array([b, t, k, x0] if fixed is None else [k, x0])


def _levenberg_marquardt(fun, theta, *, max_iter, xtol, ftol):
    r, jac = fun(theta)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        a = jac.T @ jac
        g = jac.T @ r
        diag = np.maximum(np.diag(a), 1e-12)
        while True:
            try:
                step = np.linalg.solve(a + lam * np.diag(diag), -g)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                r_new, jac_new = fun(theta + step)
                cost_new = float(r_new @ r_new)
                if np.isfinite(cost_new) and cost_new <= cost:
                    break
            lam *= 10.0
            if lam > 1e16:
                return theta, r, jac, cost, bool(np.max(np.abs(g)) <= 1e-10)
        theta = theta + step
        small_step = np.linalg.norm(step) <= xtol * (np.linalg.norm(theta) + xtol)
        small_gain = cost - cost_new <= ftol * cost
        r, jac, cost = r_new, jac_new, cost_new
        lam = max(lam / 10.0, 1e-15)
        if small_step or small_gain or cost == 0.0:
            return theta, r, jac, cost, True
    return theta, r, jac, cost, False


def fit_sigmoid(x, y, *, weights=None, asymptotes: tuple[float, float] | None = None,
                p0=None, absolute_weights: bool = False, level: float = 0.95,
                max_iter: int = 200, xtol: float = 1e-10, ftol: float = 1e-15) -> SigmoidFit:
    r"""Weighted least-squares fit of a logistic curve with standard errors and CIs.

    .. math::
        y \approx \mathrm{bottom} + \frac{\mathrm{top} - \mathrm{bottom}}
                                         {1 + \exp(-k (x - x_0))},\qquad
        \min_\theta \sum_i w_i\,(y_i - \hat y_i(\theta))^2,

    by Levenberg-Marquardt with Marquardt's diagonal scaling, from a logit-regression start
    (``bottom = min y``, ``top = max y``; ``k < 0`` for a decreasing curve). The covariance is
    ``s^2 (J^T W J)^{-1}`` with ``s^2 = RSS / (n - p)`` (weights are relative, as
    ``scipy.optimize.curve_fit``'s default), or ``(J^T W J)^{-1}`` with
    ``absolute_weights=True`` (weights ``1 / sigma_i^2``). Intervals use Student's t with
    ``n - p`` degrees of freedom.

    Args:
      x: (n,) abscissae (e.g. compression rates).
      y: (n,) values (e.g. robust accuracies).
      weights: (n,) non-negative weights; None: all 1.
      asymptotes: ``(bottom, top)`` to fix them and fit only ``(k, x0)``, e.g. ``(0.0, 1.0)``
        for the 2-parameter logistic; None: fit all four.
      p0: initial parameters in ``names`` order; None: the automatic start.
      absolute_weights: weights are inverse variances (do not rescale by the residuals).
      level: confidence level of ``ci``.
      max_iter: Levenberg-Marquardt iterations.
      xtol: stop when the step is below ``xtol * ||theta||``.
      ftol: stop when the relative decrease of the RSS is below ``ftol``.

    Returns:
      A :class:`SigmoidFit`.

    References:
      Marquardt. An Algorithm for Least-Squares Estimation of Nonlinear Parameters. SIAM J.
      Appl. Math. 1963.
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
    """
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y: expected equal lengths, got {x.size} and {y.size}")
    level = _check_level(level)
    fixed = None if asymptotes is None else tuple(map(float, asymptotes))
    if fixed is not None and len(fixed) != 2:
        raise ValueError(f"asymptotes: expected (bottom, top), got {asymptotes!r}")
    names = ("bottom", "top", "k", "x0") if fixed is None else ("k", "x0")
    p = len(names)
    if x.size <= p:
        raise ValueError(f"x, y: expected more than {p} points to fit {p} parameters "
                         f"with error estimates, got {x.size}")
    w = np.ones_like(x) if weights is None else _as_1d(weights, "weights")
    if w.shape != x.shape or np.any(w < 0):
        raise ValueError(f"weights: expected {x.size} non-negative values, got shape {w.shape}")
    sw = np.sqrt(w)
    theta0 = _initial_guess(x, y, fixed) if p0 is None else _as_1d(p0, "p0")
    if theta0.size != p:
        raise ValueError(f"p0: expected {p} values {names}, got {theta0.size}")

    def fun(theta):
        model, jac = _model_and_jac(theta, x, fixed)
        return sw * (model - y), sw[:, None] * jac

    theta, _, jac, rss, converged = _levenberg_marquardt(
        fun, theta0.astype(np.float64), max_iter=int(max_iter), xtol=xtol, ftol=ftol)
    dof = int(x.size - p)
    cov = np.linalg.pinv(jac.T @ jac)
    if not absolute_weights:
        cov = cov * (rss / dof)
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    q = _quantile(level, dof)
    ci = np.stack([theta - q * se, theta + q * se], axis=1)
    asym = (float(theta[0]), float(theta[1])) if fixed is None else fixed
    return SigmoidFit(names, theta, se, ci, cov, asym, float(rss), dof, bool(converged))


class PsychometricFit(NamedTuple):
    r"""What :func:`psychometric_threshold` returns.

    Attributes:
      threshold: ``x_0``, the step length where the flip probability is 1/2.
      slope: ``k`` (per unit step length); ``+-inf`` when the outcomes are separated.
      threshold_ci: ``(lo, hi)``: delta-method interval; under separation the interval of
        step lengths where a step function fits the data.
      slope_ci: ``(lo, hi)`` (NaN under separation).
      stderr: ``(se_threshold, se_slope)``.
      separated: the flips are a perfect step in the step length (the MLE slope is infinite);
        also True (with NaN threshold) when every outcome is the same.
      converged: whether Newton's method met its tolerance.
    """

    threshold: float
    slope: float
    threshold_ci: tuple[float, float]
    slope_ci: tuple[float, float]
    stderr: tuple[float, float]
    separated: bool
    converged: bool


def psychometric_threshold(step, flipped, *, trials=None, level: float = 0.95,
                           max_iter: int = 100, tol: float = 1e-10) -> PsychometricFit:
    r"""Binomial maximum-likelihood psychometric fit of class-flip probability vs step length.

    .. math::
        P(\mathrm{flip} \mid s) = \frac{1}{1 + \exp(-k (s - x_0))},\qquad
        \max_{a, b} \sum_i y_i \log p_i + (n_i - y_i) \log(1 - p_i),\ \ \mathrm{logit}\,p_i
        = a + b s_i,

    by Newton's method (step halving) on standardised step lengths; then ``k = b``,
    ``x0 = -a / b``. Standard errors from the inverse Fisher information, with the delta
    method for ``x0`` (gradient ``(-1/b, a/b^2)``); intervals are normal (Wald). Data that a
    step function separates (every flip at a longer step than every non-flip, or the
    reverse) have no finite MLE: then ``slope = +-inf`` and ``threshold`` is the midpoint of
    the separating interval.

    Args:
      step: (n,) step lengths along the direction.
      flipped: (n,) outcomes: 0/1 per trial, or flip counts when ``trials`` is given.
      trials: (n,) trial counts per step length; None: one trial each.
      level: confidence level.
      max_iter: Newton iterations.
      tol: stop when the Newton step is below ``tol``.

    Returns:
      A :class:`PsychometricFit`.

    References:
      Wichmann, Hill. The psychometric function: I. Fitting, sampling, and goodness of fit.
      Perception & Psychophysics 2001.
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
    """
    s, y = _as_1d(step, "step"), _as_1d(flipped, "flipped")
    if s.shape != y.shape:
        raise ValueError(f"step and flipped: expected equal lengths, got {s.size} and {y.size}")
    n = np.ones_like(y) if trials is None else _as_1d(trials, "trials")
    if n.shape != y.shape or np.any(n <= 0):
        raise ValueError("trials: expected positive counts, one per step length")
    if np.any(y < 0) or np.any(y > n):
        raise ValueError("flipped: expected counts in [0, trials] (0/1 without trials)")
    if np.unique(s).size < 2:
        raise ValueError("step: expected at least two distinct step lengths")
    level = _check_level(level)
    nan2 = (math.nan, math.nan)
    has_succ, has_fail = y > 0, y < n
    if not has_succ.any() or not has_fail.any():
        return PsychometricFit(math.nan, math.nan, nan2, nan2, nan2, True, False)
    lo_s, hi_f = s[has_succ].min(), s[has_fail].max()
    hi_s, lo_f = s[has_succ].max(), s[has_fail].min()
    if lo_s >= hi_f or hi_s <= lo_f:  # (quasi-)complete separation
        inc = lo_s >= hi_f
        a_, b_ = (hi_f, lo_s) if inc else (hi_s, lo_f)
        return PsychometricFit(0.5 * (a_ + b_), math.inf if inc else -math.inf,
                               (float(a_), float(b_)), nan2, nan2, True, True)
    m, sd = s.mean(), s.std()
    z = (s - m) / sd
    X = np.stack([np.ones_like(z), z], axis=1)

    def loglik(beta):
        eta = X @ beta
        return float(np.sum(y * eta - n * np.logaddexp(0.0, eta)))

    beta = np.array([math.log((y.sum() + 0.5) / (n.sum() - y.sum() + 0.5)), 0.0])
    converged = False
    for _ in range(int(max_iter)):
        p = _sigmoid(X @ beta)
        grad = X.T @ (y - n * p)
        info = (X * (n * p * (1 - p))[:, None]).T @ X
        delta = np.linalg.solve(info, grad)
        ll, t = loglik(beta), 1.0
        while loglik(beta + t * delta) < ll - 1e-12 and t > 1e-8:
            t *= 0.5
        beta = beta + t * delta
        if np.max(np.abs(t * delta)) <= tol:
            converged = True
            break
    p = _sigmoid(X @ beta)
    cov_z = np.linalg.inv((X * (n * p * (1 - p))[:, None]).T @ X)
    T = np.array([[1.0, -m / sd], [0.0, 1.0 / sd]])  # (a, b) = T (a', b')
    a, b = T @ beta
    cov = T @ cov_z @ T.T
    x0 = -a / b
    gx = np.array([-1.0 / b, a / (b * b)])
    se_x0 = float(math.sqrt(max(gx @ cov @ gx, 0.0)))
    se_k = float(math.sqrt(max(cov[1, 1], 0.0)))
    q = _quantile(level, None)
    return PsychometricFit(float(x0), float(b), (x0 - q * se_x0, x0 + q * se_x0),
                           (b - q * se_k, b + q * se_k), (se_x0, se_k), False, converged)


class FuzzyRobustness(NamedTuple):
    """What :func:`fuzzy_robustness` returns.

    Attributes:
      p: (G,) success-probability grid in [0, 1].
      curve: (G,) fraction of examples with attack-success probability ``<= p``.
      area: exact area under the (step) curve on [0, 1], ``1 - mean(success_prob)``.
    """

    p: Array
    curve: Array
    area: Array


def fuzzy_robustness(success_prob: Array, *, grid: Array | None = None,
                     num_points: int = 101) -> FuzzyRobustness:
    r"""Cumulative fuzzy robustness: the CDF of per-example attack-success probabilities.

    Under a randomised defence an example is broken only with some probability ``q_b``
    (e.g. the fraction of defence keys for which the attack succeeds). The curve

    .. math::
        \mathrm{CFR}(p) = \frac1B \#\{b: q_b \le p\},\qquad
        \int_0^1 \mathrm{CFR}(p)\,dp = 1 - \frac1B\sum_b q_b,

    starts at the fraction never broken (``p = 0``: robust for every key, the "worst-of"
    accuracy) and reaches 1 at ``p = 1``; its area is the expected (``average``) accuracy.

    Args:
      success_prob: (B,) per-example attack-success probabilities in [0, 1].
      grid: (G,) probabilities at which to evaluate the curve; default ``linspace(0, 1,
        num_points)``.
      num_points: grid size when ``grid`` is None.

    Returns:
      A :class:`FuzzyRobustness`.

    References:
      Yuezhang, Wei. How and How Well Do Diffusion Models Improve Adversarial Robustness?
      ICLR 2025 submission (OpenReview EVK0sQHVCd), "fuzzy adversarial robustness".
    """
    q = jnp.asarray(success_prob, jnp.float32)
    if q.ndim != 1 or q.shape[0] == 0:
        raise ValueError(f"success_prob: expected a non-empty 1-D (B,) array, got shape "
                         f"{q.shape}")
    if not isinstance(q, jax.core.Tracer) and bool(jnp.any((q < 0) | (q > 1) | jnp.isnan(q))):
        raise ValueError("success_prob: expected probabilities in [0, 1]")
    if grid is None:
        if isinstance(num_points, bool) or int(num_points) < 2:
            raise ValueError(f"num_points: expected >= 2, got {num_points!r}")
        p = jnp.linspace(0.0, 1.0, int(num_points), dtype=jnp.float32)
    else:
        p = jnp.asarray(grid, jnp.float32)
        if p.ndim != 1:
            raise ValueError(f"grid: expected a 1-D array, got shape {p.shape}")
    curve = jnp.mean((q[None, :] <= p[:, None]).astype(jnp.float32), axis=1)
    return FuzzyRobustness(p, curve, 1.0 - jnp.mean(q))
