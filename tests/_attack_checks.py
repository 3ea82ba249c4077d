"""Checks the attack tests share: per-example perturbation norms and predicted labels."""

import jax.numpy as jnp
import numpy as np


def norms(d, norm: str) -> np.ndarray:
    """Per-example ``linf`` / ``l2`` / ``l1`` norm of ``d`` (first axis: examples), in float64."""
    d = np.asarray(d, np.float64).reshape(d.shape[0], -1)
    if norm == "linf":
        return np.abs(d).max(1)
    if norm == "l1":
        return np.abs(d).sum(1)
    if norm == "l2":
        return np.sqrt((d**2).sum(1))
    raise ValueError(f"norm: expected 'linf', 'l2' or 'l1', got {norm!r}")


def predictions(logits_fn, x) -> np.ndarray:
    """The labels ``logits_fn(x, None)`` predicts."""
    return np.asarray(jnp.argmax(logits_fn(x, None), axis=1))
