"""Single reverse steps of a discrete chain: DDPM posterior / ancestral step, DDIM step."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrob._checks import check_choice
from jaxrob._types import Array
from jaxrob.diffusion._forward import broadcast_steps, gather, predict_x0
from jaxrob.diffusion._schedules import Schedule

VARIANCES = ("fixed_small", "fixed_large")


def posterior_mean_var(x0: Array, x_t: Array, n: int | Array, schedule: Schedule):
    """Mean and variance of ``q(x_{n-1} | x_n, x_0)`` (Ho et al. 2020, eq. 6-7).

    ``mean = sqrt(abar_{n-1}) beta_n / (1 - abar_n) x0 + sqrt(alpha_n) (1 - abar_{n-1}) /
    (1 - abar_n) x_n`` and ``var = beta_n (1 - abar_{n-1}) / (1 - abar_n)`` (0 at n = 0).

    Returns:
      ``(mean, var)`` with ``var`` broadcastable against ``x_t``.
    """
    n = broadcast_steps(n, x_t.shape[0])
    c0 = gather(schedule.posterior_coef_x0, n, x_t)
    ct = gather(schedule.posterior_coef_xt, n, x_t)
    return c0 * x0 + ct * x_t, gather(schedule.posterior_variance, n, x_t)


def ddpm_step(x_t: Array, n: int | Array, eps: Array, noise: Array, schedule: Schedule, *,
              variance: str = "fixed_small", clip_x0: bool = False) -> Array:
    """One ancestral step ``x_n -> x_{n-1}`` of a DDPM with predicted noise ``eps``.

    Args:
      x_t: current state at position ``n``.
      n: position(s) in ``schedule``; no noise is added at ``n = 0``.
      eps: the eps-model's prediction at ``(x_t, n)``.
      noise: standard normal, shaped like ``x_t``.
      schedule: the chain (full or respaced).
      variance: ``"fixed_small"`` (posterior variance, beta-tilde) or ``"fixed_large"``
        (``beta_n``), the two choices of Ho et al.
      clip_x0: clip the implied x0 to [-1, 1] before forming the mean (image generation); off
        by default so the step is smooth for gradients.

    Returns:
      ``x_{n-1}``.
    """
    check_choice(variance, VARIANCES, "variance")
    n = broadcast_steps(n, x_t.shape[0])
    x0 = predict_x0(x_t, n, eps, schedule)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, var = posterior_mean_var(x0, x_t, n, schedule)
    if variance == "fixed_large":
        var = gather(schedule.betas, n, x_t)
    nonzero = gather((jnp.arange(schedule.num_steps) > 0).astype(x_t.dtype), n, x_t)
    return mean + nonzero * jnp.sqrt(var) * noise


def ddim_step(x_t: Array, n: int | Array, eps: Array, noise: Array, schedule: Schedule, *,
              eta: float = 0.0, clip_x0: bool = False) -> Array:
    """One DDIM step from position ``n`` to ``n - 1`` of ``schedule`` (Song et al. 2021, eq. 12).

    ``x_{n-1} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar') / (1 - abar) (1 - abar / abar'))``; ``eta = 0`` is
    deterministic, ``eta = 1`` has the DDPM posterior variance.
    """
    n = broadcast_steps(n, x_t.shape[0])
    abar_prev = gather(schedule.alphas_cumprod_prev, n, x_t)
    one_m_abar_prev = gather(schedule.one_minus_alphas_cumprod_prev, n, x_t)
    x0 = predict_x0(x_t, n, eps, schedule)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    # eta^2 (1 - abar') / (1 - abar) (1 - abar / abar') is eta^2 times the posterior variance
    sigma2 = eta**2 * gather(schedule.posterior_variance, n, x_t)
    dir_coef = jnp.sqrt(jnp.maximum(one_m_abar_prev - sigma2, 0.0))
    return jnp.sqrt(abar_prev) * x0 + dir_coef * eps + jnp.sqrt(sigma2) * noise
