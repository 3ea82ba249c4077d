"""Evaluate a classifier (a jaxrob export or akamaster's pretrained ResNets) on a data split.

    python experiments/eval_classifier.py \\
        --config configs/cifar10_resnet20_pretrained.py --workdir /tmp/resnet20

``config.model.source`` is ``"akamaster"`` (``.npz``/``.th`` weights, path relative to the data
dir) or ``"export"`` (a ``jaxrob.checkpoint.save_params`` directory, path relative to the
repository). Writes ``workdir/results.json`` (``accuracy``, 95 % interval, manifest) and
``workdir/predictions.npz`` (per-example predictions, labels and base-split indices).
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import logging

from experiments import _common
from experiments import _train_classifier as _tc


def run(config, workdir) -> dict:
    """Evaluate; returns (and writes) ``results.json``'s content."""
    timer, workdir, mesh = _common.begin(config, workdir)
    batch_size = _common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    model, source = _common.load_classifier(config.model, config.data)
    ds = _common.load_split(config.data, config.data.test_split,
                            num_images=int(config.eval.num_images))
    ev = _tc.evaluate(model, ds, batch_size=batch_size,
                      mesh=mesh)
    logging.info("accuracy %.4f (%d/%d) on %s %s", ev["accuracy"], ev["correct"],
                 ev["num_images"], ds.name, ds.split)
    _tc.save_predictions(workdir / "predictions.npz", ev)
    results = {"accuracy": ev["accuracy"], "test": _tc.public(ev), "model": source,
               "wall_s": timer()}
    results["manifest"] = _common.manifest(config, wall_s=results["wall_s"],
                                           seeds={"seed": int(config.seed)})
    _common.write_json(workdir / "results.json", results)
    return results


if __name__ == "__main__":
    _common.cli(run)
