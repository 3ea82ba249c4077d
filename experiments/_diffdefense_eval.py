"""The implementation behind ``experiments/diffdefense_eval.py`` (its docstring says what the run
does); a private module, so other entry points can share it without importing an entry point.

Keys, per example ``i`` with ``k_i = fold_in(key, index_i)`` (the evaluation's tags,
:mod:`jaxrob._keys`): the clean image is reconstructed with ``fold_in(k_i, CLEAN)``; the attack
runs with ``fold_in(k_i, ATTACK)`` (an adaptive attack's EoT samples hand their keys to the
defence, so each sample draws its own initial noise z_T); the attacked image is reconstructed
with ``fold_in(k_i, ADV)``, independent of everything the attacker saw. With
``eval.randomness="fixed"`` an adaptive attack and the scoring of its result both use
``fold_in(k_i, FIXED)`` instead (the attacker knows the reconstruction's initial noise).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

import jaxrob._keys as tags
from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_diffdefense.py")

ATTACKS = ("fgsm", "pgd", "apgd", "deepfool", "square", "ead")
CRAFTED_ON = {"classifier": "white-box", "substitute": "black-box", "defence": "adaptive"}
RANDOMNESS = ("stochastic", "fixed")
# the defence fields a row may change: the gradient an adaptive attack gets; the forward
# (restarts, iterations, steps, ...) is the run's, so every row shares the clean reconstructions
ROW_DEFENCE_FIELDS = ("gradient",)


# ----------------------------------------------------------------------------- config -> objects


def check_fpr(fpr) -> float:
    try:
        v = float(fpr)
    except (TypeError, ValueError):
        raise ValueError(f"eval.fpr: expected a false-positive rate in (0, 1), got {fpr!r}"
                         ) from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"eval.fpr: expected a false-positive rate in (0, 1), got {fpr!r}")
    return v


def check_defence(defence_config) -> None:
    """Refuse, before any work, a defence the evaluation cannot use.

    At least one restart and one Adam iteration: with ``iterations=0`` the reconstruction is the
    best random sample, whose exact gradient in ``x`` is identically 0 (an adaptive row would
    measure nothing). The other options are checked by :func:`jaxrob.purify.diffdefense`.
    """
    from jaxrob.purify import DD_GRADIENTS

    d = defence_config
    for name in ("restarts", "iterations"):
        v = d[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"defence.{name}: expected an integer >= 1 (R restarts of L Adam "
                             f"iterations), got {v!r}")
    if d.gradient not in DD_GRADIENTS:
        raise ValueError(f"defence.gradient: expected one of {list(DD_GRADIENTS)}, got "
                         f"{d.gradient!r}")


def make_defence(defence_config, ddpm):
    """The :class:`jaxrob.purify.DiffDefense` of ``config.defence`` over ``ddpm``."""
    from jaxrob.purify import diffdefense

    d = defence_config
    check_defence(d)
    lr = d.learning_rate if isinstance(d.learning_rate, str) else float(d.learning_rate)
    return diffdefense(ddpm, num_steps=int(d.num_steps), restarts=int(d.restarts),
                       iterations=int(d.iterations), learning_rate=lr,
                       betas=tuple(d.betas), eta=float(d.eta), output=d.output,
                       z_gradient=d.z_gradient, gradient=d.gradient, remat=bool(d.remat))


def make_attack(attack_config):
    """``attack(model, x, y, key) -> AttackResult`` of ``config.attack`` (a
    ``jax.tree_util.Partial``: its options are static and hash by value)."""
    from jax.tree_util import Partial

    from jaxrob import attacks

    a = attack_config
    if a.name not in ATTACKS:
        raise ValueError(f"attack.name: expected one of {list(ATTACKS)}, got {a.name!r}")
    if a.crafted_on not in CRAFTED_ON:
        raise ValueError(f"attack.crafted_on: expected one of {list(CRAFTED_ON)}, got "
                         f"{a.crafted_on!r}")
    loss = a.loss
    if a.get("detection_weight") is not None:
        if a.crafted_on != "defence" or a.name not in ("fgsm", "pgd"):
            raise ValueError("attack.detection_weight: the detection-aware loss needs "
                             "crafted_on='defence' and attack.name 'fgsm' or 'pgd', got "
                             f"{a.crafted_on!r} / {a.name!r}")
        loss = attacks.detection_aware_loss(a.detection_weight, base=a.detection_base,
                                            kappa=a.get("detection_kappa"))
    eot = dict(eot_samples=int(a.eot_samples), eot_chunk=a.get("eot_chunk"))
    eps = float(a.eps)
    if a.name == "fgsm":
        return Partial(attacks.fgsm, eps=eps, loss=loss, **eot)
    if a.name == "pgd":
        return Partial(attacks.pgd, eps=eps, norm=a.norm, step_size=a.get("step_size"),
                       num_steps=int(a.num_steps), random_start=bool(a.random_start),
                       num_restarts=int(a.num_restarts), loss=loss, **eot)
    if a.name == "apgd":
        return Partial(attacks.apgd, eps=eps, norm=a.norm, num_steps=int(a.num_steps),
                       random_start=bool(a.random_start), num_restarts=int(a.num_restarts),
                       loss=loss, **eot)
    if a.name == "deepfool":
        return Partial(attacks.deepfool, norm=a.norm, overshoot=float(a.overshoot),
                       num_steps=int(a.num_steps))
    if a.name == "square":
        return Partial(attacks.square, eps=eps, norm=a.norm, n_queries=int(a.n_queries),
                       p_init=float(a.p_init))
    return Partial(attacks.ead, beta=float(a.beta), c=float(a.c), num_steps=int(a.num_steps),
                   learning_rate=float(a.learning_rate),
                   binary_search_steps=int(a.binary_search_steps),
                   decision_rule=a.decision_rule)


def crafted_model(config, classifier, substitute, defence):
    """What the row's attack attacks: ``logits_fn(x, keys)``."""
    from jaxrob.attacks import DetectionAwareModel
    from jaxrob.purify import DefendedModel

    on = config.attack.crafted_on
    if on == "classifier":
        return DefendedModel(classifier, None)
    if on == "substitute":
        return DefendedModel(substitute, None)
    if config.attack.get("detection_weight") is not None:
        return DetectionAwareModel(classifier, defence)
    return DefendedModel(classifier, defence)


def check_row(config, row_spec: dict) -> None:
    """Refuse row overrides of the defence's forward (every row shares the clean pass)."""
    extra = set(row_spec.get("defence") or {}) - set(ROW_DEFENCE_FIELDS)
    if extra:
        raise ValueError(f"rows: a row may change only defence.{'/'.join(ROW_DEFENCE_FIELDS)} "
                         f"(the reconstruction of the clean images is shared by every row), "
                         f"got defence.{sorted(extra)}")
    if config.eval.randomness not in RANDOMNESS:
        raise ValueError(f"eval.randomness: expected one of {list(RANDOMNESS)}, got "
                         f"{config.eval.randomness!r}")
    n = config.eval.num_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eval.num_images: expected an integer >= 0, got {n!r}")


TRAIN_COMMANDS = {
    "checkpoints/kmnist_ddpm": "python experiments/train_diffusion.py --config "
                               "configs/kmnist_ddpm.py --workdir runs/kmnist_ddpm",
    "checkpoints/kmnist_substitute_classifier": "python experiments/train_classifier.py "
    "--config configs/kmnist_substitute_classifier.py --workdir runs/kmnist_substitute_classifier",
    "checkpoints/mnist_substitute_classifier": "python experiments/train_classifier.py "
    "--config configs/mnist_substitute_classifier.py --workdir runs/mnist_substitute_classifier",
}


def check_exports(config) -> None:
    """Raise ``FileNotFoundError`` (naming how to make them) before any work when an export the
    run needs is missing."""
    missing = []
    for what in ("ddpm", "classifier", "substitute"):
        c = config[what]
        if c.source != "export":
            continue
        path = _common.resolve_path(c.path, base=_common.REPO_ROOT)
        if not path.is_dir():
            how = TRAIN_COMMANDS.get(str(c.path).rstrip("/"))
            missing.append(f"{what}.path={c.path!r} (no export at {path}"
                           + (f"; make it with `{how}` and copy <workdir>/export there"
                              if how else "") + ")")
    if missing:
        raise FileNotFoundError("missing model export(s): " + "; ".join(missing))


# ----------------------------------------------------------------------------- chunk programs


def _fold_all(keys_B, data):
    return jax.vmap(lambda k: jr.fold_in(k, data))(keys_B)


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _score_chunk(classifier, substitute, defence, tag, batch, keys):
    """Both classifiers' predictions of ``batch["x"]`` and of its reconstruction (with the keys
    ``fold_in(k_i, tag)``; ``tag`` is traced, so the clean pass and every row's scoring share
    one compilation)."""
    x = batch["x"]
    rec = defence.reconstruct(x, _fold_all(keys, tag))
    return {"pred": _argmax(classifier(x, keys)), "pred_def": _argmax(classifier(rec.x, keys)),
            "pred_sub": _argmax(substitute(x, keys)), "error": rec.error,
            "restart": rec.restart}


def _attack_chunk(crafted, attack, fixed, batch, keys):
    """Attack every example alone (results independent of the batch)."""
    x, y = batch["x"], batch["y"]

    def attack_one(x_i, y_i, k_i):
        if fixed:
            k_fixed = jr.fold_in(k_i, tags.FIXED)[None]
            model_i = lambda xx, _key: crafted(xx, k_fixed)
        else:
            model_i = lambda xx, key: crafted(xx, key[None])
        res = attack(model_i, x_i[None], y_i[None], jr.fold_in(k_i, tags.ATTACK))
        return res.x_adv[0]

    x_adv = jax.vmap(attack_one)(x, y, keys)
    d = (x_adv - x).reshape(x.shape[0], -1)
    return {"x_adv": x_adv, "linf": jnp.max(jnp.abs(d), -1),
            "l2": jnp.sqrt(jnp.sum(d * d, -1)), "l1": jnp.sum(jnp.abs(d), -1)}


def _fingerprint(config, *parts) -> dict:
    return {"data": _common.to_plain(config.data), "seed": int(config.seed),
            "ddpm": _common.to_plain(config.ddpm),
            "classifier": _common.to_plain(config.classifier),
            "substitute": _common.to_plain(config.substitute),
            **{name: _common.to_plain(config[name]) for name in parts}}


def _run(fn, args, images, test, config, workdir: pathlib.Path, mesh, fingerprint,
         desc: str):
    from jaxrob.evaluation import ChunkStore, run_chunks

    store = ChunkStore(workdir / "chunks", fingerprint=fingerprint)
    return run_chunks(
        fn, {"x": np.asarray(images, np.float32), "y": test.labels.astype(np.int32),
             "index": test.indices},
        key=jr.key(int(config.seed)), args=args,
        batch_size=_common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size"),
        store=store, mesh=mesh, desc=desc)


def clean_pass(config, workdir, models, defence, test, mesh):
    """Reconstruct the clean images once (resumable); the record every row compares against."""
    classifier, substitute = models
    fp = _fingerprint(config, "defence")
    fp["defence"].pop("gradient")  # the forward only
    return _run(_score_chunk, (classifier, substitute, defence, _tag(tags.CLEAN)), test.images,
                test, config, workdir / "clean", mesh, fp, "clean reconstructions")


def _tag(tag: int):
    return jnp.asarray(tag, jnp.uint32)  # traced: one compilation for every tag


def reconstruction_timing(config, workdir, models, defence, test, mesh, *,
                          compiled: bool) -> dict:
    """Seconds per reconstructed image: the clean chunk program rerun on the first chunk,
    compilation excluded (``compiled``: the clean pass compiled it in this process; else it
    runs once untimed first). Written once to ``reconstruction_timing.json``, reused on rerun."""
    import json

    from jaxrob.evaluation import run_chunks

    path = workdir / "reconstruction_timing.json"
    if path.is_file():
        return json.loads(path.read_text())
    classifier, substitute = models
    b = min(int(config.eval.batch_size), len(test))
    first = test.subset(slice(0, b))
    for _ in range(1 if compiled else 2):
        run = run_chunks(_score_chunk, {"x": np.asarray(first.images, np.float32),
                                        "y": first.labels.astype(np.int32),
                                        "index": first.indices},
                         key=jr.key(int(config.seed)),
                         args=(classifier, substitute, defence, _tag(tags.CLEAN)),
                         batch_size=int(config.eval.batch_size), mesh=mesh, progress=False)
    out = {"seconds_per_image": run.wall_s / b, "images": b,
           "batch_size": int(config.eval.batch_size), "devices": int(mesh.size),
           "device_kind": jax.devices()[0].device_kind,
           "note": "one chunk of clean reconstructions (and two classifier calls), compiled "
                   "program, padded to the batch size"}
    _common.write_json(path, out)
    return out


# ----------------------------------------------------------------------------- scoring


def score_row(per: dict, clean: dict, labels: np.ndarray, fpr: float) -> dict:
    """Accuracies (95% intervals) and detection metrics of one row's record."""
    from jaxrob.evaluation import detection_rate, roc_auc, summarize

    m = per["pred_adv"].shape[0]
    y = labels[:m]
    err_clean = clean["error"][:m]
    det = detection_rate(err_clean, per["error_adv"], fpr=fpr)
    flagged = per["error_adv"] > det.threshold
    correct_def = per["pred_adv_def"] == y
    return {
        "clean": summarize(clean["pred"][:m] == y),
        "clean_defended": summarize(clean["pred_def"][:m] == y),
        "robust": summarize(per["pred_adv"] == y),
        "robust_defended": summarize(correct_def),
        # the defence and the detector together: correct after reconstruction, or flagged
        "defended_or_detected": summarize(correct_def | flagged),
        "detection": {"auc": roc_auc(err_clean, per["error_adv"]), "fpr_budget": fpr,
                      "rate": det.rate, "threshold": det.threshold, "fpr": det.fpr,
                      "mean_error_clean": float(np.mean(err_clean)),
                      "mean_error_adv": float(np.mean(per["error_adv"]))},
        "mean_linf": float(np.mean(per["linf"])), "mean_l2": float(np.mean(per["l2"])),
        "mean_l1": float(np.mean(per["l1"])),
    }


def run_row(config, name: str, workdir: pathlib.Path, models, defence, test, clean: dict,
            mesh, fpr: float, timing: dict) -> dict:
    """Evaluate one row (resumable) and return its results entry."""
    classifier, substitute = models
    timer = _common.Timer()
    m = int(config.eval.num_images) or len(test)
    sub = test.subset(slice(0, min(m, len(test))))
    fixed = config.eval.randomness == "fixed" and config.attack.crafted_on == "defence"
    row_defence = defence.replace(gradient=config.defence.gradient)
    crafted = crafted_model(config, classifier, substitute, row_defence)
    attack = make_attack(config.attack)
    fp = _fingerprint(config, "defence", "attack", "eval")
    atk = _run(_attack_chunk, (crafted, attack, fixed), sub.images, sub, config,
               workdir / "attack", mesh, fp, f"{name} attack")
    # the attacked images through the clean pass's compiled program (fresh keys: ADV)
    fp_score = {**_fingerprint(config, "defence", "eval"), "attack_record": fp}
    fp_score["defence"].pop("gradient")
    sc = _run(_score_chunk, (classifier, substitute, defence,
                             _tag(tags.FIXED if fixed else tags.ADV)),
              atk.records["x_adv"], sub, config, workdir / "score", mesh, fp_score,
              f"{name} reconstructions")
    s_adv = sc.records
    per = {"index": atk.records["index"], "label": np.asarray(sub.labels),
           "pred_adv": s_adv["pred"], "pred_adv_def": s_adv["pred_def"],
           "pred_adv_sub": s_adv["pred_sub"], "error_adv": s_adv["error"],
           "restart_adv": s_adv["restart"], "linf": atk.records["linf"],
           "l2": atk.records["l2"], "l1": atk.records["l1"],
           "attack_seconds": atk.records["seconds"], "score_seconds": s_adv["seconds"]}
    _common.save_npz(workdir / "per_example.npz", **per)
    total_s = atk.total_s + sc.total_s
    entry = {
        "name": name, "setting": CRAFTED_ON[config.attack.crafted_on],
        **score_row(per, clean, np.asarray(test.labels), fpr),
        "attack": _common.to_plain(config.attack),
        "defence": row_defence.manifest(),
        "randomness": ("fixed" if fixed else "stochastic")
        if config.attack.crafted_on == "defence" else "n/a (crafted without the defence)",
        "num_images": len(sub), "indices": [int(sub.indices[0]), int(sub.indices[-1]) + 1],
        "reconstruction_s_per_image": timing["seconds_per_image"],
        # compute seconds of every chunk (attack, then reconstruction of the attacked images),
        # compilation included, resumed runs included
        "attack_s": atk.total_s, "row_s": total_s, "row_s_per_image": total_s / len(sub),
        "wall_s_this_run": timer(), "chunks_run": atk.chunks_run + sc.chunks_run,
        "chunks_total": atk.chunks_total + sc.chunks_total,
    }
    _common.write_json(workdir / "results.json", entry)
    return entry


def _pct(s) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _attack_desc(a: dict, defence: dict) -> str:
    name = a["name"]
    if name in ("fgsm", "pgd", "apgd", "square"):
        d = f"{name} {a['norm']} {a['eps']:g}"
        if name in ("pgd", "apgd"):
            d += f" x{a['num_steps']}"
            if a.get("num_restarts", 1) > 1:
                d += f" R{a['num_restarts']}"
        if name == "square":
            d += f" q{a['n_queries']}"
    elif name == "deepfool":
        d = f"deepfool {a['norm']} x{a['num_steps']}"
    else:
        d = f"ead b={a['beta']:g} {a['binary_search_steps']}x{a['num_steps']}"
    if name in ("fgsm", "pgd", "apgd") and a.get("eot_samples", 1) > 1:
        d += f" EoT{a['eot_samples']}"
    if a["crafted_on"] == "defence":
        d += f", {defence['gradient']}"
        if a.get("detection_weight") is not None:
            d += f", detect w={a['detection_weight']:g}"
    return d


def table(rows, fpr: float) -> str:
    """A markdown table of the rows (accuracies % with 95% interval)."""
    fp = f"{100 * fpr:g}"
    head = ["row", "setting", "attack", "n", "clean", "clean+DD", "robust", "robust+DD",
            "AUC", f"det@{fp}%FPR", "DD or det", "mean Linf", "mean L2", "rec s/img",
            "row s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["setting"], _attack_desc(r["attack"], r["defence"]),
                 str(r["num_images"]), _pct(r["clean"]), _pct(r["clean_defended"]),
                 _pct(r["robust"]), _pct(r["robust_defended"]),
                 f"{r['detection']['auc']:.3f}", f"{100 * r['detection']['rate']:.1f}",
                 _pct(r["defended_or_detected"]), f"{r['mean_linf']:.3f}",
                 f"{r['mean_l2']:.2f}", f"{r['reconstruction_s_per_image']:.2f}",
                 f"{r['row_s_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- run


def run(config, workdir) -> dict:
    """Evaluate every row of ``config.rows``; returns (and writes) ``results.json``."""
    fpr = check_fpr(config.eval.fpr)
    rows = list(config.rows)
    if not rows:
        raise ValueError("rows: expected at least one row")
    names = [str(r.get("name", f"row{i}")) for i, r in enumerate(rows)]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: names must be unique, got {names}")
    row_configs = [_common.row_config(config, r) for r in rows]  # all checked up front
    for spec, rc in zip(rows, row_configs, strict=True):
        check_row(rc, dict(_common.to_plain(spec)))
        check_defence(rc.defence)
        make_attack(rc.attack)
        check_fpr(rc.eval.fpr)
    check_exports(config)
    timer, workdir, mesh = _common.begin(config, workdir)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    fast = bool(config.fast_vjp)
    ddpm, ddpm_info = _common.load_ddpm(config.ddpm, tuple(test.image_shape), fast_vjp=fast)
    classifier, clf_info = _common.load_classifier(config.classifier, config.data,
                                                   fast_vjp=fast)
    substitute, sub_info = _common.load_classifier(config.substitute, config.data,
                                                   fast_vjp=fast)
    defence = make_defence(config.defence, ddpm)
    models = (classifier, substitute)

    clean_run = clean_pass(config, workdir, models, defence, test, mesh)
    clean = clean_run.records
    _common.save_npz(workdir / "clean" / "per_example.npz", **clean)
    timing = reconstruction_timing(config, workdir, models, defence, test, mesh,
                                   compiled=clean_run.chunks_run > 0)
    y = np.asarray(test.labels)
    from jaxrob.evaluation import summarize

    clean_summary = {"classifier": summarize(clean["pred"] == y),
                     "defended": summarize(clean["pred_def"] == y),
                     "substitute": summarize(clean["pred_sub"] == y),
                     "mean_error": float(np.mean(clean["error"])),
                     "wall_s": clean_run.total_s, "chunks_run": clean_run.chunks_run}
    logging.info("clean: classifier %s, defended %s, substitute %s; %.2f s per reconstructed "
                 "image", _pct(clean_summary["classifier"]), _pct(clean_summary["defended"]),
                 _pct(clean_summary["substitute"]), timing["seconds_per_image"])
    entries = []
    for name, rc in zip(names, row_configs, strict=True):
        logging.info("row %s: attack %s, defence gradient %s", name,
                     _common.to_plain(rc.attack), rc.defence.gradient)
        e = run_row(rc, name, workdir / name, models, defence, test, clean, mesh,
                    check_fpr(rc.eval.fpr), timing)
        entries.append(e)
        logging.info("row %s done: robust %s, robust+DD %s, AUC %.3f", name,
                     _pct(e["robust"]), _pct(e["robust_defended"]), e["detection"]["auc"])
        md = table(entries, fpr)  # after every row: a stopped run leaves its finished rows
        (workdir / "table.md").write_text(md)
    results = {"rows": entries, "clean": clean_summary, "reconstruction_timing": timing,
               "defence": defence.manifest(), "ddpm": ddpm_info, "classifier": clf_info,
               "substitute": sub_info, "fast_vjp": fast, "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("\n%s", md)
    return results
