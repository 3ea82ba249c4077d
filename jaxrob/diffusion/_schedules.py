"""Discrete noise schedules: linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021), respacing."""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

from jaxrob._types import Array


@flax.struct.dataclass
class Schedule:
    """A discrete variance schedule ``beta_1..beta_N`` and the quantities derived from it.

    Position ``n`` (0-based) of every array is one step of this chain. ``model_steps[n]`` is the
    step index the eps-model was trained with at that position: ``n`` for a full schedule,
    the original index for a respaced one (so ``eps_fn(x, model_steps[n])`` is always right).
    Derived coefficients are computed in float64 and stored as float32, so quantities such as
    ``1 - abar_n`` stay accurate near ``n = 0`` (small ``t_star``).

    Attributes:
      betas: ``beta_n`` of this chain, shape (N,).
      alphas_cumprod: ``abar_n = prod_{m<=n} (1 - beta_m)``, shape (N,).
      alphas_cumprod_prev: ``abar_{n-1}`` (1 at n = 0).
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: ``sqrt(abar_n)``, ``sqrt(1 - abar_n)``.
      one_minus_alphas_cumprod, one_minus_alphas_cumprod_prev: ``1 - abar_n``, ``1 - abar_{n-1}``.
      posterior_coef_x0, posterior_coef_xt, posterior_variance: ``q(x_{n-1} | x_n, x_0)``
        mean coefficients and variance (Ho et al. 2020, eq. 7).
      model_steps: int32 step labels for the eps-model, shape (N,).
      num_train_steps: length of the schedule the model was trained on (static).
    """

    betas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    one_minus_alphas_cumprod: Array
    one_minus_alphas_cumprod_prev: Array
    posterior_coef_x0: Array
    posterior_coef_xt: Array
    posterior_variance: Array
    model_steps: Array
    num_train_steps: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas(self) -> Array:
        return 1.0 - self.betas

    def step_for_t_star(self, t_star: float) -> int:
        """Index n of the last forward step for a fraction ``t_star`` in (0, 1] of the chain.

        DiffPure's ``t=100`` of a 1000-step chain is ``t_star=0.1`` and gives ``n = 99``
        (100 forward steps, 0-based).
        """
        from jaxrob._checks import check_t_star

        t = check_t_star(t_star)
        return max(int(round(t * self.num_steps)) - 1, 0)


def _validate_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas: expected every beta in (0, 1), got "
                         f"min {betas.min():.3g}, max {betas.max():.3g}")


def from_betas(betas, *, model_steps=None, num_train_steps: int | None = None) -> Schedule:
    """Build a :class:`Schedule` from an explicit beta sequence (validated: 0 < beta < 1)."""
    betas = np.asarray(betas, np.float64)
    _validate_betas(betas)
    abar = np.cumprod(1.0 - betas)
    one_m_abar = -np.expm1(np.cumsum(np.log1p(-betas)))
    return _build(betas, abar, one_m_abar, model_steps, num_train_steps)


def _build(betas, abar, one_m_abar, model_steps, num_train_steps) -> Schedule:
    n = betas.shape[0]
    if model_steps is None:
        model_steps = np.arange(n)
    model_steps = np.asarray(model_steps)
    if model_steps.shape != (n,) or np.any(np.diff(model_steps) <= 0):
        raise ValueError("model_steps: expected a strictly increasing sequence of "
                         f"length {n}, got {model_steps}")
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_m_abar_prev = np.concatenate([[0.0], one_m_abar[:-1]])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_m_abar)),
        one_minus_alphas_cumprod=f32(one_m_abar),
        one_minus_alphas_cumprod_prev=f32(one_m_abar_prev),
        posterior_coef_x0=f32(np.sqrt(abar_prev) * betas / one_m_abar),
        posterior_coef_xt=f32(np.sqrt(1.0 - betas) * one_m_abar_prev / one_m_abar),
        posterior_variance=f32(betas * one_m_abar_prev / one_m_abar),
        model_steps=jnp.asarray(model_steps, jnp.int32),
        num_train_steps=int(num_train_steps or n),
    )


def linear_schedule(num_steps: int = 1000, *, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
    """Ho et al. (2020) linear betas. For ``num_steps != 1000`` the endpoints are rescaled by
    ``1000 / num_steps`` so the chain covers the same total noise (as in improved-DDPM).

    References:
      Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError("linear_schedule: expected 0 < beta_start <= beta_end < 1 "
                         f"(a monotone schedule), got {beta_start}, {beta_end}")
    scale = 1000.0 / num_steps
    b0, b1 = beta_start * scale, min(beta_end * scale, 0.999)
    return from_betas(np.linspace(b0, b1, num_steps, dtype=np.float64))


def cosine_schedule(num_steps: int = 1000, *, s: float = 0.008,
                    max_beta: float = 0.999) -> Schedule:
    """Cosine ``abar(t) = cos^2((t/T + s)/(1 + s) * pi/2)`` (Nichol & Dhariwal 2021)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return from_betas(np.asarray(betas))


def respace(schedule: Schedule, use_steps) -> Schedule:
    """Sub-sequence of ``schedule`` keeping positions ``use_steps`` (as in improved-DDPM / DDIM).

    The new betas are ``1 - abar[k_j] / abar[k_{j-1}]`` so the kept positions have exactly the
    original marginals; ``model_steps`` maps each new position to the model's step label.
    An ``int`` means that many evenly spaced steps over the whole chain.

    Every new beta is computed in float64 in the better-conditioned of two forms, so it keeps
    float32 precision (relative error ~1e-7) from ``t_star -> 0`` to ``n = N``:

    - ``-expm1(sum_{k_{j-1} < m <= k_j} log1p(-beta_m))`` (the window product of ``1 - beta_m``)
      when the new beta is below 1/2: then every ``beta_m`` in the window is too, so each
      ``1 - beta_m`` is exact enough, and no difference of nearly equal numbers is formed
      (``1 - abar_j / abar_{j-1}`` loses digits for small betas, ``(1 - abar_j) -
      (1 - abar_{j-1})`` for ``1 - abar`` near 1);
    - ``1 - abar_j / abar_{j-1}`` otherwise, where the ratio is at most 1/2 (and single betas
      near 1, such as the cosine schedule's clipped 0.999, do not enter).

    ``abar`` and ``1 - abar`` at the kept positions are the stored ones, which ``from_betas``
    computed in float64.
    """
    n = schedule.num_steps
    if isinstance(use_steps, int | np.integer):
        if not 1 <= use_steps <= n:
            raise ValueError(f"respace: expected 1..{n} steps, got {use_steps}")
        use_steps = np.unique(np.round(np.linspace(0, n - 1, int(use_steps))).astype(int))
    keep = np.asarray(sorted(set(int(k) for k in np.asarray(use_steps))))
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"respace: expected step indices in [0, {n - 1}], got {use_steps}")
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[keep]
    one_m = np.asarray(schedule.one_minus_alphas_cumprod, np.float64)[keep]
    model_steps = np.asarray(schedule.model_steps)[keep]
    # log prod_{k_{j-1} < m <= k_j} (1 - beta_m): window j is [k_{j-1} + 1, k_j] (j = 0: [0, k_0]).
    log_alphas = np.log1p(-np.asarray(schedule.betas, np.float64))[: keep[-1] + 1]
    starts = np.concatenate([[0], keep[:-1] + 1])
    betas_window = -np.expm1(np.add.reduceat(log_alphas, starts))
    betas_ratio = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    betas = np.where(betas_window < 0.5, betas_window, betas_ratio)
    _validate_betas(betas)
    return _build(betas, abar, one_m, model_steps, schedule.num_train_steps)


def truncated(schedule: Schedule, t_star: float, num_steps: int | None = None) -> Schedule:
    """The first ``t_star`` fraction of ``schedule``, optionally respaced to ``num_steps``.

    This is the chain a DiffPure-style purifier runs: forward to ``t_star`` in closed form, then
    ``num_steps`` reverse steps (e.g. t_star=0.1 of 1000 in 10, 20 or 100 steps).
    """
    last = schedule.step_for_t_star(t_star)
    total = last + 1
    if num_steps is None:
        keep = np.arange(total)
    else:
        if not 1 <= num_steps <= total:
            raise ValueError(f"num_steps: expected 1..{total} for t_star={t_star}, "
                             f"got {num_steps}")
        # evenly spaced with stride (last + 1) / num_steps, always ending at the last forward
        # step: t_star = 0.1 of 1000 in 10 steps keeps positions 9, 19, ..., 99.
        keep = np.round(np.arange(1, num_steps + 1) * total / num_steps).astype(int) - 1
    return respace(schedule, keep)
