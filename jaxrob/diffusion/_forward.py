"""Forward process q(x_n | x_0) and the eps / x0 / score parameterisations of a discrete chain.

Every function takes positions ``n`` (int array, one per example) into a :class:`Schedule`;
``x`` tensors live in the diffusion model's space (images mapped to [-1, 1]).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrob._types import Array
from jaxrob.diffusion._schedules import Schedule


def to_model_space(x01: Array) -> Array:
    """[0, 1] images -> [-1, 1] diffusion space."""
    return 2.0 * x01 - 1.0


def from_model_space(x: Array, *, clip: bool = True) -> Array:
    """[-1, 1] diffusion space -> [0, 1] images (clipped by default)."""
    y = (x + 1.0) / 2.0
    return jnp.clip(y, 0.0, 1.0) if clip else y


def gather(values: Array, n: int | Array, like: Array) -> Array:
    """``values[n]`` shaped to broadcast against ``like`` (batch first, then singleton axes)."""
    n = jnp.asarray(n)
    v = values[n]
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def broadcast_steps(n, batch: int) -> Array:
    """An int scalar or (B,) array of positions as an int32 (B,) array."""
    n = jnp.asarray(n, jnp.int32)
    return jnp.broadcast_to(n, (batch,)) if n.ndim == 0 else n


def q_sample(x0: Array, n: int | Array, noise: Array, schedule: Schedule) -> Array:
    """Sample ``x_n ~ q(x_n | x_0) = N(sqrt(abar_n) x_0, (1 - abar_n) I)`` by reparameterisation.

    Args:
      x0: clean inputs in diffusion space, (B, ...).
      n: positions in ``schedule``, int scalar or (B,).
      noise: standard normal noise shaped like ``x0``.
      schedule: the chain.

    Returns:
      ``sqrt(abar_n) x0 + sqrt(1 - abar_n) noise``.
    """
    n = broadcast_steps(n, x0.shape[0])
    return (gather(schedule.sqrt_alphas_cumprod, n, x0) * x0
            + gather(schedule.sqrt_one_minus_alphas_cumprod, n, x0) * noise)


def q_mean_std(n: int | Array, schedule: Schedule) -> tuple[Array, Array]:
    """Closed-form marginal coefficients ``(sqrt(abar_n), sqrt(1 - abar_n))``."""
    return schedule.sqrt_alphas_cumprod[n], schedule.sqrt_one_minus_alphas_cumprod[n]


def predict_x0(x_t: Array, n: int | Array, eps: Array, schedule: Schedule) -> Array:
    """``x0 = (x_n - sqrt(1 - abar_n) eps) / sqrt(abar_n)`` (Tweedie's estimate for exact eps)."""
    n = broadcast_steps(n, x_t.shape[0])
    return ((x_t - gather(schedule.sqrt_one_minus_alphas_cumprod, n, x_t) * eps)
            / gather(schedule.sqrt_alphas_cumprod, n, x_t))


def predict_eps(x_t: Array, n: int | Array, x0: Array, schedule: Schedule) -> Array:
    """Inverse of :func:`predict_x0`: ``eps = (x_n - sqrt(abar_n) x0) / sqrt(1 - abar_n)``."""
    n = broadcast_steps(n, x_t.shape[0])
    return ((x_t - gather(schedule.sqrt_alphas_cumprod, n, x_t) * x0)
            / gather(schedule.sqrt_one_minus_alphas_cumprod, n, x_t))


def eps_to_score(eps: Array, n: int | Array, schedule: Schedule) -> Array:
    """``grad log q(x_n) = -eps / sqrt(1 - abar_n)``."""
    return -eps / gather(schedule.sqrt_one_minus_alphas_cumprod,
                         broadcast_steps(n, eps.shape[0]), eps)


def score_to_eps(score: Array, n: int | Array, schedule: Schedule) -> Array:
    """Inverse of :func:`eps_to_score`."""
    return -gather(schedule.sqrt_one_minus_alphas_cumprod,
                   broadcast_steps(n, score.shape[0]), score) * score
