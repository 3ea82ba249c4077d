"""Edit quality: a Frechet distance on a given feature function, SSIM and PSNR.

How well does an edit of a protected (or purified) image keep the content? Xue & Chen report
FID, SSIM, LPIPS and IA-Score of the edits. Here:

* :func:`fid` / :func:`frechet_distance`: the Frechet distance between Gaussians fitted to two
  sets of features, on a *given* feature function, e.g. our MNIST classifier's penultimate
  features (:func:`classifier_features`). It is not Inception-FID: numbers are comparable only
  between runs that use the same feature function (and similar set sizes: the estimate is
  biased upwards for small sets).
* :func:`psnr` per example, and SSIM per example from :func:`jaxrob.analysis.ssim` (the same
  SSIM as the analysis studies use: Gaussian window 11, sigma 1.5, valid filtering).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from jaxrob._checks import check_images, check_positive_int
from jaxrob._types import Array, Images, PerExample

_SetA = Float[Array, "na h w c"]  # two image sets of (possibly) different sizes
_SetB = Float[Array, "nb h w c"]


def _check_features(f, name: str) -> np.ndarray:
    a = np.asarray(f, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (num_images, dim), got shape "
                         f"{a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name}: expected at least 2 feature vectors (a covariance), got "
                         f"{a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` with
    sample means and covariances (``ddof=1``), in float64 NumPy. The trace term is
    ``tr((S_a S_b)^{1/2})`` computed through symmetric eigendecompositions (``eigh``), so it is
    symmetric in ``a`` and ``b`` and real; the result is clipped at 0.

    Args:
      features_a: (N_a, D) features.
      features_b: (N_b, D) features.

    Returns:
      The distance (a Python float, >= 0; 0 for a set with itself up to rounding).

    References:
      Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. GANs Trained by a Two Time-Scale
      Update Rule Converge to a Local Nash Equilibrium. NeurIPS 2017.
    """
    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a, features_b: expected the same feature dimension, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(s_a)
    middle = root_a @ s_b @ root_a
    w = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_sqrt)
    return max(d, 0.0)


def _features(feature_fn, x, batch_size):
    out = []
    for i in range(0, x.shape[0], batch_size):
        f = np.asarray(feature_fn(jnp.asarray(x[i:i + batch_size])), np.float64)
        out.append(f.reshape(f.shape[0], -1))
    return np.concatenate(out, axis=0)


def fid(feature_fn: Callable[[Array], Array], x_a: _SetA, x_b: _SetB, *,
        batch_size: int = 256) -> float:
    """Frechet distance of two image sets on ``feature_fn``'s features (not Inception-FID).

    Args:
      feature_fn: ``feature_fn(x) -> (B, ...)`` features of [0, 1] NHWC images (flattened per
        image), e.g. :func:`classifier_features` of our MNIST classifier (its penultimate
        layer). Comparable only between runs with the same feature function.
      x_a: (N_a, H, W, C) images in [0, 1].
      x_b: (N_b, H, W, C) images in [0, 1] (same H, W, C).
      batch_size: images per call of ``feature_fn``.

    Returns:
      :func:`frechet_distance` of the two feature sets.
    """
    check_images(x_a, "x_a")
    check_images(x_b, "x_b")
    if tuple(x_a.shape[1:]) != tuple(x_b.shape[1:]):
        raise ValueError(f"x_a, x_b: expected images of the same size, got {tuple(x_a.shape)} "
                         f"and {tuple(x_b.shape)}")
    batch_size = check_positive_int(batch_size, "batch_size")
    if not callable(feature_fn):
        raise TypeError(f"feature_fn: expected a callable feature_fn(x) -> features, got "
                        f"{type(feature_fn).__name__}")
    return frechet_distance(_features(feature_fn, x_a, batch_size),
                            _features(feature_fn, x_b, batch_size))


def classifier_features(classifier, layer: str = "out") -> Callable[[Images], Array]:
    """The input of a classifier's layer named ``layer`` (default: the final ``"out"`` Dense of
    :class:`jaxrob.models.SmallCNN`, i.e. its penultimate features), flattened per image.

    Args:
      classifier: a :class:`jaxrob.models.Classifier` (``.module``, ``.variables``).
      layer: the name of the submodule whose input is the feature.

    Returns:
      A jitted ``feature_fn(x) -> (B, D)``.
    """
    module = getattr(classifier, "module", None)
    variables = getattr(classifier, "variables", None)
    if module is None or variables is None:
        raise TypeError(f"classifier: expected a jaxrob.models.Classifier (module and "
                        f"variables), got {type(classifier).__name__}")

    @jax.jit
    def feature_fn(x):
        captured = []

        def grab(next_fun, args, kwargs, context):
            if context.module.name == layer and context.method_name == "__call__":
                captured.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            module.apply(variables, x, train=False)
        if not captured:
            raise ValueError(f"layer: the classifier has no submodule named {layer!r}")
        f = captured[0]
        return f.reshape(f.shape[0], -1)

    return feature_fn


def psnr(x: Images, y: Images, *, data_range: float = 1.0) -> PerExample:
    """Per-example peak signal-to-noise ratio ``10 log10(L^2 / mse)`` in dB (inf if equal).

    Args:
      x, y: (B, H, W, C) images of equal shape.
      data_range: the dynamic range ``L`` (1 for [0, 1] images).

    Returns:
      (B,) PSNR in dB.
    """
    if getattr(x, "ndim", None) != 4 or getattr(y, "shape", None) != getattr(x, "shape", None):
        raise ValueError(f"x, y: expected two NHWC batches of equal shape, got "
                         f"{getattr(x, 'shape', type(x).__name__)} and "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if not float(data_range) > 0:
        raise ValueError(f"data_range: expected > 0, got {data_range!r}")
    mse = jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)),
                   axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


@functools.partial(jax.jit, static_argnums=2)
def _ssim_psnr(x, y, window):
    from jaxrob.analysis import ssim

    return ssim(x, y, window=window), psnr(x, y)


def edit_quality(x_edit: Images, x_ref: Images, *,
                 feature_fn: Callable[[Array], Array] | None = None,
                 ssim_window: int | None = None) -> dict:
    """Mean SSIM and PSNR of ``x_edit`` against ``x_ref`` (pairwise), and their FID.

    Args:
      x_edit: (B, H, W, C) edited images in [0, 1].
      x_ref: (B, H, W, C) reference images (e.g. the edits of the unprotected images).
      feature_fn: the FID's features (:func:`fid`); None: no FID.
      ssim_window: SSIM's window (None: 11, or the image size if smaller).

    Returns:
      ``{"ssim": float, "psnr": float, "fid": float | None, "ssim_per_example": list,
      "psnr_per_example": list}`` (PSNR capped at 100 dB for identical pairs in the mean).
    """
    check_images(x_edit, "x_edit")
    check_images(x_ref, "x_ref")
    if tuple(x_edit.shape) != tuple(x_ref.shape):
        raise ValueError(f"x_ref: expected the shape of x_edit {tuple(x_edit.shape)}, got "
                         f"{tuple(x_ref.shape)}")
    window = ssim_window or min(11, x_edit.shape[1], x_edit.shape[2])
    s, p = _ssim_psnr(jnp.asarray(x_edit), jnp.asarray(x_ref), window)
    s = np.asarray(s, np.float64)
    p = np.minimum(np.asarray(p, np.float64), 100.0)
    return {"ssim": float(s.mean()), "psnr": float(p.mean()),
            "fid": None if feature_fn is None else fid(feature_fn, x_edit, x_ref),
            "ssim_per_example": s.tolist(), "psnr_per_example": p.tolist()}
