"""The main job on the bundled 8x8 digits: DDPM + classifier, samples, denoising, accuracy.

    python experiments/main.py --workdir runs/main        # --config defaults to configs/main.py

Loads the exports ``checkpoints/digits_ddpm`` and ``checkpoints/digits_classifier`` when they
exist (their recorded model configuration must match the config, else ``ValueError``), and
otherwise trains them with ``train_diffusion.run`` / ``train_classifier.run`` (sub-workdirs
``train_ddpm/`` and ``train_classifier/``, resumable) and exports them there. Then writes
``samples.png`` (grid of DDPM samples), and ``results.json`` with the denoising MSE at each
``eval.t_stars`` on the digits test split, the classifier's test accuracy, the classifier's
labels for the samples, timings and the manifest; and runs ``experiments/robust_eval.py`` on
the two models (``robust/``: table.md, results.json, per-example records).
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import logging

from experiments import _common, _robust_eval, _train_classifier, _train_diffusion

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "main.py")


def _check_export(directory: pathlib.Path, meta: dict, expected: dict) -> None:
    from jaxrob.checkpoint import fingerprint_diff

    found = {k: meta.get(k) for k in expected}
    diff = fingerprint_diff(expected, found)
    if diff:
        raise ValueError(f"{directory} was exported with another configuration ("
                         + "; ".join(diff[:10]) + "); delete it to retrain, or point "
                         "--config.checkpoints_dir elsewhere")


def obtain(kind: str, sub_config, export_dir: pathlib.Path, train_workdir: pathlib.Path):
    """Load the export at ``export_dir``, or train it (``kind``: "ddpm" / "classifier").

    Returns ``(variables, metadata, info)``; ``info["source"]`` is "loaded" or "trained" (then
    the caller evaluates and writes the export).
    """
    from jaxrob.checkpoint import load_params

    expected = {"kind": kind, "model": _common.to_plain(sub_config.model)}
    if kind == "ddpm":
        expected["diffusion"] = _common.to_plain(sub_config.diffusion)
    timer = _common.Timer()
    if export_dir.exists():
        variables, meta = load_params(export_dir)
        _check_export(export_dir, meta, expected)
        logging.info("loaded %s export %s (step %s)", kind, export_dir, meta.get("step"))
        return variables, meta, {"source": "loaded", "path": str(export_dir), "s": timer()}
    logging.info("no %s export at %s: training it in %s", kind, export_dir, train_workdir)
    if kind == "ddpm":  # main evaluates the DDPM itself (once, with its own eval config)
        results = _train_diffusion.run(sub_config, train_workdir, evaluate=False)
    else:
        results = _train_classifier.run(sub_config, train_workdir)
    variables, meta = load_params(results["export"])
    return variables, meta, {"source": "trained", "path": str(export_dir), "s": timer(),
                             "train_workdir": str(train_workdir),
                             "steps_per_s": results["train"]["steps_per_s"],
                             "train_s": results["train"]["train_s"],
                             "compile_s": results["train"]["compile_s"]}


def run(config, workdir) -> dict:
    """The main job; returns (and writes) ``results.json``'s content."""
    from jaxrob.models import (
        Classifier,
        DiffusionModel,
        classifier_from_metadata,
        schedule_from_metadata,
        unet_from_metadata,
    )
    from jaxrob.training import classifier_predictions

    timer = _common.Timer()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = (_common.resolve_path(config.checkpoints_dir, base=_common.REPO_ROOT)
            if config.checkpoints_dir else workdir / "checkpoints")

    ddpm_vars, ddpm_meta, ddpm_info = obtain("ddpm", config.ddpm, root / "digits_ddpm",
                                             workdir / "train_ddpm")
    clf_vars, clf_meta, clf_info = obtain("classifier", config.classifier,
                                          root / "digits_classifier",
                                          workdir / "train_classifier")

    _common.write_json(workdir / "config.json", config)
    mesh = _common.get_mesh(config.mesh)
    ddpm = DiffusionModel(unet_from_metadata(_common.to_plain(config.ddpm.model)), ddpm_vars,
                          schedule_from_metadata(_common.to_plain(config.ddpm.diffusion)))
    logits_fn = Classifier(classifier_from_metadata(_common.to_plain(config.classifier.model),
                                                    int(clf_meta["num_classes"])), clf_vars)
    test = _common.load_split(config.ddpm.data, config.ddpm.data.test_split,
                              num_images=int(config.eval.num_images))

    t_eval = _common.Timer()
    denoising = _train_diffusion.evaluate_denoising(ddpm, test.images, config.eval, mesh)
    clf_test = _train_classifier.evaluate(logits_fn, test,
                                          batch_size=int(config.eval.batch_size), mesh=mesh)
    eval_s = t_eval()
    samples, sample_s = _train_diffusion.generate_samples(
        ddpm, config.sample, tuple(test.image_shape), mesh)
    _common.save_image_grid(workdir / "samples.png", samples, grid=int(config.sample.grid))
    _common.save_npz(workdir / "samples.npz", samples=samples)
    sample_labels = classifier_predictions(logits_fn, samples, mesh=mesh)
    from jaxrob.checkpoint import save_params

    for info, variables, meta, extra in [
            (ddpm_info, ddpm_vars, ddpm_meta, {"denoising": denoising}),
            (clf_info, clf_vars, clf_meta, {"test": _train_classifier.public(clf_test)})]:
        if info["source"] == "trained":  # export what was just trained, with its metrics
            meta = {**meta, "metrics": {**meta.get("metrics", {}), **extra}}
            save_params(info["path"], variables, meta, overwrite=True)
            logging.info("exported %s", info["path"])
    logging.info("classifier test accuracy %.4f; labels of the %d samples: %s",
                 clf_test["accuracy"], len(samples), np.bincount(sample_labels, minlength=10))

    robust_config = config.robust.copy_and_resolve_references()
    with robust_config.unlocked():
        robust_config.ddpm.update(source="export", path=str(root / "digits_ddpm"))
        robust_config.classifier.update(source="export", path=str(root / "digits_classifier"))
    robust = _robust_eval.run(robust_config, workdir / "robust")

    results = {
        "accuracy": clf_test["accuracy"],
        "robust": {"table": "robust/table.md", "wall_s": robust["wall_s"],
                   "rows": [{k: r[k] for k in ("name", "clean", "adv", "randomness")}
                            for r in robust["rows"]]},
        "classifier": {"test": _train_classifier.public(clf_test), **clf_info},
        "denoising": denoising,
        "ddpm": {**ddpm_info, "step": ddpm_meta.get("step"),
                 "num_params": ddpm_meta.get("num_params")},
        "samples": {"png": "samples.png", "npz": "samples.npz",
                    "sampler": config.sample.sampler, "num_steps": int(config.sample.num_steps),
                    "count": int(len(samples)), "sample_s": sample_s,
                    "classifier_label_counts": np.bincount(sample_labels,
                                                           minlength=10).tolist()},
        "eval_s": eval_s,
        "wall_s": timer(),
    }
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"],
        seeds={"seed": int(config.seed), "ddpm": int(config.ddpm.seed),
               "classifier": int(config.classifier.seed), "sample": int(config.sample.seed),
               "eval": int(config.eval.seed)})
    _common.write_json(workdir / "results.json", results)
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
