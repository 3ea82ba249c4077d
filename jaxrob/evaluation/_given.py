"""Scoring adversarial inputs computed elsewhere (AutoAttack's host loop, a stored run).

:func:`score_adversarial` purifies and predicts ``x`` and a given ``x_adv`` exactly as
:func:`jaxrob.evaluation.evaluate_robustness` scores its own attack's result: example ``i``'s
clean purifications use ``fold_in(fold_in(k_i, CLEAN), v)``, its adversarial ones
``fold_in(fold_in(k_i, ADV), v)`` (``k_i = fold_in(key, index_i)``; the fixed / forward_lock keys
``fold_in(k_i, FIXED)``), so for a deterministic attack the two records are identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_images
from jaxrob._types import DatasetImages, Images, Key, Labels
from jaxrob.evaluation._protocols import predictions
from jaxrob.evaluation._robust import (
    Model,
    _check_labels,
    _check_splits,
    _fold_all,
    _num_samples,
    _self_check,
    host_images,
    score_record,
)
from jaxrob.evaluation._runner import run_chunks
from jaxrob.evaluation._store import ChunkStore
from jaxrob.parallel import DATA_AXIS


def _given_chunk(defended, protocols, randomness, vote_chunk, batch, keys):
    num = _num_samples(protocols, randomness)
    fixed_B = _fold_all(keys, tags.FIXED)
    model = (lambda xx, _keys: defended(xx, fixed_B)) if randomness == "fixed" else defended
    lock = randomness == "forward_lock"

    def pred(xx, tag):
        return predictions(model, xx, _fold_all(keys, tag), num=num, chunk=vote_chunk,
                           forward_keys=fixed_B if lock else None).T

    x, x_adv = batch["x"], batch["x_adv"]
    d = (x_adv - x).reshape(x.shape[0], -1)
    return {"pred_clean": pred(x, tags.CLEAN), "pred_adv": pred(x_adv, tags.ADV),
            "linf": jnp.max(jnp.abs(d), -1), "l2": jnp.sqrt(jnp.sum(d * d, -1))}


def score_adversarial(defended: Model, x: DatasetImages, x_adv: Images, y: Labels, indices, *,
                      key: Key, protocols=("one_shot",), randomness: str = "stochastic",
                      batch_size: int = 64, store: ChunkStore | None = None,
                      mesh: jax.sharding.Mesh | None = None, vote_chunk: int | None = None,
                      progress: bool = True, log: Callable[[str], None] | None = None,
                      self_check: int = 4) -> dict:
    """Clean and robust accuracy of given adversarial inputs under named protocols.

    The scoring half of :func:`jaxrob.evaluation.evaluate_robustness` for an ``x_adv`` that was
    computed outside its chunk program (e.g. by :func:`jaxrob.attacks.autoattack`, whose host
    loop cannot run inside one): the same keys, protocols, randomness modes, resumable chunks.

    Args:
      defended: ``defended(x, keys) -> logits`` (as :func:`robust_scores`).
      x: (N, H, W, C) clean images in [0, 1]; x_adv: their adversarial versions (same shape).
      y: (N,) labels; indices: (N,) global example indices (their keys).
      key: the run's key (the one the attack's per-example keys came from, for a record that
        matches an :func:`evaluate_robustness` run of the same attack).
      protocols, randomness, batch_size, store, mesh, vote_chunk, progress: as
        :func:`evaluate_robustness`.
      log: called with a line per finished chunk.
      self_check: recompute the first clean prediction of this many examples outside the chunk
        program and compare, as :func:`evaluate_robustness` does (0: off).

    Returns:
      ``{"clean": {protocol: summary}, "adv": {protocol: summary}, "per_example": {...},
      "randomness", "protocols", "wall_s", "total_s", "chunks_run", "chunks_total",
      "self_check"}``;
      ``per_example`` holds ``index``, ``label``, ``pred_clean`` / ``pred_adv`` (N, num),
      ``linf``, ``l2``, ``seconds`` and the per-protocol scores.

    Raises:
      ValueError: images outside [0, 1] or of different shapes, labels or indices of another
        length, an unknown protocol or randomness mode (before any work).
    """
    check_images(x, "x")
    check_images(x_adv, "x_adv")
    if tuple(x.shape) != tuple(x_adv.shape):
        raise ValueError(f"x_adv: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape)}")
    n = x.shape[0]
    labels, indices = _check_labels(y, indices, n, names=("y", "indices"))
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    _num_samples(protocols, randomness)
    _check_splits(defended, randomness)

    def log_chunk(s, e, out):
        if log is not None:
            acc = lambda p: float((p[:, 0] == labels[s:e]).mean())
            log(f"chunk [{s}, {e}): one-shot clean {acc(out['pred_clean']):.3f}, adv "
                f"{acc(out['pred_adv']):.3f}")

    run = run_chunks(
        _given_chunk, {"x": host_images(x), "x_adv": np.asarray(x_adv, np.float32),
                       "y": labels.astype(np.int32), "index": indices},
        key=key, args=(defended, protocols, randomness, vote_chunk), batch_size=batch_size,
        store=store, mesh=mesh, progress=progress, desc=f"scoring ({randomness})",
        log=log_chunk)
    per = run.records
    per["label"] = labels
    ndev = mesh.shape[DATA_AXIS] if mesh is not None else jax.device_count()
    check = _self_check(defended, x, labels, indices, per["pred_clean"][:, 0],
                        key=key, randomness=randomness, num=self_check,
                        stride=max(1, min(batch_size, n) // ndev))
    if check["mismatches"]:
        warnings.warn(f"score_adversarial: self-check failed: the chunk program's clean "
                      f"predictions differ from a single-device recomputation at examples "
                      f"{check['mismatches']} (docs/known_faults.md)", RuntimeWarning,
                      stacklevel=2)
    return {**score_record(per, protocols, randomness), "per_example": per,
            "randomness": randomness, "protocols": list(protocols), "wall_s": run.wall_s,
            "total_s": run.total_s, "chunks_run": run.chunks_run,
            "chunks_total": run.chunks_total, "self_check": check}
