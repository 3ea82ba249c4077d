"""The implementation behind ``experiments/train_classifier.py`` (its docstring says what the run
does); a private module, so the other entry points can share it without importing an entry point.
"""

from __future__ import annotations

import jax
import jax.random as jr
from absl import logging

from experiments import _common
from jaxrob.evaluation import wilson_interval


def fingerprint(config, num_classes: int) -> dict:
    return {"kind": "classifier", "model": _common.to_plain(config.model),
            "num_classes": int(num_classes),
            "data": {"name": config.data.name, "train_split": config.data.train_split}}


def evaluate(logits_fn, dataset, *, batch_size: int, mesh) -> dict:
    """Accuracy (+ Wilson interval) and per-example predictions of ``logits_fn`` on ``dataset``."""
    from jaxrob.training import classifier_predictions

    preds = classifier_predictions(logits_fn, dataset.images, batch_size=batch_size, mesh=mesh)
    correct = preds == dataset.labels
    n, k = int(correct.size), int(correct.sum())
    return {"accuracy": k / n, "correct": k, "num_images": n,
            "ci95": list(wilson_interval(k, n)), "dataset": dataset.name,
            "split": dataset.split, "predictions": preds, "labels": dataset.labels,
            "indices": dataset.indices}


def save_predictions(path, ev: dict) -> None:
    _common.save_npz(path, predictions=ev["predictions"], labels=ev["labels"],
                     indices=ev["indices"])


def public(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k not in ("predictions", "labels", "indices")}


def run(config, workdir) -> dict:
    """Train (or resume), evaluate and export a classifier; returns ``results.json``'s content."""
    from jaxrob.checkpoint import save_params
    from jaxrob.training import (
        init_classifier_state,
        make_classifier_train_step,
        make_optimizer,
    )

    timer, workdir, mesh, batch_size, num_steps, train_ds = _common.begin_training(
        config, workdir)
    tc = config.train
    test_ds = _common.load_split(config.data, config.data.test_split,
                                 num_images=int(config.eval.num_images))
    from jaxrob.models import Classifier, classifier_from_metadata

    model = classifier_from_metadata(_common.to_plain(config.model), train_ds.num_classes)
    image_shape = tuple(train_ds.image_shape)
    tx, lr_fn = make_optimizer(name=tc.optimizer, learning_rate=tc.learning_rate,
                               total_steps=num_steps, warmup_steps=tc.warmup_steps,
                               lr_schedule=tc.lr_schedule, weight_decay=tc.weight_decay,
                               grad_clip=tc.grad_clip, momentum=tc.momentum)
    init_fn = lambda: init_classifier_state(model, jr.key(int(config.seed)), image_shape, tx)
    train_step = make_classifier_train_step(model.apply, tx, label_smoothing=tc.label_smoothing,
                                            lr_fn=lr_fn, mesh=mesh)
    state, summary = _common.run_training(
        config, workdir, mesh, fingerprint(config, train_ds.num_classes), train_step, init_fn,
        train_ds, batch_size, num_steps, "classifier", keys=("image", "label"))
    variables = jax.device_get(state.variables())
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    ev = evaluate(Classifier(model, variables), test_ds,
                  batch_size=int(config.eval.batch_size), mesh=mesh)
    logging.info("%s: test accuracy %.4f (%d/%d) on %s %s", config.model.name, ev["accuracy"],
                 ev["correct"], ev["num_images"], test_ds.name, test_ds.split)
    save_predictions(workdir / "predictions.npz", ev)

    export_meta = {
        "kind": "classifier", "model": _common.to_plain(config.model),
        "num_classes": int(train_ds.num_classes),
        "data": {"name": config.data.name, "train_split": config.data.train_split,
                 "image_shape": list(image_shape)},
        "train": _common.to_plain(config.train), "step": num_steps, "num_params": num_params,
        "metrics": {"test": public(ev), "final_loss": summary["last"].get("loss")},
        "versions": _common.versions(), "git": _common.git_info(),
    }
    export_dir = save_params(workdir / "export", variables, export_meta, overwrite=True)
    results = {
        "accuracy": ev["accuracy"],
        "test": public(ev),
        "train": {**summary, "num_params": num_params, "batch_size": batch_size,
                  "num_steps": num_steps},
        "export": str(export_dir),
        "wall_s": timer(),
    }
    results["manifest"] = _common.manifest(config, wall_s=results["wall_s"],
                                           seeds={"seed": int(config.seed)})
    _common.write_json(workdir / "results.json", results)
    return results

