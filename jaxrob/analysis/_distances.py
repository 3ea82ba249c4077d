"""Per-example distances between image batches: L2, Linf, SSIM, and along a trajectory.

Used to test the "denoising" hypothesis of diffusion purification: Yuezhang & Wei (2025) track
the distance of every intermediate purification state to the clean image and find that purified
images end farther from it than the adversarial input (CIFAR-10 reverse-only: L2 1.19 -> 3.08,
SSIM 0.96 -> 0.79).

Inputs are float32 NHWC arrays of equal shape. Values are not range-checked: intermediate
diffusion states mapped to [0, 1] space (:meth:`jaxrob.purify.Purifier.trajectory`) overshoot
it, and that is what is measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrob._types import Array, Images, PerExample
from jaxrob.analysis._common import flat_norm


def _check_pair(x, y, names=("x", "y")) -> None:
    for a, n in zip((x, y), names, strict=True):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{n}: expected rank 4 (batch, height, width, channels) NHWC, "
                             f"got shape {getattr(a, 'shape', type(a).__name__)}")
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]}: expected equal shapes, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def l2_distance(x: Images, y: Images) -> PerExample:
    """Per-example Euclidean distance ``||x_b - y_b||_2`` over all pixels and channels.

    Args:
      x: (B, H, W, C) images.
      y: (B, H, W, C) images.

    Returns:
      (B,) distances.
    """
    _check_pair(x, y)
    return flat_norm(x - y)


def linf_distance(x: Images, y: Images) -> PerExample:
    """Per-example Chebyshev distance ``max_i |x_bi - y_bi|``.

    Args:
      x: (B, H, W, C) images.
      y: (B, H, W, C) images.

    Returns:
      (B,) distances.
    """
    _check_pair(x, y)
    return jnp.max(jnp.abs(x - y).reshape(x.shape[0], -1), axis=1)


def _gaussian_window(size: int, sigma: float) -> Array:
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
    g = jnp.exp(-jnp.square(r) / (2.0 * sigma * sigma))
    return g / jnp.sum(g)


def ssim(x: Images, y: Images, *, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> PerExample:
    r"""Per-example structural similarity (Wang et al. 2004), channels averaged.

    With Gaussian-weighted local statistics (window ``window``, std ``sigma``) per channel,

    .. math::
        \mathrm{SSIM}(x, y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
                                   {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (k_1 L)^2,\ C_2 = (k_2 L)^2,

    where ``L = data_range``. The SSIM map is computed with *valid* filtering (only windows
    fully inside the image; no padding artefacts at the border, as in Wang et al.'s reference
    code and ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``), averaged over positions, then over channels. The local
    (co)variances are the population (weighted, biased) ones, computed in float32 from
    mean-centred images.

    Args:
      x: (B, H, W, C) images.
      y: (B, H, W, C) images, same shape.
      data_range: the dynamic range ``L`` of the images (1 for [0, 1]).
      window: side of the Gaussian window; must not exceed H or W.
      sigma: standard deviation of the Gaussian window.
      k1: luminance stabiliser constant.
      k2: contrast stabiliser constant.

    Returns:
      (B,) SSIM values in [-1, 1]; 1 iff ``x_b == y_b`` (up to float rounding).

    References:
      Wang, Bovik, Sheikh, Simoncelli. Image Quality Assessment: From Error Visibility to
      Structural Similarity. IEEE TIP 2004.
    """
    _check_pair(x, y)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")
    b, h, w, c = x.shape
    if window > h or window > w:
        raise ValueError(f"window: expected at most the image size {h}x{w} (valid filtering), "
                         f"got {window}; pass a smaller window for small images")
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma!r}")
    g = _gaussian_window(window, sigma)
    k_h = g.reshape(window, 1, 1, 1)  # HWIO, separable
    k_w = g.reshape(1, window, 1, 1)
    dn = ("NHWC", "HWIO", "NHWC")

    def filt(a_BHWC):
        a = jnp.transpose(a_BHWC, (0, 3, 1, 2)).reshape(b * c, h, w, 1)
        a = lax.conv_general_dilated(a, k_h, (1, 1), "VALID", dimension_numbers=dn,
                                     precision=lax.Precision.HIGHEST)
        a = lax.conv_general_dilated(a, k_w, (1, 1), "VALID", dimension_numbers=dn,
                                     precision=lax.Precision.HIGHEST)
        return a.reshape(b, c, h - window + 1, w - window + 1)

    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    # (Co)variances are shift-invariant: compute them from images centred by their mean per
    # (example, channel), which avoids float32 cancellation in E[x^2] - E[x]^2.
    xc = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    yc = y - jnp.mean(y, axis=(1, 2), keepdims=True)
    mxc, myc = filt(xc), filt(yc)
    sxx = filt(xc * xc) - mxc * mxc
    syy = filt(yc * yc) - myc * myc
    sxy = filt(xc * yc) - mxc * myc
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def trajectory_distances(states_TBHWC: Array, clean_BHWC: Images, *,
                         ssim_window: int = 11) -> dict[str, Array]:
    """Distances of every state of a purification trajectory to the clean images.

    To include the forward-diffused input from :meth:`jaxrob.purify.Purifier.trajectory`,
    pass ``jnp.concatenate([x_t[None], states])``.

    Args:
      states_TBHWC: (T, B, H, W, C) states (e.g. reverse-process states in [0, 1] space).
      clean_BHWC: (B, H, W, C) clean images.
      ssim_window: SSIM window side (see :func:`ssim`).

    Returns:
      ``{"l2": (T, B), "linf": (T, B), "ssim": (T, B)}``.

    References:
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
    """
    if getattr(states_TBHWC, "ndim", None) != 5:
        raise ValueError("states_TBHWC: expected rank 5 (steps, batch, height, width, "
                         f"channels), got shape {getattr(states_TBHWC, 'shape', None)}")
    _check_pair(states_TBHWC[0], clean_BHWC, ("states_TBHWC[t]", "clean_BHWC"))
    one = lambda s: {"l2": l2_distance(s, clean_BHWC), "linf": linf_distance(s, clean_BHWC),
                     "ssim": ssim(s, clean_BHWC, window=ssim_window)}
    return jax.lax.map(one, states_TBHWC)
