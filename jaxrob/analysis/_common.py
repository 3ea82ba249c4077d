"""Helpers shared by the analysis modules (private)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_choice
from jaxrob._types import Array

NORMS = ("linf", "l2")
_TINY = 1e-12


class Static:
    """Wrap a callable so ``jax.jit`` caches on its identity, not on its ``__eq__``.

    ``jax.jit`` caches static arguments by ``__eq__``/``__hash__``; a callable with value-based
    equality (a dataclass, a ``functools.partial``) could then share one compiled function with
    another that computes something else. Identity cannot collide.
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and other.fn is self.fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def check_norm(norm: str) -> str:
    return check_choice(norm, NORMS, "norm")


def check_eps(eps) -> None:
    """``eps`` must be a positive number (skipped for traced values)."""
    if isinstance(eps, jax.core.Tracer):
        return
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps: expected a positive number, got {eps!r}") from None
    if not e > 0:
        raise ValueError(f"eps: expected a positive radius, got {eps!r}")


def check_ball_study(x, *, num, norm, eps, chunk, indices):
    """Checks shared by the eps-ball studies; returns ``(num, chunk, eps, indices)``."""
    from jaxrob._checks import check_images, check_positive_int

    check_images(x, "x")
    num = check_positive_int(num, "num")
    check_norm(norm)
    check_eps(eps)
    if chunk is not None:
        chunk = check_positive_int(chunk, "chunk")
    if indices is None:
        indices = jnp.arange(x.shape[0], dtype=jnp.uint32)
    elif jnp.shape(indices) != (x.shape[0],):
        raise ValueError(f"indices: expected shape ({x.shape[0]},), got {jnp.shape(indices)}")
    return num, chunk, jnp.asarray(eps, jnp.float32), jnp.asarray(indices, jnp.uint32)


def flat_norm(d: Array) -> Array:
    """L2 norm over every axis but the first: (N, ...) -> (N,)."""
    return jnp.sqrt(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1))


def ball_point(key, x_1HWC: Array, eps, norm: str) -> Array:
    """One point uniform in the ``norm`` eps-ball around a single image, clipped to [0, 1].

    L2 points are ``eps * u**(1/D) * g / ||g||`` (``g`` Gaussian, ``u`` uniform), the uniform
    distribution on the ball. Clipping to [0, 1] afterwards can only shorten the displacement.
    """
    if norm == "linf":
        d = jr.uniform(key, x_1HWC.shape, x_1HWC.dtype, -1.0, 1.0) * eps
    else:
        k_dir, k_rad = jr.split(key)
        g = jr.normal(k_dir, x_1HWC.shape, x_1HWC.dtype)
        r = eps * jr.uniform(k_rad, (), x_1HWC.dtype) ** (1.0 / x_1HWC.size)
        d = g * (r / (jnp.sqrt(jnp.sum(jnp.square(g))) + _TINY))
    return jnp.clip(x_1HWC + d, 0.0, 1.0)


def radius(points_ND: Array) -> Array:
    """Mean L2 distance of ``N`` points (rows) to their centroid, a scalar."""
    centred = points_ND - jnp.mean(points_ND, axis=0, keepdims=True)
    return jnp.mean(flat_norm(centred))
