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
  committed under ``checkpoints/``. Format 2 (``"jaxrob_export_format": 2`` in the metadata)
  carries a SHA-256 per leaf and over all leaves in the metadata and a SHA-256 per file in
  ``jaxrob_files.json``; loading verifies both and that every parameter is finite, and raises
  one :class:`CorruptExportError` naming the export and what is wrong. Exports from before
  format 2 raise :class:`LegacyExportError`; :func:`upgrade_export` re-writes them.

Crash safety comes from orbax: every checkpoint is written into
``<step>.orbax-checkpoint-tmp-<timestamp>/`` and renamed to ``<step>/`` only once complete, and
unfinished tmp directories are never listed as steps. A process killed mid-save (even by
``kill -9``) therefore leaves at most a tmp directory that is ignored (and removed by the next
:class:`Checkpointer` opened on that directory). Arrays are stored with
``ocp.args.StandardSave`` (tensorstore/OCDBT), never pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "EXPORT_FORMAT",
    "Checkpointer",
    "CorruptExportError",
    "ExportError",
    "ExportFormatError",
    "LegacyExportError",
    "NotAnExportError",
    "abstract_like",
    "export_checksum",
    "fingerprint_diff",
    "load_params",
    "normalize_fingerprint",
    "read_metadata",
    "save_params",
    "upgrade_export",
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

EXPORT_FORMAT = 2
_FORMAT_KEY = "jaxrob_export_format"
_CHECKSUM_KEY = "jaxrob_checksums"
_RESERVED = (_FORMAT_KEY, _CHECKSUM_KEY)
_FILES = "jaxrob_files.json"  # per-file sizes and sha256 of the whole export
_MAX_LISTED = 10


class ExportError(ValueError):
    """A directory cannot be loaded as a jaxrob params export."""


class NotAnExportError(ExportError):
    """The directory exists but is not a jaxrob params export at all."""


class ExportFormatError(ExportError):
    """The export was written in another export format version than this jaxrob reads."""


class LegacyExportError(ExportFormatError):
    """The export predates format 2 (no checksums); :func:`upgrade_export` re-writes it."""


class CorruptExportError(ExportError):
    """The export is damaged: a file changed or is missing, its arrays cannot be read, a
    leaf's checksum does not match, or a parameter is not finite."""


def _jsonable(metadata: Mapping | None) -> dict:
    return normalize_fingerprint(metadata or {}) or {}


def _public(metadata: Mapping) -> dict:
    """The caller's metadata: the export's own bookkeeping keys removed."""
    return {k: v for k, v in metadata.items() if k not in _RESERVED}


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _named_leaves(tree) -> dict[str, np.ndarray]:
    """``{"params/conv/kernel": array}`` for every leaf of a host pytree."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _leaf_name(path)
        if name in out:
            raise ValueError(f"two leaves of the params pytree are both named {name!r}")
        out[name] = np.asarray(leaf)
    return out


def _leaf_sha256(x: np.ndarray) -> str:
    """SHA-256 of a leaf's dtype, shape and little-endian C-order bytes."""
    if x.dtype.hasobject:
        raise TypeError(f"cannot checksum an object array (dtype {x.dtype})")
    if x.dtype.byteorder == ">":
        x = x.astype(x.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{x.dtype.name}:{list(x.shape)}:".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _checksums(leaves: Mapping[str, np.ndarray]) -> dict:
    """Per-leaf checksums in canonical (sorted name) order, and one over all of them."""
    entries = {
        name: {"dtype": x.dtype.name, "shape": list(x.shape), "sha256": _leaf_sha256(x)}
        for name, x in sorted(leaves.items())
    }
    tree = hashlib.sha256()
    for name, e in entries.items():
        tree.update(f"{name}={e['sha256']};".encode())
    return {"algorithm": "sha256", "tree": tree.hexdigest(), "leaves": entries}


def _num_nonfinite(x: np.ndarray) -> int:
    if x.dtype.kind in "biuSUOM":
        return 0
    try:
        return int(x.size - np.count_nonzero(np.isfinite(x)))
    except TypeError:  # a dtype without isfinite: nothing to check
        return 0


def _nonfinite_report(leaves: Mapping[str, np.ndarray]) -> str | None:
    bad = [(k, n, x.size) for k, x in leaves.items() if (n := _num_nonfinite(x))]
    if not bad:
        return None
    lines = [f"{k} ({n} of {size} values are NaN or infinite)" for k, n, size in bad]
    more = len(lines) - _MAX_LISTED
    return ", ".join(lines[:_MAX_LISTED]) + (f" and {more} more leaves" if more > 0 else "")


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_manifest(root: pathlib.Path) -> dict:
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != _FILES:
            files[rel] = {"size": p.stat().st_size, "sha256": _file_sha256(p)}
    return {_FORMAT_KEY: EXPORT_FORMAT, "algorithm": "sha256", "files": files}


def _sync_processes(name: str) -> None:
    """Wait for every process at a barrier called ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _orbax_save(directory: pathlib.Path, host_params, metadata: dict) -> None:
    ck = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        ck.save(directory, args=ocp.args.Composite(**{
            _PARAMS: ocp.args.StandardSave(host_params),
            _METADATA: ocp.args.JsonSave(metadata),
        }))
    finally:
        ck.close()


@contextlib.contextmanager
def _quiet_closed_loop_callbacks(grace_s: float = 0.05):
    """Drop the "Event loop is closed" reports of a failed orbax read.

    Orbax runs a restore on a fresh asyncio loop and closes it as soon as the first array read
    fails; tensorstore's other reads still in flight then complete on its own threads and call
    ``loop.call_soon_threadsafe`` on the closed loop. The RuntimeErrors that raises go to
    ``sys.unraisablehook``, which prints each as a bare traceback ahead of the real error. They
    are harmless (nobody waits for those reads any more); this filters exactly them while a
    restore runs, and for ``grace_s`` after a failed one.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        time.sleep(grace_s)
        raise
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _orbax_restore_host(directory: pathlib.Path):
    """The params pytree of an export as host numpy arrays, exactly as stored."""
    ck = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        with _quiet_closed_loop_callbacks():
            out = ck.restore(directory, args=ocp.args.Composite(**{
                _PARAMS: ocp.args.StandardRestore(None)}))
    except Exception as e:  # tensorstore / orbax report unreadable data in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptExportError(
            f"corrupt jaxrob export {directory}: the array data under {_PARAMS}/ could not be "
            f"read ({type(e).__name__}: {first})") from e
    finally:
        ck.close()
    return out[_PARAMS]


def save_params(directory: str | os.PathLike, params, metadata: Mapping | None = None, *,
                overwrite: bool = False) -> pathlib.Path:
    """Export one params pytree plus a JSON metadata dict to ``directory`` (written atomically).

    The pytree is copied to host numpy first, so an export restores on any device count.
    ``directory`` then holds ``params/`` (OCDBT arrays), ``metadata/metadata`` (JSON) and
    ``jaxrob_files.json`` (size and SHA-256 of every file). The metadata JSON also gets
    ``"jaxrob_export_format": 2`` and ``"jaxrob_checksums"``: per leaf (``"params/conv/kernel"``)
    its dtype, shape and the SHA-256 of dtype, shape and little-endian C-order bytes, and one
    SHA-256 over all leaves in sorted-name order (``"tree"``). :func:`load_params` verifies them.

    Everything is written beside ``directory`` first and renamed into place when complete, so
    an interrupted save leaves the old export or none, never a partial one.

    On several processes every process calls it (with the same ``params``, e.g. replicated);
    process 0 writes the export and the others wait until it has.

    Args:
      directory: export directory (must not exist unless ``overwrite``).
      params: the pytree to store (e.g. EMA params); every leaf must be finite.
      metadata: JSON-able dict (model config, training config, metrics, versions). The keys
        ``jaxrob_export_format`` and ``jaxrob_checksums`` are the export's own and are replaced.
      overwrite: replace an existing export. The new one is written beside it and swapped in,
        so an interrupted overwrite leaves the old or the new export, never a mixture.

    Returns:
      The export directory.

    Raises:
      FileExistsError: ``directory`` exists and not ``overwrite``.
      ValueError: a parameter is NaN or infinite (nothing is written).
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:  # on every process, before any of them writes
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    multi = jax.process_count() > 1
    main = jax.process_index() == 0
    host_params = jax.tree.map(np.asarray, jax.device_get(params))
    leaves = _named_leaves(host_params)
    bad = _nonfinite_report(leaves)
    if bad is not None:
        raise ValueError(f"refusing to export non-finite parameters to {directory}: {bad}")
    meta = _public(_jsonable(metadata))
    meta[_FORMAT_KEY] = EXPORT_FORMAT
    meta[_CHECKSUM_KEY] = _checksums(leaves)

    # several processes: all take part in orbax's save (it writes from process 0 and keeps them
    # in step with barriers), process 0 alone prepares, finishes and renames the directory
    suffix = "multi" if multi else str(os.getpid())
    target = directory.with_name(f"{directory.name}.new-{suffix}")
    if multi:
        _sync_processes(f"jaxrob.save_params.start:{directory}")
        if main:
            directory.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
        _sync_processes(f"jaxrob.save_params.prepared:{directory}")
        _orbax_save(target, host_params, meta)
        _sync_processes(f"jaxrob.save_params.written:{directory}")
        if main:
            _finish_export(directory, target)
        _sync_processes(f"jaxrob.save_params.done:{directory}")
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    try:
        _orbax_save(target, host_params, meta)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    _finish_export(directory, target)
    return directory


def _finish_export(directory: pathlib.Path, target: pathlib.Path) -> None:
    """Write the file manifest into ``target`` and rename it to ``directory`` (atomically)."""
    try:
        manifest = json.dumps(_file_manifest(target), indent=1, sort_keys=True)
        (target / _FILES).write_text(manifest + "\n")
        if directory.exists():
            old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(target, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(target, directory)
    finally:
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)


def _export_dir(directory: str | os.PathLike) -> pathlib.Path:
    d = pathlib.Path(directory).absolute()
    if not d.exists():
        raise FileNotFoundError(f"no jaxrob params export at {d}: no such file or directory")
    if not (d / _PARAMS).is_dir() or not (d / _METADATA / _METADATA).is_file():
        found = sorted(p.name for p in d.iterdir())[:_MAX_LISTED] if d.is_dir() else None
        raise NotAnExportError(
            f"{d} is not a jaxrob params export: expected a directory with {_PARAMS}/, "
            f"{_METADATA}/{_METADATA} and {_FILES}, as written by jaxrob.checkpoint.save_params"
            + (f" (found {found})" if found is not None else " (it is not a directory)"))
    return d


def _read_json(d: pathlib.Path, rel: str, what: str):
    try:
        return json.loads((d / rel).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptExportError(f"corrupt jaxrob export {d}: {rel} ({what}) is not valid "
                                 f"JSON: {e}") from None


def _verify_files(d: pathlib.Path, files: Mapping, names) -> None:
    problems = []
    for rel in names:
        p, want = d / rel, files[rel]
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif (size := p.stat().st_size) != want["size"]:
            how = "truncated" if size < want["size"] else "longer than written"
            problems.append(f"{rel}: {size} bytes, expected {want['size']} ({how})")
        elif _file_sha256(p) != want["sha256"]:
            problems.append(f"{rel}: contents changed (SHA-256 differs from the one recorded "
                            f"when it was written)")
    if problems:
        more = len(problems) - _MAX_LISTED
        raise CorruptExportError(
            f"corrupt jaxrob export {d}: " + "; ".join(problems[:_MAX_LISTED])
            + (f"; and {more} more files" if more > 0 else ""))


def _open_export(directory, *, verify_all_files: bool) -> tuple[pathlib.Path, dict]:
    """Check an export's format and files; returns its directory and full metadata."""
    d = _export_dir(directory)
    has_manifest = (d / _FILES).is_file()
    if has_manifest:
        manifest = _read_json(d, _FILES, "the file manifest")
        fmt = manifest.get(_FORMAT_KEY) if isinstance(manifest, dict) else None
        if fmt != EXPORT_FORMAT:
            raise ExportFormatError(
                f"{d}: jaxrob export format {fmt!r} in {_FILES}; this jaxrob reads format "
                f"{EXPORT_FORMAT} (re-export it with this version's save_params)")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
            raise CorruptExportError(f"corrupt jaxrob export {d}: {_FILES} has no valid "
                                     f"'files' table")
        rel_meta = f"{_METADATA}/{_METADATA}"
        if rel_meta not in files:
            raise CorruptExportError(f"corrupt jaxrob export {d}: {_FILES} does not list "
                                     f"{rel_meta}")
        _verify_files(d, files, sorted(files) if verify_all_files else [rel_meta])
    meta = _read_json(d, f"{_METADATA}/{_METADATA}", "the metadata")
    if not isinstance(meta, dict):
        raise CorruptExportError(f"corrupt jaxrob export {d}: metadata is not a JSON object")
    fmt = meta.get(_FORMAT_KEY)
    if fmt is None and not has_manifest:
        raise LegacyExportError(
            f"{d} is a jaxrob export written before export format {EXPORT_FORMAT}: it has no "
            f"checksums to verify its arrays against. If you trust where it came from, upgrade "
            f"it in place with jaxrob.checkpoint.upgrade_export({str(d)!r}) (it refuses "
            f"non-finite parameters and re-writes the same arrays with checksums), or re-create "
            f"it with save_params.")
    if fmt != EXPORT_FORMAT:
        raise ExportFormatError(f"{d}: jaxrob export format {fmt!r} in its metadata; this "
                                f"jaxrob reads format {EXPORT_FORMAT}")
    if not has_manifest:
        raise CorruptExportError(f"corrupt jaxrob export {d}: {_FILES} is missing")
    return d, meta


def _verify_leaves(d: pathlib.Path, leaves: Mapping[str, np.ndarray], stored) -> None:
    if not (isinstance(stored, dict) and isinstance(stored.get("leaves"), dict)
            and stored.get("algorithm") == "sha256"):
        raise CorruptExportError(f"corrupt jaxrob export {d}: its metadata has no valid "
                                 f"'{_CHECKSUM_KEY}'")
    want = stored["leaves"]
    missing, extra = sorted(set(want) - set(leaves)), sorted(set(leaves) - set(want))
    if missing or extra:
        raise CorruptExportError(f"corrupt jaxrob export {d}: the restored arrays are not the "
                                 f"ones written (missing {missing[:_MAX_LISTED]}, unexpected "
                                 f"{extra[:_MAX_LISTED]})")
    got = _checksums(leaves)
    bad = [name for name, e in got["leaves"].items() if e != want[name]]
    if bad:
        e, w = got["leaves"][bad[0]], want[bad[0]]
        if (e["dtype"], e["shape"]) != (w.get("dtype"), w.get("shape")):
            what = f"restored as {e['dtype']}{e['shape']}, written as {w.get('dtype')}" \
                   f"{w.get('shape')}"
        else:
            what = "the SHA-256 of its bytes differs from the one recorded when it was written"
        more = f"; {len(bad) - 1} more leaves differ: {bad[1:_MAX_LISTED]}" if len(bad) > 1 else ""
        raise CorruptExportError(f"corrupt jaxrob export {d}: checksum mismatch for leaf "
                                 f"{bad[0]!r} ({what}){more}")
    if got["tree"] != stored.get("tree"):
        raise CorruptExportError(f"corrupt jaxrob export {d}: the overall checksum of the "
                                 f"params does not match the one recorded")


def _fit_template(d: pathlib.Path, leaves: Mapping[str, np.ndarray], template):
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [_leaf_name(path) for path, _ in flat]
    missing, extra = sorted(set(names) - set(leaves)), sorted(set(leaves) - set(names))
    if missing or extra:
        raise ValueError(f"export {d} does not fit the template: missing in the export "
                         f"{missing[:_MAX_LISTED]}, not in the template {extra[:_MAX_LISTED]}")
    out = []
    for (_, t), name in zip(flat, names, strict=True):
        x = leaves[name]
        if tuple(t.shape) != x.shape:
            raise ValueError(f"export {d} does not fit the template: {name} has shape "
                             f"{x.shape}, the template {tuple(t.shape)}")
        x = x.astype(t.dtype) if np.dtype(t.dtype) != x.dtype else x
        out.append(jax.device_put(x, getattr(t, "sharding", None)))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_params(directory: str | os.PathLike, template=None) -> tuple[Any, dict]:
    """Load an export written by :func:`save_params`, verifying it first.

    Every file's size and SHA-256 are checked before orbax reads anything (so a truncated or
    overwritten file is reported by name, and orbax never fails half-way through a read), then
    each restored leaf against its checksum, then that every parameter is finite.

    Args:
      directory: the export directory.
      template: optional pytree (arrays or ``ShapeDtypeStruct`` with shardings) to restore into:
        leaves are matched by their path, cast to the template's dtype and placed with its
        sharding (default device without one). Without it the params come back as host numpy
        arrays.

    Returns:
      ``(params, metadata)``; ``metadata`` is the dict given to :func:`save_params`.

    Raises:
      FileNotFoundError: nothing exists at ``directory``.
      NotAnExportError: ``directory`` is not a jaxrob export.
      LegacyExportError: an export written before format 2 (see :func:`upgrade_export`).
      ExportFormatError: an export of another format version.
      CorruptExportError: a file is missing, truncated or changed, the arrays cannot be read,
        a leaf does not match its checksum, or a parameter is NaN or infinite.
      ValueError: the export does not fit ``template``. All of the above are ValueErrors too,
        except FileNotFoundError.
    """
    d, meta = _open_export(directory, verify_all_files=True)
    tree = _orbax_restore_host(d)
    leaves = _named_leaves(tree)
    _verify_leaves(d, leaves, meta.get(_CHECKSUM_KEY))
    bad = _nonfinite_report(leaves)
    if bad is not None:
        raise CorruptExportError(f"corrupt jaxrob export {d}: non-finite parameters: {bad}")
    params = tree if template is None else _fit_template(d, leaves, template)
    return params, _public(meta)


def read_metadata(directory: str | os.PathLike) -> dict:
    """Only the JSON metadata of an export (cheap: its file is verified, no arrays are read).

    Raises the errors of :func:`load_params` that concern the format and the metadata file.
    """
    _, meta = _open_export(directory, verify_all_files=False)
    return _public(meta)


def export_checksum(directory: str | os.PathLike) -> str:
    """The SHA-256 over all parameter leaves recorded in an export's metadata (cheap: no arrays
    are read; :func:`load_params` verifies the arrays against it).

    Two exports with the same checksum hold bit-identical parameters, so it names "which export"
    in the metadata of a model derived from another (e.g. a fine-tune of it) and in run
    fingerprints.

    Raises the errors of :func:`read_metadata`, and :class:`CorruptExportError` when the metadata
    holds no overall checksum.
    """
    d, meta = _open_export(directory, verify_all_files=False)
    stored = meta.get(_CHECKSUM_KEY)
    tree = stored.get("tree") if isinstance(stored, dict) else None
    if not isinstance(tree, str):
        raise CorruptExportError(f"corrupt jaxrob export {d}: its metadata has no valid "
                                 f"'{_CHECKSUM_KEY}'")
    return tree


def upgrade_export(directory: str | os.PathLike) -> pathlib.Path:
    """Re-write an export made before format 2 in place, with checksums.

    The arrays are read as they are (nothing can verify them: legacy exports carry no
    checksums), refused if any is NaN or infinite, and written back unchanged with
    :func:`save_params` (atomically); the new export is then loaded and verified, so its arrays
    are bit-identical to the legacy ones and its metadata is the same apart from the format
    and checksum keys. An export already in the current format is only verified.

    Args:
      directory: the export directory.

    Returns:
      The export directory.

    Raises:
      CorruptExportError: the legacy arrays cannot be read or are not finite (nothing is
        written).
      ExportFormatError, NotAnExportError, FileNotFoundError: as for :func:`load_params`.
    """
    try:
        d, _ = _open_export(directory, verify_all_files=False)
    except LegacyExportError:
        d = _export_dir(directory)
    else:
        load_params(d)
        return d
    meta = _read_json(d, f"{_METADATA}/{_METADATA}", "the metadata")
    tree = _orbax_restore_host(d)
    leaves = _named_leaves(tree)
    bad = _nonfinite_report(leaves)
    if bad is not None:
        raise CorruptExportError(f"refusing to upgrade jaxrob export {d}: non-finite "
                                 f"parameters: {bad}")
    before = _checksums(leaves)
    save_params(d, tree, meta, overwrite=True)
    _, new_meta = load_params(d)  # verifies the new files, and the arrays against `before`
    stored = _read_json(d, f"{_METADATA}/{_METADATA}", "the metadata")[_CHECKSUM_KEY]
    if stored != before or new_meta != _public(meta):  # pragma: no cover - save_params bug
        raise RuntimeError(f"upgrading {d} changed its arrays or metadata")
    return d
