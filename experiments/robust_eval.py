"""Robust accuracy of DiffPure-style purification + classifier under an adaptive attack.

    python experiments/robust_eval.py --config configs/mnist_robust.py --workdir runs/mnist_robust

One run evaluates the settings listed in ``config.rows`` (each a dict of overrides of the base
config: purifier, attack, randomness) on the same images, one sub-workdir per row, and writes
``results.json`` (per row: clean and robust accuracy with 95% intervals under every protocol
of ``config.eval.protocols``, the full manifest of DESIGN.md, NFEs, wall time) and
``table.md``. Per-example records are kept under ``<row>/chunks/`` (resumable: kill the run,
rerun the same command, finished chunks are kept and nothing is counted twice) and as
``<row>/per_example.npz``. ``--config.only_rows=a,b`` runs just those rows now (a long table
a few rows at a time, or different rows in parallel processes on one workdir); the other rows'
finished records stay in ``results.json`` and ``table.md``.

Randomness modes: ``stochastic`` (fresh purifier noise in every attack step and in scoring)
and ``fixed`` (one purifier key per image shared by attack and scoring: the deterministic
white-box setting). Gradient methods: ``exact`` (scan + remat through every step), ``bpda``
(identity backward), ``surrogate`` (gradient of a shorter chain).

Attacks: ``fgsm``, ``pgd``, ``apgd`` and ``autoattack`` (``jaxrob.attacks.autoattack``; version,
attacks, targets, Square queries and EoT in ``attack.autoattack``, its iterations
``attack.num_steps``; stochastic randomness only). An AutoAttack row runs AutoAttack's host
loop over resumable chunks of ``eval.batch_size`` images (``<row>/autoattack/``), then scores
its ``x_adv`` under the row's protocols like any row; its running robust accuracy after each
attack and its flags (randomised model, probabilities, Square stronger than the gradient
attacks, re-measure consistency) go to results.json and a section of table.md.

Soundness checks (``eval.soundness.num_images`` set): ``jaxrob.evaluation.soundness_checks``
on the row's first images -- large eps, more iterations / EoT, Square vs the gradient attack,
a transfer attack from the bare classifier, AutoAttack's flags -- each with a verdict, its
numbers and wall time, in results.json (``soundness``), ``<row>/soundness.json`` (reused on
rerun) and a column and a section of table.md.

Devices: the batch is split over ``config.mesh.num_devices`` (default all); with
``--config.mesh.eot_devices=E`` (default 1) the mesh is ``(data, eot)`` =
``(num_devices // E, E)`` and each example's EoT samples are split over the ``E`` devices of
``eot`` (``jaxrob.parallel.make_mesh(eot=E)``), so a batch smaller than the device count still
uses every device. The records are the same as with ``E = 1`` (per-example keys; up to the
order of the EoT sum). ``E`` must divide the devices and every row's EoT chunk
(``attack.eot_chunk``, else ``attack.eot_samples``; rows with EoT 1 run on ``data`` alone);
AutoAttack rows need ``E = 1``.
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
