"""The training driver: resume, checkpoint cadence, JSON-lines metrics, progress bar.

A run is a pure function of its config: the batch of step ``i`` is a function of ``(seed, i)``
(:func:`step_batches`) and the step's randomness is ``fold_in(key, i)``, so a killed run that is
restarted with the same command continues from its latest checkpoint and ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxrob.parallel import is_main_process, make_mesh, replicated, shard_batch
from jaxrob.training._state import TrainState, abstract_on_mesh, init_on_mesh

log = logging.getLogger("jaxrob.training")

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Append-only JSON-lines metrics (``workdir/metrics.jsonl``), written by process 0 only.

    Args:
      path: the ``.jsonl`` file.
      resume_step: when given, records with ``step > resume_step`` (written by a run that was
        killed after its last checkpoint) are dropped first, so the file describes one run.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        self.enabled = is_main_process()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_step is None:
                self.path.unlink()
            else:
                keep = [ln for ln in self.path.read_text().splitlines()
                        if ln.strip() and _record_step(ln) <= resume_step]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep))
                os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(_plain(record), sort_keys=False) + "\n")


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf


def _plain(record: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, np.generic | np.ndarray | jax.Array):
            v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (empty list when absent)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def step_batches(dataset, batch_size: int, *, seed: int, start_step: int = 0,
                 keys: tuple[str, ...] | None = ("image",)) -> Iterator[dict]:
    """Endless batches, batch ``i`` depending only on ``(seed, i)``; starts at ``start_step``.

    Epoch ``e`` is a fresh shuffle (``jaxrob.data.iterate_batches(..., epoch=e)``) with the
    remainder dropped, so resuming at any step replays exactly the same batches.

    Args:
      dataset: a ``jaxrob.data.ArrayDataset``.
      batch_size: global batch size.
      seed: shuffling seed.
      start_step: first step to produce the batch of.
      keys: which batch entries to keep (None: all).

    Raises:
      ValueError: when the dataset is smaller than one batch.
    """
    from jaxrob.data import iterate_batches

    num = len(dataset.images)
    per_epoch = num // int(batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset "
                         f"({dataset.name} {dataset.split}: {num} examples)")
    epoch, first = divmod(int(start_step), per_epoch)
    while True:
        for batch in iterate_batches(dataset, batch_size, seed=seed, epoch=epoch, shuffle=True,
                                     drop_remainder=True, start_batch=first):
            yield batch if keys is None else {k: batch[k] for k in keys}
        epoch, first = epoch + 1, 0


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.1)


def train_loop(train_step: Callable[[TrainState, dict], tuple[TrainState, dict]],
               init_fn: Callable[[], TrainState],
               batches: Callable[[int], Iterator[dict]], *,
               num_steps: int, workdir: str | os.PathLike | None = None,
               checkpointer=None, mesh: jax.sharding.Mesh | None = None,
               log_every: int = 100, progress: bool | None = None,
               desc: str = "train",
               on_log: Callable[[dict], None] | None = None) -> tuple[TrainState, dict]:
    """Run (or resume) a training run to ``num_steps`` updates.

    * Resume: if ``checkpointer`` has a checkpoint, the state is restored into a template built
      with ``jax.eval_shape(init_fn)`` (nothing allocated twice; fingerprint checked), else
      ``init_fn()`` is run on the mesh.
    * Cadence: ``checkpointer.save`` is offered every step (it writes every ``save_every``) and
      forced at the end.
    * Metrics: every ``log_every`` steps, the mean of each step metric over the interval is
      written to ``workdir/metrics.jsonl`` with ``step``, ``steps_per_s``, ``wall_s`` and
      ``elapsed_s``; a line is logged; a tqdm bar with ETA runs when stderr is a TTY.
    * Only process 0 writes files and the bar.

    Args:
      train_step: jitted ``(state, sharded_batch) -> (state, metrics)`` (state donated).
      init_fn: builds the step-0 state (called under ``jit``/``eval_shape``).
      batches: ``batches(start_step)`` yields host batches from ``start_step`` on.
      num_steps: total number of updates of the run.
      workdir: where ``metrics.jsonl`` goes (None: no file).
      checkpointer: a :class:`jaxrob.checkpoint.Checkpointer` or None.
      mesh: the ``data`` mesh (default: all devices).
      log_every: steps between metric records.
      progress: show the tqdm bar (default: when stderr is a TTY).
      desc: bar / log prefix.
      on_log: called with every metrics record (e.g. extra evaluation).

    Returns:
      ``(state, summary)``; ``summary`` has ``start_step``, ``final_step``, ``resumed``,
      ``steps_run``, ``init_s`` (init or restore, incl. its compilation), ``train_s`` (wall
      time of this invocation's loop), ``compile_s`` (first step incl. compilation),
      ``steps_per_s`` (excluding the first step) and ``last`` (the last metrics record).
    """
    num_steps = int(num_steps)
    if num_steps < 0:
        raise ValueError(f"num_steps: expected >= 0, got {num_steps}")
    if int(log_every) <= 0:
        raise ValueError(f"log_every: expected a positive integer, got {log_every!r}")
    mesh = make_mesh() if mesh is None else mesh
    main = is_main_process()

    t_init = time.perf_counter()
    resumed = checkpointer is not None and checkpointer.latest_step() is not None
    if resumed:
        state = checkpointer.restore(abstract_on_mesh(init_fn, mesh))
        state = jax.device_put(state, replicated(mesh))
        log.info("%s: resumed from checkpoint step %d in %s", desc, int(state.step),
                 checkpointer.directory)
    else:
        state = init_on_mesh(init_fn, mesh)
    start = int(jax.device_get(state.step))
    init_s = time.perf_counter() - t_init
    if start > num_steps:
        raise ValueError(f"checkpoint is at step {start}, beyond num_steps={num_steps}; use a "
                         "fresh workdir or raise the number of steps")

    writer = MetricsWriter(pathlib.Path(workdir) / METRICS_FILE,
                           resume_step=start if resumed else None) if workdir else None
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _progress_bar(num_steps, start, bool(progress) and main and start < num_steps, desc)

    t_loop = time.perf_counter()
    t_first = None
    pending: list[dict] = []
    last_record: dict = {}
    t_interval, steps_interval = time.perf_counter(), 0
    it = batches(start) if start < num_steps else iter(())
    for step in range(start, num_steps):
        batch = shard_batch(next(it), mesh)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        steps_interval += 1
        done = step + 1
        if t_first is None:
            jax.block_until_ready(metrics)
            t_first = time.perf_counter() - t_loop
            log.info("%s: first step (incl. compilation) took %.1f s", desc, t_first)
            t_interval, steps_interval = time.perf_counter(), 0
        if done % int(log_every) == 0 or done == num_steps:
            host = jax.device_get(pending)
            now = time.perf_counter()
            record = {"step": done}
            for k in host[0]:
                record[k] = float(np.mean([float(m[k]) for m in host]))
            rate = steps_interval / (now - t_interval) if steps_interval else float("nan")
            record.update(steps_per_s=rate, wall_s=time.time(), elapsed_s=now - t_loop)
            if writer is not None:
                writer.write(record)
            if on_log is not None:
                on_log(record)
            last_record = record
            msg = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                           if k not in ("step", "wall_s") and isinstance(v, float))
            eta = (num_steps - done) / rate if rate and math.isfinite(rate) else float("nan")
            log.info("%s step %d/%d %s eta=%s", desc, done, num_steps, msg, _hms(eta))
            if bar is not None:
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}")
            pending, t_interval, steps_interval = [], now, 0
            if not math.isfinite(record.get("loss", 0.0)):
                raise FloatingPointError(f"{desc}: loss is {record['loss']} at step {done}; "
                                         "lower the learning rate or check the data")
        if bar is not None:
            bar.update(1)
        if checkpointer is not None and done < num_steps:
            checkpointer.save(done, state)
    if bar is not None:
        bar.close()
    if checkpointer is not None:
        checkpointer.save(num_steps, state, force=True)
        checkpointer.wait()
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t_loop
    steps_run = num_steps - start
    timed = steps_run - 1
    rate = timed / (train_s - t_first) if (t_first is not None and timed > 0
                                           and train_s > t_first) else float("nan")
    summary = {"start_step": start, "final_step": num_steps, "resumed": bool(resumed),
               "steps_run": steps_run, "train_s": train_s,
               "init_s": init_s, "compile_s": t_first if t_first is not None else 0.0,
               "steps_per_s": rate, "last": last_record}
    return state, summary
