"""Compression rate: how much a purifier with fixed randomness shrinks the eps-ball.

Yuezhang & Wei (2025) find that, with its randomness fixed, a diffusion purifier maps the
eps-ball around an image into a much smaller set, and that this compression predicts robust
accuracy (a sigmoid in the compression rate; see :func:`jaxrob.analysis.fit_sigmoid`). Two
measurements: :func:`compression_rate_empirical` from sampled inputs (gradient-free) and
:func:`spectral_compression` from the Jacobian's singular values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._types import Array, Images, Key
from jaxrob.analysis._common import Static, ball_point, check_ball_study, flat_norm


class EmpiricalCompression(NamedTuple):
    """What :func:`compression_rate_empirical` returns (per example).

    Attributes:
      rate: (B,) ``output_norm / input_norm``.
      input_norm: (B,) mean ``||d_i||_2`` of the input displacements.
      output_norm: (B,) mean ``||f(x + d_i) - f(x)||_2``.
    """

    rate: Array
    input_norm: Array
    output_norm: Array


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num", "norm", "chunk"))
def _empirical(f, x, key, eps, indices, *, num, norm, chunk):
    samples = jnp.arange(num, dtype=jnp.uint32)

    def per_example(xi, idx):
        kb = jr.fold_in(key, idx)
        xi = xi[None]
        ball = jax.vmap(lambda i: ball_point(jr.fold_in(kb, i), xi, eps, norm)[0])(samples)
        return ball - xi  # (N, H, W, C) actual (clipped) displacements

    d_BNHWC = jax.vmap(per_example)(x, indices)
    b = x.shape[0]
    inputs = (x[:, None] + d_BNHWC).reshape(b * num, *x.shape[1:])
    one = lambda xi: f(xi[None])[0]
    batch = chunk or b * num
    out = jax.lax.map(one, inputs, batch_size=batch).reshape(d_BNHWC.shape)
    anchor = jax.lax.map(one, x, batch_size=min(batch, b))  # f(x) per example
    delta_NHWC = out - anchor[:, None]
    in_B = jax.vmap(lambda d: jnp.mean(flat_norm(d)))(d_BNHWC)
    out_B = jax.vmap(lambda d: jnp.mean(flat_norm(d)))(delta_NHWC)
    return EmpiricalCompression(out_B / in_B, in_B, out_B)


def compression_rate_empirical(purify_fixed: Callable[[Images], Images], x: Images, key: Key,
                               *, eps: float, num: int, norm: str = "l2",
                               chunk: int | None = None,
                               indices: Array | None = None) -> EmpiricalCompression:
    r"""Empirical compression rate of a deterministic purifier around each example.

    .. math::
        \mathrm{rate}(x) = \frac{\frac1N \sum_i \|f(x + d_i) - f(x)\|_2}
                                {\frac1N \sum_i \|d_i\|_2},

    ``d_i`` uniform in the ``norm`` eps-ball (then ``x + d_i`` clipped to [0, 1]; ``d_i`` is
    the clipped displacement), key ``fold_in(fold_in(key, idx_b), i)``. The anchor is
    ``f(x)``, the image the compressed ball collapses towards. For ``f(x) = c x`` the rate is
    exactly ``|c|``; for a linear map it is a norm-weighted average of its singular values.
    ``f`` is applied to one image at a time, ``f(x_i[None])``.

    Args:
      purify_fixed: ``f(x) -> x`` with its randomness fixed, e.g.
        ``lambda x: purifier(x, fixed_key)`` (static argument, by identity).
      x: (B, H, W, C) images in [0, 1].
      key: PRNG key for the ball samples.
      eps: ball radius.
      num: samples per example.
      norm: ``"l2"`` or ``"linf"`` ball (distances are L2 either way).
      chunk: images purified in parallel (``lax.map`` batch size); None: all.
      indices: (B,) global example indices for the per-example keys; default ``arange(B)``.

    Returns:
      An :class:`EmpiricalCompression` of (B,) arrays.

    References:
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
    """
    if not callable(purify_fixed):
        raise TypeError(f"purify_fixed: expected a callable f(x), got {type(purify_fixed)}")
    num, chunk, eps, indices = check_ball_study(x, num=num, norm=norm, eps=eps, chunk=chunk,
                                                indices=indices)
    return _empirical(Static(purify_fixed), x, key, eps, indices, num=num, norm=norm,
                      chunk=chunk)


class SpectralCompression(NamedTuple):
    """What :func:`spectral_compression` returns (leading batch axes of ``svals`` kept).

    Attributes:
      frac_below: fraction of singular values ``< low`` (strongly compressed directions).
      frac_above: fraction of singular values ``> high`` (expanded directions).
      geometric_mean: ``exp(mean(log s))`` = ``|det J|^(1/D)`` for square J, the per-dimension
        volume contraction (0 if any singular value is 0).
    """

    frac_below: Array
    frac_above: Array
    geometric_mean: Array


def spectral_compression(svals: Array, *, low: float = 0.25,
                         high: float = 1.0) -> SpectralCompression:
    r"""Summaries of a Jacobian spectrum: how many directions are compressed / expanded.

    .. math::
        \mathrm{frac\_below} = \tfrac1n \#\{i: s_i < \mathrm{low}\},\quad
        \mathrm{frac\_above} = \tfrac1n \#\{i: s_i > \mathrm{high}\},\quad
        \bar s = \exp\Big(\tfrac1n\sum_i \log s_i\Big).

    Inequalities are strict. Exact for any map whose singular values are known.

    Args:
      svals: (..., n) non-negative singular values (e.g. :func:`jaxrob.analysis.singular_values`).
      low: compression threshold (the paper reports > 90% below 0.25 for DiffPure).
      high: expansion threshold (the paper: 1.3% above 1.0).

    Returns:
      A :class:`SpectralCompression` of (...) arrays.

    References:
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839,
      Fig. 3a.
    """
    s = jnp.asarray(svals)
    if s.ndim < 1 or s.shape[-1] == 0:
        raise ValueError(f"svals: expected (..., n) singular values with n >= 1, got shape "
                         f"{s.shape}")
    if not low <= high:
        raise ValueError(f"low/high: expected low <= high, got low={low}, high={high}")
    if not isinstance(s, jax.core.Tracer) and bool(jnp.any(s < 0)):
        raise ValueError("svals: expected non-negative singular values")
    frac_below = jnp.mean((s < low).astype(jnp.float32), axis=-1)
    frac_above = jnp.mean((s > high).astype(jnp.float32), axis=-1)
    pos = s > 0
    logs = jnp.where(pos, jnp.log(jnp.where(pos, s, 1.0)), -jnp.inf)
    return SpectralCompression(frac_below, frac_above, jnp.exp(jnp.mean(logs, axis=-1)))
