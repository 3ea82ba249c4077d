"""Resumable per-example results: one atomically written ``.npz`` per finished chunk.

A long evaluation is split into chunks of consecutive examples. Each finished chunk is written
to ``<dir>/chunk_<start>_<stop>.npz`` through a temporary file and ``os.replace``, so a run killed
at any moment leaves only whole chunk files behind; rerunning skips them. Because every example's
randomness is ``fold_in(key, example_index)``, the assembled record is the same as an
uninterrupted run's, and no example is counted twice (chunks never overlap: they are checked).
A fingerprint of the run (purifier, attack, protocol, seeds, ...) is stored beside the chunks;
resuming with a different one raises instead of mixing results.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping

import numpy as np

from jaxrob.checkpoint import fingerprint_diff, normalize_fingerprint

_CHUNK_RE = re.compile(r"chunk_(\d+)_(\d+)\.npz")
FINGERPRINT_FILE = "fingerprint.json"
_OPTIONAL = ("seconds",)


class ChunkStore:
    """Finished chunks of a per-example evaluation under one directory.

    Args:
      directory: where chunk files live (created when missing).
      fingerprint: JSON-able description of the run; must match the stored one on resume.
      write: whether this process writes files (default: only process 0 of a multi-process
        run, ``jaxrob.parallel.is_main_process()``).
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Mapping | None = None,
                 write: bool | None = None):
        self.directory = pathlib.Path(directory)
        if write is None:
            from jaxrob.parallel import is_main_process

            write = is_main_process()
        self.write = bool(write)
        self.fingerprint = normalize_fingerprint(fingerprint)
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
        fp_path = self.directory / FINGERPRINT_FILE
        if fp_path.exists() and self.fingerprint is not None:
            stored = json.loads(fp_path.read_text())
            diff = fingerprint_diff(self.fingerprint, stored)
            if diff:
                raise ValueError(f"{self.directory} holds results of another run ("
                                 + "; ".join(diff[:10]) + "); use a new workdir or delete it")
        elif write and self.fingerprint is not None:
            self._atomic_write(fp_path, json.dumps(self.fingerprint, indent=1, sort_keys=True)
                               .encode())

    def _atomic_write(self, path: pathlib.Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp_")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def finished(self) -> list[tuple[int, int]]:
        """Sorted ``(start, stop)`` ranges of the finished chunks (checked to be disjoint)."""
        if not self.directory.is_dir():
            return []
        ranges = sorted((int(m.group(1)), int(m.group(2)))
                        for p in self.directory.iterdir() if (m := _CHUNK_RE.fullmatch(p.name)))
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:], strict=False):
            if b0 < a1:
                raise ValueError(f"{self.directory}: chunks [{a0}, {a1}) and [{b0}, {b1}) "
                                 "overlap; the directory was written by two different runs")
        return ranges

    def is_done(self, start: int, stop: int) -> bool:
        return (self.directory / f"chunk_{start}_{stop}.npz").exists()

    def save(self, start: int, stop: int, **arrays) -> None:
        """Write one finished chunk (every array's leading axis has ``stop - start`` rows)."""
        for k, a in arrays.items():
            if np.shape(a)[0] != stop - start:
                raise ValueError(f"chunk [{start}, {stop}): array {k!r} has "
                                 f"{np.shape(a)[0]} rows, expected {stop - start}")
        if not self.write:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        self._atomic_write(self.directory / f"chunk_{start}_{stop}.npz", buf.getvalue())

    def load(self) -> dict[str, np.ndarray]:
        """All finished chunks concatenated in example order (plus ``"position"``: the row
        offsets of every example in the run)."""
        chunks = []
        positions = []
        for start, stop in self.finished():
            with np.load(self.directory / f"chunk_{start}_{stop}.npz") as z:
                chunks.append({k: z[k] for k in z.files})
            positions.append(np.arange(start, stop))
        names = sorted({k for c in chunks for k in c})
        out = {}
        for k in names:
            parts = []
            for c, pos in zip(chunks, positions, strict=True):
                if k in c:
                    parts.append(c[k])
                elif k in _OPTIONAL:  # chunks written before the field existed
                    parts.append(np.full((pos.size,), np.nan))
                else:
                    raise ValueError(f"{self.directory}: chunk [{pos[0]}, {pos[-1] + 1}) has "
                                     f"no {k!r}; it was written by another run")
            out[k] = np.concatenate(parts)
        out["position"] = (np.concatenate(positions) if positions
                           else np.zeros((0,), np.int64))
        return out
