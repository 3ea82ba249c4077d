"""Samplers: ``lax.scan`` over a static step grid, all noise derived from one key.

The noise of reverse step ``n`` is ``normal(fold_in(key, n))`` so a sampler is a pure function of
``(x, key)``: the same key replays the same randomness whatever the batch size or chunking
(callers fold example indices into ``key`` before vmapping when they need per-example noise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_choice, check_positive_int, check_t_star
from jaxrob._types import Array, EpsFn, Key
from jaxrob.diffusion._reverse import ddim_step, ddpm_step
from jaxrob.diffusion._schedules import Schedule
from jaxrob.diffusion._vpsde import VPSDE

SAMPLERS = ("ddpm", "ddim", "sde", "ode")


def step_noise(key: Key, n, like: Array) -> Array:
    """Standard normal noise of reverse step ``n``: ``normal(fold_in(key, n))``."""
    return jr.normal(jr.fold_in(key, n), like.shape, like.dtype)


def _scan(body, x, xs, *, remat: bool, unroll: int | bool, return_trajectory: bool):
    if remat:
        body = jax.checkpoint(body)

    def f(carry, inp):
        out = body(carry, inp)
        return out, (out if return_trajectory else None)

    x_final, traj = jax.lax.scan(f, x, xs, unroll=unroll)
    return (x_final, traj) if return_trajectory else x_final


def ddpm_sample(eps_fn: EpsFn, x_N: Array, key: Key, schedule: Schedule, *,
                variance: str = "fixed_small", clip_x0: bool = False, remat: bool = False,
                unroll: int | bool = 1, return_trajectory: bool = False):
    """Ancestral DDPM sampling from position ``N - 1`` of ``schedule`` down to x_0.

    Args:
      eps_fn: ``eps_fn(x_t, model_step) -> eps`` with ``model_step`` an int32 (B,) array of the
        model's step labels (``schedule.model_steps``).
      x_N: state at the last position of ``schedule`` (diffusion space).
      key: randomness of every reverse step (``fold_in(key, n)``).
      schedule: the chain to reverse (full, respaced or truncated).
      variance: ``"fixed_small"`` or ``"fixed_large"``.
      clip_x0: clip the implied x0 to [-1, 1] at every step.
      remat: ``jax.checkpoint`` each step (bounded memory under reverse-mode).
      unroll: passed to ``lax.scan``.
      return_trajectory: also return the states after every step, shape (N, B, ...).

    Returns:
      x_0, or ``(x_0, trajectory)``.
    """
    batch = x_N.shape[0]

    def body(x, n):
        eps = eps_fn(x, jnp.broadcast_to(schedule.model_steps[n], (batch,)))
        return ddpm_step(x, n, eps, step_noise(key, n, x), schedule, variance=variance,
                         clip_x0=clip_x0)

    ns = jnp.arange(schedule.num_steps - 1, -1, -1)
    return _scan(body, x_N, ns, remat=remat, unroll=unroll, return_trajectory=return_trajectory)


def ddim_sample(eps_fn: EpsFn, x_N: Array, key: Key, schedule: Schedule, *, eta: float = 0.0,
                clip_x0: bool = False, remat: bool = False, unroll: int | bool = 1,
                return_trajectory: bool = False):
    """DDIM sampling over the positions of ``schedule`` (respace it for fewer steps).

    ``eta = 0`` is deterministic (``key`` unused); ``eta = 1`` matches DDPM's variance. Other
    arguments as :func:`ddpm_sample`.
    """
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    batch = x_N.shape[0]

    def body(x, n):
        eps = eps_fn(x, jnp.broadcast_to(schedule.model_steps[n], (batch,)))
        noise = step_noise(key, n, x) if eta > 0 else jnp.zeros_like(x)
        return ddim_step(x, n, eps, noise, schedule, eta=eta, clip_x0=clip_x0)

    ns = jnp.arange(schedule.num_steps - 1, -1, -1)
    return _scan(body, x_N, ns, remat=remat, unroll=unroll, return_trajectory=return_trajectory)


def vpsde_sample(eps_fn: EpsFn, x_T: Array, key: Key, sde: VPSDE, *, t_start: float = 1.0,
                 num_steps: int = 1000, method: str = "sde", t_end: float = 0.0,
                 remat: bool = False, unroll: int | bool = 1, return_trajectory: bool = False):
    """Integrate the reverse VP-SDE (Euler-Maruyama) or probability-flow ODE (Euler).

    Uniform grid ``t_k = t_start - k (t_start - t_end) / num_steps``; the score at ``t_k`` is
    ``-eps_fn(x, sde.model_step(t_k)) / s(t_k)``. The eps-model gets float step labels.

    Args:
      eps_fn: ``eps_fn(x_t, model_step) -> eps`` (``model_step`` float32 (B,)).
      x_T: state at ``t_start``.
      key: noise of step k is ``normal(fold_in(key, k))`` (unused by the ODE).
      sde: the :class:`VPSDE`.
      t_start: start time in (0, 1] (DiffPure's t_star).
      num_steps: number of Euler(-Maruyama) steps.
      method: ``"sde"`` or ``"ode"``.
      t_end: final time (>= 0, < t_start).
      remat, unroll, return_trajectory: as :func:`ddpm_sample`.
    """
    check_choice(method, ("sde", "ode"), "method")
    t_start = check_t_star(t_start)
    num_steps = check_positive_int(num_steps, "num_steps")
    if not 0.0 <= t_end < t_start:
        raise ValueError(f"t_end: expected 0 <= t_end < t_start={t_start}, got {t_end}")
    dt = (t_start - t_end) / num_steps
    batch = x_T.shape[0]

    def body(x, k):
        t = t_start - k * dt
        tb = jnp.broadcast_to(t, (batch,)).astype(x.dtype)
        score = sde.eps_to_score(eps_fn(x, sde.model_step(tb)), tb)
        if method == "ode":
            return sde.ode_step(x, tb, dt, score)
        return sde.reverse_sde_step(x, tb, dt, score, step_noise(key, k, x))

    ks = jnp.arange(num_steps)
    return _scan(body, x_T, ks, remat=remat, unroll=unroll, return_trajectory=return_trajectory)


def generate(eps_fn: EpsFn, key: Key, shape: tuple[int, ...], schedule: Schedule, *,
             sampler: str = "ddpm", **kwargs) -> Array:
    """Unconditional samples (diffusion space) from pure noise at the end of ``schedule``.

    ``sampler`` is ``"ddpm"``/``"ddim"`` (over ``schedule``) or ``"sde"``/``"ode"`` (from t = 1
    with ``num_steps = schedule.num_steps`` unless given, on ``sde=`` or else the VP-SDE of the
    linear training schedule, :meth:`VPSDE.from_schedule`).
    """
    check_choice(sampler, SAMPLERS, "sampler")
    k_init, k_steps = jr.split(key)
    x = jr.normal(k_init, shape, jnp.float32)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, x, k_steps, schedule, **kwargs)
    if sampler == "ddim":
        return ddim_sample(eps_fn, x, k_steps, schedule, **kwargs)
    kwargs.setdefault("num_steps", schedule.num_steps)
    sde = kwargs.pop("sde", None) or VPSDE.from_schedule(schedule)
    return vpsde_sample(eps_fn, x, k_steps, sde, method=sampler, **kwargs)
