"""Summaries of a Jacobian's full spectrum (what a spectrum study records per image)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxrob._types import Array
from jaxrob.analysis._compression import spectral_compression


class SpectrumSummary(NamedTuple):
    """What :func:`spectrum_summary` returns (leading batch axes of ``svals`` kept).

    Attributes:
      frac_below, frac_above, geometric_mean: as :class:`SpectralCompression`.
      geometric_mean_nonzero: the geometric mean over the singular values that are not
        numerically zero (``> rtol * sigma_max``).
      frac_zero: fraction of numerically zero singular values (e.g. the directions of output
        pixels a purifier clips to 0 or 1: their Jacobian rows vanish).
      sigma_max: the largest singular value (the spectral norm).
      frobenius: ``||J||_F = sqrt(sum s_i^2)``.
      rms: ``||J||_F / sqrt(n)``, the RMS singular value (what a random small displacement's
        norm is multiplied by, on average over directions).
    """

    frac_below: Array
    frac_above: Array
    geometric_mean: Array
    geometric_mean_nonzero: Array
    frac_zero: Array
    sigma_max: Array
    frobenius: Array
    rms: Array


def spectrum_summary(svals: Array, *, low: float = 0.25, high: float = 1.0,
                     rtol: float = 1e-5) -> SpectrumSummary:
    r"""Compression fractions, norms and the zero directions of a full spectrum.

    .. math::
        \sigma_{\max} = s_1,\quad \|J\|_F = \Big(\sum_i s_i^2\Big)^{1/2},\quad
        \mathrm{rms} = \|J\|_F / \sqrt n,\quad
        \mathrm{frac\_zero} = \tfrac1n \#\{i: s_i \le \mathrm{rtol}\, s_1\},

    with ``frac_below`` / ``frac_above`` / ``geometric_mean`` of
    :func:`jaxrob.analysis.spectral_compression` and ``geometric_mean_nonzero`` the geometric
    mean of the other singular values (1 when every one is zero).

    Args:
      svals: (..., n) singular values in descending order (e.g.
        :func:`jaxrob.analysis.singular_values` of a dense Jacobian: all n of them).
      low, high: the compression and expansion thresholds (strict inequalities).
      rtol: singular values ``<= rtol * sigma_max`` count as zero.

    Returns:
      A :class:`SpectrumSummary` of (...) arrays.
    """
    s = jnp.asarray(svals)
    sc = spectral_compression(s, low=low, high=high)  # checks the shape and low <= high
    s_max = s[..., 0]
    fro = jnp.sqrt(jnp.sum(jnp.square(s), axis=-1))
    nonzero = s > rtol * s_max[..., None]
    log_nz = jnp.sum(jnp.where(nonzero, jnp.log(jnp.where(nonzero, s, 1.0)), 0.0), axis=-1)
    count = jnp.maximum(jnp.sum(nonzero, axis=-1), 1)
    return SpectrumSummary(
        frac_below=sc.frac_below, frac_above=sc.frac_above, geometric_mean=sc.geometric_mean,
        geometric_mean_nonzero=jnp.exp(log_nz / count),
        frac_zero=1.0 - jnp.mean(nonzero.astype(jnp.float32), axis=-1),
        sigma_max=s_max, frobenius=fro, rms=fro / jnp.sqrt(jnp.float32(s.shape[-1])))
