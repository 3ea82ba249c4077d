"""Deterministic, resumable batching of an :class:`ArrayDataset`, on the host or sharded.

The order of one epoch is a permutation that depends only on ``(seed, epoch)``; batches are
consecutive chunks of it. So the examples seen do not depend on the batch size (the
concatenated batches of any batch size are the same sequence), and a run killed after batch
``k`` resumes with ``start_batch=k + 1`` and sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrob._types import Array
from jaxrob.data._readers import ArrayDataset
from jaxrob.parallel import DATA_AXIS


def _check_int(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Number of batches of ``batch_size`` in an epoch of ``n`` examples.

    Args:
      n: number of examples.
      batch_size: examples per batch.
      drop_remainder: drop the last batch when it would be smaller than ``batch_size``.

    Returns:
      ``n // batch_size`` if ``drop_remainder`` else ``ceil(n / batch_size)``.
    """
    n = _check_int(n, "n", minimum=0)
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, *, seed: int, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """Positions of one epoch in the order they are visited.

    Args:
      n: number of examples.
      seed: non-negative integer seed.
      epoch: non-negative epoch number; each epoch gets its own permutation.
      shuffle: False visits ``0, 1, ..., n - 1``.

    Returns:
      int64 array of shape (n,): ``np.random.default_rng([seed, epoch]).permutation(n)``, or
      ``arange(n)`` without shuffling.
    """
    n = _check_int(n, "n", minimum=0)
    seed = _check_int(seed, "seed", minimum=0)
    epoch = _check_int(epoch, "epoch", minimum=0)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    ds: ArrayDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Host (numpy) batches of one epoch of ``ds``.

    Args:
      ds: the dataset.
      batch_size: examples per batch.
      seed: seed of the shuffle; with ``epoch`` it alone fixes the order.
      epoch: epoch number (a new permutation per epoch).
      shuffle: False keeps the dataset order.
      drop_remainder: drop a final batch smaller than ``batch_size``; otherwise it is yielded
        short.
      start_batch: first batch to yield, for resuming mid-epoch (0 <= start_batch <=
        number of batches).

    Returns:
      An iterator of dicts ``image`` (float32 NHWC), ``label`` (int32) and ``index`` (int32
      positions in the unsliced base split, ``ds.indices``), each with a leading batch axis.

    Raises:
      ValueError: bad arguments, or ``drop_remainder`` with fewer than ``batch_size`` examples
        (the epoch would be empty).
    """
    n = len(ds)
    nb = num_batches(n, batch_size, drop_remainder)
    if nb == 0 and n > 0:
        raise ValueError(
            f"{ds.name} {ds.split}: {n} examples make no full batch of "
            f"{batch_size}; use a smaller batch_size or drop_remainder=False"
        )
    start_batch = _check_int(start_batch, "start_batch", minimum=0)
    if start_batch > nb:
        raise ValueError(
            f"start_batch: expected 0..{nb} (batches in this epoch), got {start_batch}"
        )
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    return _batches(ds, order, batch_size, start_batch, nb)


def _batches(ds, order, batch_size, start_batch, nb):
    for b in range(start_batch, nb):
        pos = order[b * batch_size : (b + 1) * batch_size]
        yield {"image": ds.images[pos], "label": ds.labels[pos], "index": ds.indices[pos]}


def sharded_batches(
    ds: ArrayDataset,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """The batches of :func:`iterate_batches`, placed on ``mesh`` split over the ``data`` axis.

    Every batch is a global ``jax.Array`` with sharding ``NamedSharding(mesh, P('data'))``
    (replicated over any other mesh axis). Each process builds only the shards of its own
    devices from the same deterministic host batch, so the same call works on one host or many.

    Args:
      ds: the dataset.
      global_batch_size: examples per global batch; must divide by the size of the mesh's
        ``data`` axis.
      mesh: a mesh with a ``data`` axis (``jaxrob.parallel.make_mesh``).
      seed: see :func:`iterate_batches`.
      epoch: see :func:`iterate_batches`.
      shuffle: see :func:`iterate_batches`.
      drop_remainder: see :func:`iterate_batches`. When False, the last short batch is padded
        to ``global_batch_size`` by repeating its last example, so every batch has one shape
        (no recompilation); ``mask`` marks the padding.
      start_batch: see :func:`iterate_batches`.

    Returns:
      An iterator of dicts ``image``, ``label``, ``index`` (as :func:`iterate_batches`) and
      ``mask`` (bool, False on padded rows), all sharded over ``data``.

    Raises:
      ValueError: the mesh has no ``data`` axis or ``global_batch_size`` does not divide by its
        size; and as :func:`iterate_batches`.
    """
    if DATA_AXIS not in mesh.shape:
        raise ValueError(
            f"mesh: expected an axis named {DATA_AXIS!r}, got axes "
            f"{tuple(mesh.shape)}; build it with jaxrob.parallel.make_mesh"
        )
    n_data = mesh.shape[DATA_AXIS]
    global_batch_size = _check_int(global_batch_size, "global_batch_size", minimum=1)
    if global_batch_size % n_data:
        raise ValueError(
            f"global_batch_size {global_batch_size} does not divide over the "
            f"{n_data} devices of the mesh's {DATA_AXIS!r} axis; use a multiple "
            f"of {n_data}"
        )
    host = iterate_batches(
        ds,
        global_batch_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        start_batch=start_batch,
    )
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return _place(host, global_batch_size, sharding)


def _place(host, global_batch_size, sharding):
    for batch in host:
        k = batch["label"].shape[0]
        mask = np.ones((global_batch_size,), bool)
        if k < global_batch_size:
            mask[k:] = False
            pad = global_batch_size - k
            batch = {
                key: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for key, v in batch.items()
            }
        batch["mask"] = mask
        yield {key: _to_global(v, sharding) for key, v in batch.items()}


def _to_global(x: np.ndarray, sharding: NamedSharding) -> Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
