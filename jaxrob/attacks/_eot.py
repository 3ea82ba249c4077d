"""Expectation over Transformation: loss and gradient averaged over the keys of a randomised loss.

Sample ``i`` uses ``fold_in(key, i)``. The samples are a ``jax.vmap`` over keys, run in chunks of
``chunk`` keys by a ``lax.scan`` that accumulates the running sums, so memory holds ``chunk``
gradients at a time whatever ``samples`` is, and the result does not depend on ``chunk`` (up to
float summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrob._types import Images, Key, Labels, PerExample
from jaxrob.attacks._common import as_per_example, check_eot
from jaxrob.attacks._losses import LossFn
from jaxrob.parallel import eot_axis


def _value_and_grad_one(loss_fn: LossFn, x: Images, y: Labels, key: Key):
    def total(x_):
        loss_B = as_per_example(loss_fn(x_, y, key), x_)
        # Examples are independent, so the gradient of the sum is every example's own gradient.
        return jnp.sum(loss_B), loss_B

    (_, loss_B), g = jax.value_and_grad(total, has_aux=True)(x)
    return loss_B, g


def eot_value_and_grad(loss_fn: LossFn, x: Images, y: Labels, key: Key, *, samples: int = 1,
                       chunk: int | None = None, mesh: jax.sharding.Mesh | None = None
                       ) -> tuple[PerExample, Images]:
    """Per-example loss and its input gradient, both averaged over ``samples`` keys.

    ``mean_i loss_fn(x, y, fold_in(key, i))`` and ``mean_i grad_x sum_b loss_fn(...)_b`` for
    ``i = 0 .. samples - 1``. For a deterministic loss this is the plain loss and gradient
    (``samples = 1`` still uses ``fold_in(key, 0)``, not ``key``).

    Args:
      loss_fn: ``loss_fn(x, y, key) -> (B,)``; examples must not interact (no batch statistics).
      x: (B, H, W, C) images.
      y: (B,) int labels.
      key: base key of the samples.
      samples: number of EoT samples.
      chunk: samples evaluated together by one ``vmap`` (must divide ``samples``); None: all.
      mesh: split each chunk of samples over the ``eot`` axis of this mesh, or its ``data``
        axis when it has no ``eot`` axis (a sharding constraint on the samples' indices, for
        use under ``jax.jit``): the EoT samples of one input run on different devices and
        their sum is a cross-device reduction. With a 2-D ``(data, eot)`` mesh
        (``jaxrob.parallel.make_mesh(eot=E)``) the batch stays on ``data`` (e.g. inside
        ``jaxrob.evaluation.evaluate_robustness`` given the same mesh). The chunk must divide
        by the size of that axis. None: no constraint. Sample ``i`` keeps its key
        ``fold_in(key, i)``, so the result is the unsharded one up to summation order.

    Returns:
      ``(loss (B,), grad (B, H, W, C))``, means over the samples.

    Raises:
      ValueError: ``samples`` or ``chunk`` not a positive integer, or ``chunk`` does not divide
        ``samples``, or the mesh axis's size does not divide ``chunk``.

    References:
      Athalye, Engstrom, Ilyas & Kwok, "Synthesizing Robust Adversarial Examples", ICML 2018;
      Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018.
    """
    samples, chunk = check_eot(samples, chunk)
    axis = None if mesh is None else eot_axis(mesh)
    if mesh is not None and chunk % mesh.shape[axis]:
        raise ValueError(f"mesh: the {mesh.shape[axis]} devices of its '{axis}' axis do not "
                         f"divide the EoT chunk of {chunk} samples; pick a chunk that is a "
                         f"multiple of the device count")
    one = lambda k: _value_and_grad_one(loss_fn, x, y, k)

    def body(carry, idx_C):
        loss_sum_B, grad_sum = carry
        if mesh is not None:
            idx_C = jax.lax.with_sharding_constraint(idx_C, NamedSharding(mesh, P(axis)))
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(idx_C)
        loss_CB, grad_C = jax.vmap(one)(keys)
        return (loss_sum_B + jnp.sum(loss_CB, axis=0), grad_sum + jnp.sum(grad_C, axis=0)), None

    init = (jnp.zeros((x.shape[0],), jnp.float32), jnp.zeros_like(x))
    idx_NC = jnp.arange(samples, dtype=jnp.uint32).reshape(samples // chunk, chunk)
    (loss_sum_B, grad_sum), _ = jax.lax.scan(body, init, idx_NC)
    return loss_sum_B / samples, grad_sum / samples


def eot_grad(loss_fn: LossFn, x: Images, y: Labels, key: Key, *, samples: int = 1,
             chunk: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Images:
    """Input gradient of ``sum_b loss_fn(x, y, k)_b`` averaged over ``k = fold_in(key, i)``.

    See :func:`eot_value_and_grad` (this returns its gradient only).

    Args:
      loss_fn: ``loss_fn(x, y, key) -> (B,)``.
      x: (B, H, W, C) images.
      y: (B,) int labels.
      key: base key of the samples.
      samples: number of EoT samples.
      chunk: samples per ``vmap`` (must divide ``samples``); None: all at once.
      mesh: shard the samples over this mesh's ``eot`` (else ``data``) axis (see
        :func:`eot_value_and_grad`).

    Returns:
      (B, H, W, C) mean gradient.
    """
    return eot_value_and_grad(loss_fn, x, y, key, samples=samples, chunk=chunk, mesh=mesh)[1]
