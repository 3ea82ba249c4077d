"""The continuous variance-preserving SDE (Song et al. 2021) and its reverse-time steps.

``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw``, ``beta(t) = beta_min + t (beta_max - beta_min)``,
``t in [0, 1]``. With beta_min = 0.1, beta_max = 20 it is the continuous limit of Ho et al.'s
1000-step linear chain (``beta_n = beta(n / (N - 1)) / N``).
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from jaxrob._types import Array


def _bcast(v: Array, like: Array) -> Array:
    v = jnp.asarray(v, like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


@flax.struct.dataclass
class VPSDE:
    """VP-SDE coefficients. ``t`` may be a scalar or a (B,) array everywhere."""

    beta_min: float = flax.struct.field(pytree_node=False, default=0.1)
    beta_max: float = flax.struct.field(pytree_node=False, default=20.0)
    num_train_steps: int = flax.struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError("VPSDE: expected 0 < beta_min < beta_max (monotone beta(t)), "
                             f"got beta_min={self.beta_min}, beta_max={self.beta_max}")

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Array) -> Array:
        """``log m(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min``."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_mean_coeff(self, t: Array) -> Array:
        """``m(t)`` with ``x_t | x_0 ~ N(m(t) x_0, s(t)^2 I)``."""
        return jnp.exp(self.log_mean_coeff(t))

    def marginal_std(self, t: Array) -> Array:
        """``s(t) = sqrt(1 - m(t)^2)``."""
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_mean_coeff(t)))

    def drift(self, x: Array, t: Array) -> Array:
        return -0.5 * _bcast(self.beta(t), x) * x

    def diffusion(self, t: Array) -> Array:
        return jnp.sqrt(self.beta(t))

    def model_step(self, t: Array) -> Array:
        """Label for an eps-model trained on the discrete chain: ``t (N - 1)`` (float)."""
        return t * (self.num_train_steps - 1)

    def eps_to_score(self, eps: Array, t: Array) -> Array:
        return -eps / _bcast(self.marginal_std(t), eps)

    def marginal_sample(self, x0: Array, t: Array, noise: Array) -> Array:
        return _bcast(self.marginal_mean_coeff(t), x0) * x0 + _bcast(
            self.marginal_std(t), x0) * noise

    def reverse_sde_step(self, x: Array, t: Array, dt: float, score: Array,
                         noise: Array) -> Array:
        """Euler-Maruyama step of the reverse SDE from ``t`` to ``t - dt`` (``dt > 0``).

        ``x' = x - [f(x, t) - g(t)^2 score] dt + g(t) sqrt(dt) z``.
        """
        g = _bcast(self.diffusion(t), x)
        return x - (self.drift(x, t) - g**2 * score) * dt + g * jnp.sqrt(dt) * noise

    def ode_step(self, x: Array, t: Array, dt: float, score: Array) -> Array:
        """Euler step of the probability-flow ODE ``dx = [f - g^2 score / 2] dt`` backwards."""
        g = _bcast(self.diffusion(t), x)
        return x - (self.drift(x, t) - 0.5 * g**2 * score) * dt
