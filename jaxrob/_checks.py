"""Input validation at public boundaries.

Checks run on concrete (host) values only; inside a trace they check what is static (rank, shape,
dtype) and skip value checks, so validated functions stay jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_images(
    x,
    name: str = "x",
    *,
    channels: int | None = None,
    hw: tuple[int, int] | None = None,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> None:
    """Raise ``ValueError`` unless ``x`` is a float32 NHWC batch with values in ``value_range``.

    Args:
      x: the array to check.
      name: how the error message names the argument.
      channels: expected channel count, or None for any.
      hw: expected (height, width), or None for any.
      value_range: inclusive range that concrete values must lie in (None skips the check).
    """
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name}: expected a float32 array of shape (batch, height, width, "
                        f"channels), got {type(x).__name__}")
    if len(shape) != 4:
        raise ValueError(f"{name}: expected rank 4 (batch, height, width, channels) NHWC, "
                         f"got shape {tuple(shape)}")
    if dtype != jnp.float32:
        raise ValueError(f"{name}: expected dtype float32, got {dtype}")
    if channels is not None and shape[-1] != channels:
        raise ValueError(f"{name}: expected {channels} channels (NHWC, last axis), "
                         f"got shape {tuple(shape)}")
    if hw is not None and tuple(shape[1:3]) != tuple(hw):
        raise ValueError(f"{name}: expected height x width {hw[0]}x{hw[1]}, "
                         f"got shape {tuple(shape)}")
    # values of arrays only: an array-like that is not one (jaxrob.data.LazyImages, decoded
    # on first access) is checked by shape and dtype, without reading every row
    if _is_concrete(x) and isinstance(x, np.ndarray | jax.Array | np.generic):
        arr = np.asarray(x)
        if np.isnan(arr).any():
            raise ValueError(f"{name}: contains NaN")
        if value_range is not None and arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            if lo < value_range[0] or hi > value_range[1]:
                raise ValueError(f"{name}: expected values in [{value_range[0]}, "
                                 f"{value_range[1]}], got min {lo:.4g}, max {hi:.4g}")


def check_t_star(t_star) -> float:
    """Return ``t_star`` as a float after checking it lies in (0, 1]."""
    try:
        t = float(t_star)
    except (TypeError, ValueError):
        raise TypeError(f"t_star: expected a number in (0, 1], got {t_star!r}") from None
    if not (0.0 < t <= 1.0) or np.isnan(t):
        raise ValueError(f"t_star: expected a fraction of the forward process in (0, 1] "
                         f"(DiffPure's t=100 of 1000 is t_star=0.1), got {t_star!r}")
    return t


def check_choice(value: str, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    return value


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)
