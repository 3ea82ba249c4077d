"""Checkpoints: the only module in jaxrob that talks to orbax.

Two kinds of files are written:

* **Run checkpoints** (:class:`Checkpointer`): the whole train state (params, optimizer state,
  EMA, step, key) every ``save_every`` steps and at the end, the last ``max_to_keep`` kept, in
  ``workdir/checkpoints/<step>/``. Each one also stores a *fingerprint*, the JSON of the
  model/diffusion configuration that made it; restoring a checkpoint with another fingerprint
  raises ``ValueError`` listing expected vs found. Rerunning a killed command restores the
  latest complete checkpoint and continues.
* **Exports** (:func:`save_params` / :func:`load_params`): a small directory with one params
  pytree (e.g. EMA params) and a JSON metadata dict (config, metrics). These are what gets
  committed under ``checkpoints/``.

Crash safety comes from orbax: every checkpoint is written into
``<step>.orbax-checkpoint-tmp-<timestamp>/`` and renamed to ``<step>/`` only once complete, and
unfinished tmp directories are never listed as steps. A process killed mid-save (even by
``kill -9``) therefore leaves at most a tmp directory that is ignored (and removed by the next
:class:`Checkpointer` opened on that directory). Arrays are stored with
``ocp.args.StandardSave`` (tensorstore/OCDBT), never pickled.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "Checkpointer",
    "abstract_like",
    "fingerprint_diff",
    "load_params",
    "normalize_fingerprint",
    "read_metadata",
    "save_params",
]

_STATE = "state"
_FINGERPRINT = "fingerprint"
_PARAMS = "params"
_METADATA = "metadata"


# ----------------------------------------------------------------------------- fingerprints


def normalize_fingerprint(fingerprint: Mapping[str, Any] | None) -> dict | None:
    """The JSON form of a fingerprint (tuples become lists, keys sorted, numpy scalars plain).

    Comparing normalised fingerprints is comparing what was written to disk.
    """
    if fingerprint is None:
        return None
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint: expected a mapping (e.g. config.to_dict()), got "
                        f"{type(fingerprint).__name__}")

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=default))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def fingerprint_diff(expected: Mapping | None, found: Mapping | None) -> list[str]:
    """Human-readable differences ``"key: expected X, found Y"`` between two fingerprints."""
    e = _flatten(normalize_fingerprint(expected) or {})
    f = _flatten(normalize_fingerprint(found) or {})
    missing = object()
    lines = []
    for k in sorted(set(e) | set(f)):
        a, b = e.get(k, missing), f.get(k, missing)
        if a != b:
            a_s = "<absent>" if a is missing else json.dumps(a)
            b_s = "<absent>" if b is missing else json.dumps(b)
            lines.append(f"{k}: expected {a_s}, found {b_s}")
    return lines


# ----------------------------------------------------------------------------- templates


def abstract_like(tree, sharding: jax.sharding.Sharding | None = None):
    """``jax.ShapeDtypeStruct`` leaves for ``tree`` (arrays or abstract values).

    Args:
      tree: a pytree of arrays or ``ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      sharding: sharding given to every leaf that has none (default: keep what each leaf has;
        leaves without one are restored on the default device).

    Returns:
      The restore template that :meth:`Checkpointer.restore` takes.
    """

    def leaf(x):
        s = getattr(x, "sharding", None)
        if sharding is not None and s is None:
            s = sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, tree)


# ----------------------------------------------------------------------------- run checkpoints


class Checkpointer:
    """Periodic, crash-safe train-state checkpoints of one run, tagged with a fingerprint.

    Example::

        ckpt = Checkpointer(workdir / "checkpoints", fingerprint=config.model.to_dict(),
                            save_every=500)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(abstract_like(jax.eval_shape(init_fn), replicated))
        ...
        ckpt.save(step, state)            # writes only when step % save_every == 0
        ckpt.save(step, state, force=True)
        ckpt.close()

    Args:
      directory: where the numbered step directories live (created if missing).
      fingerprint: JSON-able mapping describing what the state belongs to (model and diffusion
        configuration). Saved with every checkpoint and checked on restore.
      save_every: :meth:`save` writes when ``step % save_every == 0`` (or ``force=True``).
      max_to_keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread (``wait`` / ``close`` block until done).

    Raises:
      ValueError: for a non-positive ``save_every`` or ``max_to_keep``.
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Mapping | None = None,
                 save_every: int = 1000, max_to_keep: int = 3, async_save: bool = False):
        if isinstance(save_every, bool) or int(save_every) != save_every or save_every <= 0:
            raise ValueError(f"save_every: expected a positive integer, got {save_every!r}")
        if isinstance(max_to_keep, bool) or int(max_to_keep) != max_to_keep or max_to_keep <= 0:
            raise ValueError(f"max_to_keep: expected a positive integer, got {max_to_keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = normalize_fingerprint(fingerprint)
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=bool(async_save),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is on the ``save_every`` cadence."""
        return int(step) % self.save_every == 0

    def read_fingerprint(self, step: int | None = None) -> dict | None:
        """The fingerprint stored with checkpoint ``step`` (default: the latest)."""
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_FINGERPRINT: ocp.args.JsonRestore()}))
        fp = restored[_FINGERPRINT]
        return fp.get("config") if isinstance(fp, Mapping) else None

    def check_fingerprint(self, step: int | None = None) -> None:
        """Raise ``ValueError`` if checkpoint ``step`` was made with another configuration."""
        if self.fingerprint is None:
            return
        step = self._resolve_step(step)
        found = self.read_fingerprint(step)
        if found != self.fingerprint:
            diff = fingerprint_diff(self.fingerprint, found)
            raise ValueError(
                f"checkpoint {self.directory / str(step)} was made with another model "
                "configuration; refusing to restore it (use a fresh --workdir, or the config "
                "that wrote it).\n  " + "\n  ".join(diff[:20])
                + ("\n  ..." if len(diff) > 20 else "")
                + f"\nexpected: {json.dumps(self.fingerprint, sort_keys=True)}"
                + f"\nfound:    {json.dumps(found, sort_keys=True)}")

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(f"no complete checkpoint for step {step} under "
                                    f"{self.directory} (have {self.all_steps()})")
        return int(step)

    # -- save / restore
    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save ``state`` as checkpoint ``step`` if it is due (or ``force``); True if written.

        Saving a step that already exists is a no-op (returns False).
        """
        step = int(step)
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        if jax.process_count() == 1:
            # One host: copy to numpy first. Orbax then writes host arrays directly, ~3x faster
            # than its per-array device-to-host path for the hundreds of small leaves of a
            # train state; restore still places them with the template's shardings.
            state = jax.device_get(state)
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _FINGERPRINT: ocp.args.JsonSave({"config": self.fingerprint}),
        })
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, template, *, step: int | None = None):
        """Restore checkpoint ``step`` (default: the latest) into the structure of ``template``.

        Args:
          template: pytree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_like`) or arrays with
            the shapes, dtypes and shardings to restore to; build it with ``jax.eval_shape`` so
            nothing is allocated twice.
          step: which checkpoint; None for the latest.

        Returns:
          The restored pytree.

        Raises:
          FileNotFoundError: when there is no (complete) checkpoint.
          ValueError: when the checkpoint's fingerprint differs from this Checkpointer's, or its
            arrays do not fit ``template``.
        """
        step = self._resolve_step(step)
        self.check_fingerprint(step)
        template = abstract_like(template)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(template)}))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {self.directory / str(step)} does not fit the "
                             f"template state: {e}") from e
        return restored[_STATE]

    def wait(self) -> None:
        """Block until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- exports


def _jsonable(metadata: Mapping | None) -> dict:
    return normalize_fingerprint(metadata or {}) or {}


def save_params(directory: str | os.PathLike, params, metadata: Mapping | None = None, *,
                overwrite: bool = False) -> pathlib.Path:
    """Export one params pytree plus a JSON metadata dict to ``directory`` (written atomically).

    The pytree is copied to host numpy first, so an export restores on any device count.
    ``directory`` then holds ``params/`` (OCDBT arrays) and ``metadata/metadata`` (JSON).

    Args:
      directory: export directory (must not exist unless ``overwrite``).
      params: the pytree to store (e.g. EMA params).
      metadata: JSON-able dict (model config, training config, metrics, versions).
      overwrite: replace an existing export. The new one is written beside it and swapped in,
        so an interrupted overwrite leaves the old or the new export, never a mixture.

    Returns:
      The export directory.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    host_params = jax.tree.map(np.asarray, jax.device_get(params))
    target = directory.with_name(f"{directory.name}.new-{os.getpid()}") if directory.exists() \
        else directory
    if target.exists():
        shutil.rmtree(target)
    ck = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ck.save(target, args=ocp.args.Composite(**{
        _PARAMS: ocp.args.StandardSave(host_params),
        _METADATA: ocp.args.JsonSave(_jsonable(metadata)),
    }))
    ck.close()
    if target != directory:
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(target, directory)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def load_params(directory: str | os.PathLike, template=None) -> tuple[Any, dict]:
    """Load an export written by :func:`save_params`.

    Args:
      directory: the export directory.
      template: optional pytree (arrays or ``ShapeDtypeStruct`` with shardings) to restore into;
        without it the params come back as host numpy arrays.

    Returns:
      ``(params, metadata)``.

    Raises:
      FileNotFoundError: when ``directory`` holds no complete export.
    """
    directory = pathlib.Path(directory).absolute()
    if not (directory / _PARAMS).is_dir() or not (directory / _METADATA).is_dir():
        raise FileNotFoundError(f"no jaxrob params export at {directory} (expected "
                                f"{_PARAMS}/ and {_METADATA}/ written by save_params)")
    restore = ocp.args.StandardRestore(None if template is None else abstract_like(template))
    ck = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        out = ck.restore(directory, args=ocp.args.Composite(**{
            _PARAMS: restore, _METADATA: ocp.args.JsonRestore()}))
    finally:
        ck.close()
    return out[_PARAMS], dict(out[_METADATA] or {})


def read_metadata(directory: str | os.PathLike) -> dict:
    """Only the JSON metadata of an export (cheap; no arrays are read)."""
    path = pathlib.Path(directory) / _METADATA / _METADATA
    if not path.is_file():
        raise FileNotFoundError(f"no jaxrob params export metadata at {path}")
    return json.loads(path.read_text())
