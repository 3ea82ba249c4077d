"""Where do purified images go? Input variation versus the purifier's internal randomness.

Yuezhang & Wei (2025) decompose the variability of a stochastic purifier ``f(x, key)`` around one
image ``x``: (a) ``num`` inputs ``x_i`` drawn in the eps-ball, ONE key: the purification
directions ``f(x_i, k) - x_i`` are almost parallel (Pearson correlation ~0.99) and the purified
set is smaller than the input ball (compression); (b) ``x`` itself with ``num`` keys: directions
only weakly correlated (~0.2) and the set is much larger than the ball (expansion); (c) both vary:
randomness dominates. :func:`randomness_decomposition` measures all three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._types import Array, Images, Key
from jaxrob.analysis._common import Static, ball_point, check_ball_study, radius


def displacement_correlations(displacements: Array) -> tuple[Array, Array]:
    r"""Pearson correlation matrix of ``N`` displacement vectors and its mean off-diagonal entry.

    Row ``i`` is centred over its ``D`` coordinates and scaled to unit norm, so entry ``(i, j)``
    is ``np.corrcoef(d)[i, j]``:

    .. math::
        \rho_{ij} = \frac{(d_i - \bar d_i)\cdot(d_j - \bar d_j)}
                         {\|d_i - \bar d_i\|\,\|d_j - \bar d_j\|},\qquad
        \bar\rho = \frac{1}{N(N-1)}\sum_{i\ne j}\rho_{ij}.

    A vector with no variance across its coordinates gives NaN, as in numpy.

    Args:
      displacements: (N, D) vectors, or (N, B, D) for ``B`` independent sets (e.g. one per
        example; :class:`RandomnessSummary` stores them this way).

    Returns:
      ``(corr, mean_offdiag)``: (N, N) and a scalar, or (B, N, N) and (B,) for (N, B, D) input.

    References:
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
    """
    d = jnp.asarray(displacements)
    if d.ndim not in (2, 3):
        raise ValueError("displacements: expected (N, D) or (N, B, D) (flatten images to D "
                         f"first), got shape {d.shape}")
    n = d.shape[0]
    if n < 2:
        raise ValueError(f"displacements: expected at least 2 vectors (N >= 2), got N={n}")
    d_BND = d[None] if d.ndim == 2 else jnp.swapaxes(d, 0, 1)
    d_BND = d_BND.astype(jnp.float32)
    c_BND = d_BND - jnp.mean(d_BND, axis=2, keepdims=True)
    u_BND = c_BND / jnp.sqrt(jnp.sum(jnp.square(c_BND), axis=2, keepdims=True))
    corr_BNN = jnp.einsum("bnd,bmd->bnm", u_BND, u_BND, precision=jax.lax.Precision.HIGHEST)
    off_B = (jnp.sum(corr_BNN, axis=(1, 2)) - jnp.trace(corr_BNN, axis1=1, axis2=2)) / (
        n * (n - 1))
    if d.ndim == 2:
        return corr_BNN[0], off_B[0]
    return corr_BNN, off_B


class RandomnessSummary(NamedTuple):
    """One mode of :func:`randomness_decomposition` (``B`` examples, ``N = num`` samples).

    Attributes:
      displacements: (N, B, D) purification directions ``f(x_i, k_i) - x_i`` (purified output
        minus the input it was given), flattened to ``D = H*W*C``.
      correlation: (B, N, N) Pearson correlations of those directions.
      mean_correlation: (B,) mean off-diagonal correlation.
      radius: (B,) mean L2 distance of the purified outputs ``f(x_i, k_i)`` to their centroid.
    """

    displacements: Array
    correlation: Array
    mean_correlation: Array
    radius: Array


class RandomnessDecomposition(NamedTuple):
    """What :func:`randomness_decomposition` returns.

    Attributes:
      fixed_noise: (a) inputs vary in the eps-ball, one key.
      fixed_input: (b) the clean input, ``num`` keys.
      both: (c) inputs and keys vary together (sample ``i`` uses input ``i`` and key ``i``).
      input_radius: (B,) mean L2 distance of the ``num`` ball inputs to their centroid (the
        reference radius: ``radius / input_radius`` < 1 is compression, > 1 expansion).
    """

    fixed_noise: RandomnessSummary
    fixed_input: RandomnessSummary
    both: RandomnessSummary
    input_radius: Array


def _summary(inputs_BNHWC, outputs_BNHWC) -> RandomnessSummary:
    b, n = outputs_BNHWC.shape[:2]
    out_BND = outputs_BNHWC.reshape(b, n, -1)
    disp_NBD = jnp.swapaxes(out_BND - inputs_BNHWC.reshape(b, n, -1), 0, 1)
    corr, mean = displacement_correlations(disp_NBD)
    return RandomnessSummary(disp_NBD, corr, mean, jax.vmap(radius)(out_BND))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num", "norm", "chunk"))
def _decompose(purify, x, key, eps, indices, *, num, norm, chunk):
    k_in, k_pur = jr.fold_in(key, 0), jr.fold_in(key, 1)
    b = x.shape[0]
    samples = jnp.arange(num, dtype=jnp.uint32)

    def per_example(xi, idx):
        kin, kpur = jr.fold_in(k_in, idx), jr.fold_in(k_pur, idx)
        xi = xi[None]
        ball = jax.vmap(lambda i: ball_point(jr.fold_in(kin, i), xi, eps, norm)[0])(samples)
        keys = jax.vmap(lambda i: jr.fold_in(kpur, i))(samples)
        return ball, keys, kpur

    ball_BNHWC, keys_BN, k0_B = jax.vmap(per_example)(x, indices)
    k0_BN = jnp.broadcast_to(k0_B[:, None], (b, num))
    x_BNHWC = jnp.broadcast_to(x[:, None], ball_BNHWC.shape)

    def run(inputs_BNHWC, keys):
        flat_x = inputs_BNHWC.reshape(b * num, *x.shape[1:])
        one = lambda xk: purify(xk[0][None], xk[1])[0]
        out = jax.lax.map(one, (flat_x, keys.reshape(b * num)), batch_size=chunk or b * num)
        return out.reshape(inputs_BNHWC.shape)

    fixed_noise = _summary(ball_BNHWC, run(ball_BNHWC, k0_BN))
    fixed_input = _summary(x_BNHWC, run(x_BNHWC, keys_BN))
    both = _summary(ball_BNHWC, run(ball_BNHWC, keys_BN))
    return RandomnessDecomposition(fixed_noise, fixed_input, both,
                                   jax.vmap(radius)(ball_BNHWC.reshape(b, num, -1)))


def randomness_decomposition(purify: Callable[[Images, Key], Images], x: Images, key: Key, *,
                             eps: float, num: int, norm: str = "linf",
                             chunk: int | None = None,
                             indices: Array | None = None) -> RandomnessDecomposition:
    """Purification directions and spread under input variation vs internal randomness.

    For each example ``x_b`` (with global index ``idx_b``), inputs
    ``x_i = clip(x_b + d_i, 0, 1)``, ``d_i`` uniform in the ``norm`` eps-ball (key
    ``fold_in(fold_in(fold_in(key, 0), idx_b), i)``), and purification keys
    ``k_i = fold_in(fold_in(fold_in(key, 1), idx_b), i)``, ``i < num``:

    * (a) ``fixed_noise``: ``f(x_i, k_0)`` -- one key for every input;
    * (b) ``fixed_input``: ``f(x_b, k_i)``;
    * (c) ``both``: ``f(x_i, k_i)``.

    Every call purifies ONE image, ``purify(x_i[None], k)``, so a purifier that draws noise
    for its whole batch at once still sees the same noise for the same key. The results depend
    on neither the batch size nor ``chunk``.

    Args:
      purify: ``purify(x, key) -> x`` on (1, H, W, C) images in [0, 1] (e.g. a
        :class:`jaxrob.purify.Purifier`). Jitted as a static argument (by identity).
      x: (B, H, W, C) clean (or adversarial) images in [0, 1]; each is analysed on its own.
      key: a PRNG key.
      eps: radius of the input ball.
      num: samples per mode (the paper uses 100).
      norm: ``"linf"`` or ``"l2"`` ball.
      chunk: purifications run in parallel (``lax.map`` batch size); None: all ``B * num``.
      indices: (B,) global example indices for the per-example keys; default ``arange(B)``.

    Returns:
      A :class:`RandomnessDecomposition`.

    References:
      Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839
      (Fig. 2: mean correlation 0.93 with fixed noise vs 0.22 with varying noise; radius of a
      unit L2 ball 1.00 -> 0.24 with fixed noise, -> 3.28 with varying noise).
    """
    if not callable(purify):
        raise TypeError(f"purify: expected a callable purify(x, key), got {type(purify)}")
    num, chunk, eps, indices = check_ball_study(x, num=num, norm=norm, eps=eps, chunk=chunk,
                                                indices=indices)
    if num < 2:
        raise ValueError(f"num: expected at least 2 samples for correlations, got {num}")
    return _decompose(Static(purify), x, key, eps, indices, num=num, norm=norm, chunk=chunk)
