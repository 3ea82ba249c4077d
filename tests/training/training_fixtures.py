"""Tiny Flax models and synthetic data for fast training tests."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class TinyEps(nn.Module):
    """A 2-conv eps-model with a step embedding and dropout: ``model(x, step, train=...)``."""

    features: int = 8

    @nn.compact
    def __call__(self, x, step, train: bool = False):
        freqs = jnp.arange(1, 5, dtype=jnp.float32)[None, :]
        temb = nn.Dense(self.features)(jnp.sin(step.astype(jnp.float32)[:, None] / 100.0 * freqs))
        # dropout on the (B, F) embedding: exercises the dropout key at a fraction of the
        # compile time of a 4-D mask on XLA:CPU
        temb = nn.Dropout(0.1, deterministic=not train)(temb)
        h = nn.Conv(self.features, (3, 3))(x) + temb[:, None, None, :]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


class TinyBNClassifier(nn.Module):
    """Conv -> BatchNorm -> pool -> Dense: ``model(x, train=...)`` with ``batch_stats``."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(8, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = jnp.mean(nn.relu(h), axis=(1, 2))
        return nn.Dense(self.num_classes)(h)


def synthetic_batch(step: int, batch: int = 16, hw: int = 8, channels: int = 1,
                    num_classes: int = 3) -> dict:
    """Deterministic per-step batch: class-dependent brightness plus noise, in [0, 1]."""
    rng = np.random.default_rng(1000 + step)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    base = (labels.astype(np.float32) + 0.5) / num_classes
    x = base[:, None, None, None] + 0.1 * rng.standard_normal((batch, hw, hw, channels))
    return {"image": np.clip(x, 0, 1).astype(np.float32), "label": labels}


def synthetic_batches(start_step: int, **kw):
    step = start_step
    while True:
        yield synthetic_batch(step, **kw)
        step += 1
