"""Robust accuracy of DiffPure-style purification + classifier under an adaptive attack.

    python experiments/robust_eval.py --config configs/mnist_robust.py --workdir runs/mnist_robust

One run evaluates the settings listed in ``config.rows`` (each a dict of overrides of the base
config: purifier, attack, randomness) on the same images, one sub-workdir per row, and writes
``results.json`` (per row: clean and robust accuracy with 95% intervals under every protocol
of ``config.eval.protocols``, the full manifest of DESIGN.md, NFEs, wall time) and
``table.md``. Per-example records are kept under ``<row>/chunks/`` (resumable: kill the run,
rerun the same command, finished chunks are kept and nothing is counted twice) and as
``<row>/per_example.npz``.

Randomness modes: ``stochastic`` (fresh purifier noise in every attack step and in scoring)
and ``fixed`` (one purifier key per image shared by attack and scoring: the deterministic
white-box setting). Gradient methods: ``exact`` (scan + remat through every step), ``bpda``
(identity backward), ``surrogate`` (gradient of a shorter chain).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _robust_eval as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run, _impl.DEFAULT_CONFIG)
