"""Random model variables without running ``module.init``.

``module.init`` runs the model's forward pass and one threefry draw per parameter. Eagerly that
dispatches (and compiles) hundreds of small programs; jitted, LLVM spends minutes on the
unrolled threefry code (the digits UNet: ~12 s eager, ~30-120 s eager with the fast_vjp ops,
~90 s to compile under ``jax.jit`` on a 2-core CPU). Smoke runs, timings and tests need
parameters of the right structure and a sensible scale, not flax's initialisers:
:func:`random_variables` takes the structure from ``jax.eval_shape(module.init, ...)`` (no
compilation, ~1 s) and fills it from a seeded NumPy generator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(module, *args, seed: int = 0, **kwargs) -> dict:
    """Variables of ``module`` (as ``module.init(key, *args, **kwargs)`` would return them).

    Kernels ~ N(0, 1 / fan_in) (fan_in: the product of all but the last axis), embeddings and
    other parameters ~ N(0, 1), biases ~ N(0, 0.1^2), normalisation scales ~ 1 + N(0, 0.1^2),
    batch statistics: means 0, variances 1. Deterministic in ``seed``.
    """
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        collection = str(getattr(path[0], "key", path[0]))
        shape, dtype = leaf.shape, leaf.dtype
        if collection == "batch_stats":
            return jnp.full(shape, 1.0 if name == "var" else 0.0, dtype)
        z = rng.standard_normal(shape)
        if name == "kernel":
            z = z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "bias":
            z = 0.1 * z
        elif name == "scale":
            z = 1.0 + 0.1 * z
        return jnp.asarray(z, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
