"""The continuous variance-preserving SDE (Song et al. 2021) and its reverse-time steps.

``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw``, ``beta(t) = beta_min + t (beta_max - beta_min)``,
``t in [0, 1]``. With beta_min = 0.1, beta_max = 20 it is the continuous limit of Ho et al.'s
1000-step linear chain (``beta_n = beta(n / (N - 1)) / N``).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

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

    @classmethod
    def from_schedule(cls, schedule) -> VPSDE:
        """The VP-SDE whose linear ``beta(t)`` is the continuous limit of a discrete linear
        schedule: ``beta_min = N beta_1``, ``beta_max = N beta_N`` over the model's
        ``N = num_train_steps`` (score_sde's correspondence; Ho et al.'s 1e-4..0.02 over 1000
        steps gives 0.1..20).

        ``schedule`` is the training schedule or a respaced / truncated chain of it (then the
        linear training betas are recovered from its ``alphas_cumprod`` at ``model_steps``), and
        concrete (build purifiers outside ``jit``). A cosine or any other non-linear schedule is
        refused: it has no VP-SDE with a linear ``beta(t)``, and the SDE / ODE samplers would
        silently run another noise process than the model was trained on.
        """
        try:
            abar, steps = (np.asarray(jax.device_get(a), np.float64)
                           for a in (schedule.alphas_cumprod, schedule.model_steps))
        except jax.errors.ConcretizationTypeError as e:  # traced schedule
            raise ValueError("VPSDE.from_schedule: expected a concrete schedule (build the "
                             "purifier / sampler outside jit)") from e
        n_train = int(schedule.num_train_steps)
        if n_train < 2:
            raise ValueError(f"VPSDE.from_schedule: expected >= 2 training steps, got {n_train}")
        k = np.arange(n_train, dtype=np.float64) / (n_train - 1)

        def log_abar(b):  # log abar at every training step of linear betas b0..b1
            return np.cumsum(np.log1p(-(b[0] + (b[1] - b[0]) * k)))[steps.astype(int)]

        target = np.log(abar)
        # Gauss-Newton on (b0, b1): log abar is nearly linear in them
        b = np.array([1e-4, 0.02]) * 1000.0 / n_train
        for _ in range(20):
            r = log_abar(b) - target
            jac = np.stack([(log_abar(b + d) - log_abar(b - d)) / 2e-9
                            for d in np.eye(2) * 1e-9], axis=1)
            b = np.clip(b - np.linalg.lstsq(jac, r, rcond=None)[0], 1e-12, 0.999)
        err = float(np.max(np.abs(log_abar(b) - target)))
        if not err <= 1e-4 or not b[0] <= b[1]:
            raise ValueError("VPSDE.from_schedule: the VP-SDE samplers ('sde' / 'ode') need a "
                             "linear beta schedule; the closest linear schedule misses this "
                             f"one's log alphas_cumprod by {err:.3g} (e.g. a cosine "
                             "schedule): use the 'ddpm' or 'ddim' sampler")
        r7 = lambda v: float(f"{v * n_train:.7g}")  # drop the fit's float noise
        return cls(beta_min=r7(b[0]), beta_max=r7(b[1]), num_train_steps=n_train)

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
