"""Toy stand-ins for the protection tests: eps-models and a latent codec, cheap to compile.

* :class:`ToyEps`: a small nonlinear eps-model (channel mixing, tanh, a per-step bias).
* :class:`LinearEps`: ``eps = c * x_t`` (its Jacobian is ``c I``: closed forms).
* :class:`StraightThrough`: an eps-model's value with the identity Jacobian (``z + sg(eps - z)``).
* :class:`ToyCodec`: a linear "autoencoder": 2x2 space-to-depth of ``2x - 1`` then a channel
  mixing ``W`` (4 * C latent channels at half resolution); ``decode`` inverts it exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxrob.diffusion as jd
from jaxrob._pytree import pytree_dataclass

SCHEDULE_STEPS = 100


def schedule():
    return jd.linear_schedule(SCHEDULE_STEPS)


@pytree_dataclass
class ToyEps:
    w: jax.Array  # (C, C)
    b: jax.Array  # (N,)
    schedule: jd.Schedule

    def __call__(self, x_t, step):
        h = jnp.einsum("bhwc,cd->bhwd", x_t, self.w)
        return jnp.tanh(h + self.b[step][:, None, None, None])


def toy_eps(channels: int, seed: int = 0) -> ToyEps:
    rng = np.random.default_rng(seed)
    w = np.eye(channels) * 0.8 + 0.3 * rng.standard_normal((channels, channels))
    b = 0.1 * rng.standard_normal(SCHEDULE_STEPS)
    return ToyEps(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), schedule())


@pytree_dataclass
class LinearEps:
    c: jax.Array
    schedule: jd.Schedule

    def __call__(self, x_t, step):
        return self.c * x_t


@pytree_dataclass
class StraightThrough:
    inner: object

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x_t, step):
        return x_t + jax.lax.stop_gradient(self.inner(x_t, step) - x_t)


def _space_to_depth(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, h // 2, w // 2, 4 * c)


def _depth_to_space(z, c):
    b, h2, w2, _ = z.shape
    return z.reshape(b, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, 2 * h2, 2 * w2, c)


@pytree_dataclass
class ToyCodec:
    w: jax.Array  # (4C, 4C), invertible

    def encode(self, x):
        return jnp.einsum("bhwc,cd->bhwd", _space_to_depth(2.0 * x - 1.0), self.w)

    def decode(self, z):
        c = z.shape[-1] // 4
        s = jnp.einsum("bhwd,dc->bhwc", z, jnp.linalg.inv(self.w))
        return (_depth_to_space(s, c) + 1.0) / 2.0


def toy_codec(channels: int, seed: int = 1, spread: float = 0.3) -> ToyCodec:
    rng = np.random.default_rng(seed)
    d = 4 * channels
    w = np.eye(d) + spread * rng.standard_normal((d, d)) / np.sqrt(d)
    return ToyCodec(jnp.asarray(w, jnp.float32))


def images(batch: int, size: int = 8, channels: int = 1, seed: int = 0, lo: float = 0.0,
           hi: float = 1.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(lo, hi, (batch, size, size, channels)), jnp.float32)
