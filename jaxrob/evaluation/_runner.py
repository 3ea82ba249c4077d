"""The one resumable, sharded chunk runner that every per-example computation goes through.

``run_chunks(fn, data, key=...)`` applies a jitted per-chunk function to a dataset in chunks of
``batch_size`` examples:

* per-example keys: example ``i`` gets ``fold_in(key, data["index"][i])`` (its *global* index),
  so records do not depend on batch size, chunking, device count or restarts;
* padding: the last chunk is padded (repeating its last example) to ``batch_size``, a multiple
  of the device count, so the function compiles once; padded rows are dropped;
* sharding: each chunk is split over the ``data`` axis of the mesh; pytree arguments (models,
  purifiers) are traced and replicated, so new parameters of the same shapes do not recompile;
* resumable: with a :class:`ChunkStore`, every finished chunk is written atomically and
  skipped on rerun; the work still to do is found per example, so a rerun with another
  ``batch_size`` finishes the missing examples instead of recomputing or overlapping;
* progress bar with ETA, and the compute seconds of every chunk kept in the record
  (``"seconds"``, per example), so a resumed run still reports the whole run's time;
* several processes (``jaxrob.parallel.initialize_distributed``): every process calls it with
  the same arguments over one global mesh; each reads only the rows of ``data`` that its own
  devices hold, process 0 alone writes the store, decides (from the store on its disk) which
  chunks are left to do, and hands the finished record to every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrob._jit import filter_jit
from jaxrob._keys import example_keys
from jaxrob.evaluation._store import ChunkStore
from jaxrob.parallel import (
    DATA_AXIS,
    broadcast_from_main,
    data_sharding,
    host_gather,
    is_main_process,
    make_mesh,
    put_rows,
    replicated,
)

SECONDS = "seconds"  # per-example share of its chunk's compute time


class ChunkRun(NamedTuple):
    """What :func:`run_chunks` returns.

    Attributes:
      records: per-example arrays in the order of ``data`` (plus ``"seconds"``).
      wall_s: seconds this call spent computing.
      total_s: compute seconds of every chunk of the record, earlier (resumed) runs included.
      chunks_run: chunks computed by this call.
      chunks_total: chunks of the whole record.
    """

    records: dict[str, np.ndarray]
    wall_s: float
    total_s: float
    chunks_run: int
    chunks_total: int


def _host_array_like(v) -> bool:
    """NumPy arrays, memory maps and objects with ``shape``, ``dtype`` and row indexing
    (``v[int_rows]``) are read row by row; anything else (JAX arrays, lists) is copied."""
    if isinstance(v, jax.Array):
        return False
    return isinstance(v, np.ndarray) or all(hasattr(v, a) for a in ("shape", "dtype", "ndim",
                                                                     "__getitem__"))


def _todo_ranges(done: np.ndarray, n: int, batch_size: int) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of at most ``batch_size`` missing positions, gap-aligned."""
    missing = np.flatnonzero(~done)
    out = []
    i = 0
    while i < missing.size:
        start = int(missing[i])
        stop = start
        while i < missing.size and missing[i] == stop and stop - start < batch_size:
            stop += 1
            i += 1
        out.append((start, stop))
    return out


def _onto_mesh(args, mesh):
    """The arguments' arrays committed to other devices than ``mesh``'s (parameters trained on
    another mesh), replicated over it; the others are left as they are. Arrays are not
    re-placed needlessly: a traced array carrying a mesh sharding cannot be indexed inside a
    ``shard_map`` over another mesh (JAX 0.10), as ``jacobian(..., mesh=)`` does."""
    devices = set(mesh.devices.flat)
    rep = replicated(mesh)

    def place(a):
        if isinstance(a, jax.Array) and a.committed and a.sharding.device_set != devices:
            return jax.device_put(a, rep)
        return a

    return jax.tree.map(place, args)


@filter_jit
def _program(fn, args, batch, key, sharding):
    # ``fn`` is static (the compile cache's key, by identity), ``args`` are traced: a second run
    # of the same fn over new parameters of the same shapes reuses the compilation.
    keys = example_keys(key, batch["index"])
    out = fn(*args, batch, keys)
    if not isinstance(out, Mapping):
        raise TypeError(f"run_chunks: fn must return a dict of per-example arrays, got "
                        f"{type(out).__name__}")
    if sharding is not None:
        out = jax.lax.with_sharding_constraint(dict(out), sharding)
    return out


def run_chunks(fn: Callable[..., Mapping[str, Any]], data: Mapping[str, Any], *, key,
               args: Sequence[Any] = (), batch_size: int = 64,
               store: ChunkStore | None = None, mesh: jax.sharding.Mesh | None = None,
               progress: bool = True, desc: str = "chunks",
               keep: Callable[[str], bool] | None = None,
               log: Callable[[int, int, dict], None] | None = None,
               constrain_out: bool = True) -> ChunkRun:
    """Apply ``fn(*args, batch, keys)`` to ``data`` in resumable, sharded, padded chunks.

    Args:
      fn: ``fn(*args, batch, keys) -> {name: (B, ...) array}``, traced once: ``batch`` holds
        the chunk's rows of every array of ``data``, ``keys`` the (B,) per-example keys
        ``fold_in(key, index)``. Examples must not interact (no batch statistics).
      data: host arrays with a common leading length N; ``data["index"]`` (int) holds each
        example's global index (its key). NumPy arrays (memory maps included) are read only
        row by row, at the rows of a chunk that this process's devices hold (so is any
        object with ``shape``, ``dtype``, ``ndim`` and ``v[int_rows]``).
      key: the run's key.
      args: pytrees passed to ``fn`` first (models, purifiers, attacks); their arrays are
        traced (replicated over the mesh), everything else is static.
      batch_size: examples per chunk, a multiple of the mesh size.
      store: a :class:`ChunkStore`: finished chunks are kept and skipped on rerun (written by
        process 0 only).
      mesh: 1-D ``data`` mesh (default: every device).
      progress: show a progress bar with ETA.
      desc: the progress bar's label.
      keep: which outputs to keep (and store) by name (None: all).
      log: called as ``log(start, stop, outputs)`` after every finished chunk.
      constrain_out: constrain the outputs to the data sharding (off when ``fn`` returns
        arrays whose leading axis is not the chunk's examples).

    Returns:
      A :class:`ChunkRun`.
    """
    from jaxrob._checks import check_positive_int

    if "index" not in data:
        raise ValueError("data: expected an 'index' array of global example indices (their "
                         "keys)")
    data = {k: (v if _host_array_like(v) else np.asarray(v)) for k, v in data.items()}
    data["index"] = np.asarray(data["index"])
    n = int(data["index"].shape[0])
    for k, v in data.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise ValueError(f"data[{k!r}]: expected a leading axis of {n} examples, got shape "
                             f"{v.shape}")
    if not np.issubdtype(data["index"].dtype, np.integer) or data["index"].ndim != 1:
        raise ValueError(f"data['index']: expected a 1-D integer array, got "
                         f"{data['index'].dtype} of shape {data['index'].shape}")
    if n == 0:
        raise ValueError("data: no examples")
    batch_size = check_positive_int(batch_size, "batch_size")
    mesh = mesh or make_mesh()
    ndev = mesh.shape[DATA_AXIS]
    if batch_size % ndev:
        raise ValueError(f"batch_size={batch_size} does not divide over the {ndev} devices; "
                         f"use a multiple of {ndev}")
    shard = data_sharding(mesh)
    args = _onto_mesh(tuple(args), mesh)

    multi = jax.process_count() > 1
    main = is_main_process()
    done = np.zeros(n, bool)
    num_finished = 0
    if store is not None and main:
        finished = store.finished()
        for s, e in finished:
            if e > n:
                raise ValueError(f"{store.directory}: holds chunk [{s}, {e}) beyond the {n} "
                                 "examples of this run; use a new workdir or delete it")
            done[s:e] = True
        num_finished = len(finished)
    if store is not None and multi:  # process 0's store decides, so all run the same chunks
        got = broadcast_from_main({"done": done, "num": np.int64(num_finished)})
        done, num_finished = got["done"].astype(bool), int(got["num"])
    todo = _todo_ranges(done, n, batch_size)
    chunks_total = num_finished + len(todo) if store is not None else len(todo)

    bar = None
    if progress and todo and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(sum(e - s for s, e in todo)), desc=desc, unit="ex",
                   dynamic_ncols=True)
    results: dict[int, dict] = {}
    t_run = time.perf_counter()
    for s, e in todo:
        t0 = time.perf_counter()
        rows = np.minimum(np.arange(s, s + batch_size), e - 1)  # padded: repeat the last
        placed = {k: put_rows(v, rows, mesh) for k, v in data.items() if k != "index"}
        placed["index"] = put_rows(data["index"].astype(np.uint32), rows, mesh)
        out = _program(fn, tuple(args), placed, key, shard if constrain_out else None)
        out = {k: v for k, v in out.items() if keep is None or keep(k)}
        out = {k: v[: e - s] for k, v in host_gather(out).items()}
        out[SECONDS] = np.full((e - s,), (time.perf_counter() - t0) / (e - s), np.float64)
        chunk = {"index": data["index"][s:e], **out}
        if store is not None and main:
            store.save(s, e, **chunk)
        results[s] = chunk
        if bar is not None:
            bar.update(e - s)
        if log is not None:
            log(s, e, out)
    if bar is not None:
        bar.close()
    wall_s = time.perf_counter() - t_run

    if store is not None:
        per = None
        if main:
            per = store.load()
            if sorted(per["position"].tolist()) != list(range(n)):
                raise RuntimeError(f"{store.directory}: finished chunks do not cover the {n} "
                                   "examples exactly")
        if multi:
            per = broadcast_from_main(per)
        order = np.argsort(per.pop("position"), kind="stable")
        records = {k: v[order] for k, v in per.items()}
    else:
        starts = sorted(results)
        records = {k: np.concatenate([results[s][k] for s in starts])
                   for k in results[starts[0]]}
    if not np.array_equal(records["index"], data["index"]):
        raise RuntimeError("run_chunks: the stored record is of other examples than data "
                           "(the store's fingerprint should say which run wrote it)")
    total_s = float(np.nansum(records.get(SECONDS, 0.0)))  # NaN: chunks of older runs
    return ChunkRun(records, wall_s, total_s, len(todo), chunks_total)
