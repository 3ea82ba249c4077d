"""The implementation behind ``experiments/robust_eval.py`` (its docstring says what the run
does); a private module, so the other entry points can share it without importing an entry point.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings

import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_robust.py")


def _nfe(config, purifier) -> dict:
    from jaxrob.evaluation import attack_nfe, parse_protocol

    a = config.attack
    iters = 0 if a.name == "none" else (1 if a.name == "fgsm" else int(a.num_steps))
    aa = a.name == "autoattack"
    restarts = 1 if a.name in ("none", "fgsm") else int(a.num_restarts)
    # forward_lock purifies every time (fresh reverse noise) and counts like stochastic
    samples = 1 if config.eval.randomness == "fixed" else max(
        parse_protocol(p)[1] for p in config.eval.protocols)
    nfe_fwd = purifier.nfe if purifier else 0
    # clean + adversarial input, plus the Fixed-AA candidates (attack iterates) when asked for
    inputs = 2 + len(_candidates(config))
    return {"per_purification": nfe_fwd,
            "per_gradient": purifier.nfe_backward if purifier else 0,
            # AutoAttack: stages stop at the examples they break, so it varies per image
            "attack_per_image": None if aa else attack_nfe(
                purifier, iterations=iters, restarts=restarts, eot_samples=int(a.eot_samples)),
            "scoring_per_image": inputs * samples * nfe_fwd}


def _candidates(config) -> tuple[int, ...]:
    """The attack iterates scored as extra Fixed-AA candidates (``eval.candidates``)."""
    return tuple(int(c) for c in (config.eval.get("candidates") or ()))


def _attack_plain(config) -> dict:
    """``config.attack`` as plain data, without the AutoAttack options unless the row runs
    AutoAttack (so the fingerprints of workdirs written before those options existed hold)."""
    plain = _common.to_plain(config.attack)
    if plain.get("name") != "autoattack":
        plain.pop("autoattack", None)
    if plain.get("loss") != "diffattack":
        plain.pop("diffattack", None)
    return plain


def _fingerprint(config) -> dict:
    """What a row's per-example records depend on (the chunk stores' fingerprint)."""
    return {"purifier": _common.to_plain(config.purifier), "attack": _attack_plain(config),
            "randomness": config.eval.randomness, "protocols": list(config.eval.protocols),
            "seed": int(config.seed), "data": _common.to_plain(config.data),
            "ddpm": _common.to_plain(config.ddpm),
            "classifier": _common.to_plain(config.classifier)}


def _evaluate(config, workdir: pathlib.Path, defended, test, mesh, name: str) -> dict:
    """One resumable evaluation of ``config`` (purifier, attack, protocols) on ``test``."""
    from jaxrob.evaluation import ChunkStore, evaluate_robustness

    if config.attack.name == "autoattack":
        return _evaluate_autoattack(config, workdir, defended, test, mesh, name)
    protocols = tuple(config.eval.protocols)
    fingerprint = _fingerprint(config)
    keep_x_adv = bool(config.eval.get("keep_x_adv") or False)
    if keep_x_adv:  # only when set, so workdirs written before this option still resume
        fingerprint["keep_x_adv"] = True
    candidates = _candidates(config)
    if candidates:  # likewise
        fingerprint["candidates"] = list(candidates)
    store = ChunkStore(workdir / "chunks", fingerprint=fingerprint)
    attack = _common.make_attack(config.attack, return_iterates=bool(candidates), mesh=mesh,
                                 defended=defended)
    return evaluate_robustness(
        defended, attack, test.images, test.labels, test.indices,
        key=jr.key(int(config.seed)), protocols=protocols, randomness=config.eval.randomness,
        batch_size=_common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size"),
        store=store, mesh=mesh, vote_chunk=config.eval.get("vote_chunk"), keep_x_adv=keep_x_adv,
        candidates=candidates or None, log=lambda line: logging.info("%s: %s", name, line))


AA_EOT_DEFAULT = {"rand": 20}  # AutoAttack's EoT samples per version (else 1)


def _aa_options(config) -> dict:
    """Keyword arguments of :func:`jaxrob.attacks.autoattack` from ``config.attack``: its
    ``autoattack`` options, ``num_steps`` as the iterations, ``eps`` and ``norm``."""
    a = config.attack
    aa = a.get("autoattack")

    def get(k, default):
        v = aa.get(k) if aa is not None else None
        return default if v is None else v

    version = get("version", "standard")
    eot = get("eot_samples", None)
    attacks = get("attacks", None)
    return {"eps": float(a.eps), "norm": a.norm, "version": version,
            "attacks": tuple(attacks) if attacks else None, "n_iter": int(a.num_steps),
            "n_target_classes": int(get("n_target_classes", 9)),
            "n_queries": int(get("n_queries", 5000)),
            "eot_samples": int(AA_EOT_DEFAULT.get(version, 1) if eot is None else eot)}


def _check_autoattack(config, name: str) -> None:
    """Up-front checks of an AutoAttack row (before any row runs)."""
    from jaxrob.attacks import AA_ATTACKS, AA_VERSIONS

    opts = _aa_options(config)
    if config.eval.randomness != "stochastic":
        raise ValueError(
            f"rows: {name}: autoattack rows run with eval.randomness='stochastic' (AutoAttack "
            f"calls the model on single examples with keys it derives itself, so a per-example "
            f"fixed purifier key cannot reach it), got {config.eval.randomness!r}")
    if _candidates(config):
        raise ValueError(f"rows: {name}: eval.candidates: AutoAttack returns no iterates")
    if opts["version"] not in AA_VERSIONS:
        raise ValueError(f"rows: {name}: attack.autoattack.version: expected one of "
                         f"{list(AA_VERSIONS)}, got {opts['version']!r}")
    if (opts["version"] == "custom") != (opts["attacks"] is not None) or any(
            a not in AA_ATTACKS for a in opts["attacks"] or ()):
        raise ValueError(f"rows: {name}: attack.autoattack.attacks: expected names from "
                         f"{list(AA_ATTACKS)} with version='custom' and none otherwise, got "
                         f"{opts['attacks']} with version={opts['version']!r}")
    if opts["norm"] not in ("linf", "l2") or not opts["eps"] > 0:
        raise ValueError(f"rows: {name}: attack.norm / attack.eps: AutoAttack rows take 'linf' "
                         f"or 'l2' and eps > 0, got {opts['norm']!r}, {opts['eps']}")
    for k in ("n_iter", "n_target_classes", "n_queries", "eot_samples"):
        if opts[k] < 1:
            raise ValueError(f"rows: {name}: autoattack {k}: expected >= 1, got {opts[k]}")


def _missing_ranges(done: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of at most ``batch_size`` examples not yet done."""
    out, start = [], None
    for i, d in enumerate([*done.tolist(), True]):
        if start is not None and (d or i - start == batch_size):
            out.append((start, i))
            start = None
        if not d and start is None:
            start = i
    return out


def _evaluate_autoattack(config, workdir: pathlib.Path, defended, test, mesh, name: str) -> dict:
    """An AutoAttack row: :func:`jaxrob.attacks.autoattack` over resumable chunks of the
    images (its host loop, on one device), then its ``x_adv`` scored under the row's protocols
    by :func:`jaxrob.evaluation.score_adversarial` (resumable, sharded). Per-example keys make
    both independent of the chunking."""
    from jaxrob.attacks import autoattack
    from jaxrob.evaluation import ChunkStore, score_adversarial

    opts = _aa_options(config)
    fingerprint = _fingerprint(config)
    key = jr.key(int(config.seed))
    batch_size = _common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    n = len(test)
    aa_dir = workdir / "autoattack"
    store = ChunkStore(aa_dir, fingerprint={**fingerprint, "part": "autoattack"})
    done = np.zeros(n, bool)
    for s, e in store.finished():
        done[s:e] = True
    todo = _missing_ranges(done, batch_size)
    for s, e in todo:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = autoattack(defended, test.images[s:e], test.labels[s:e], key,
                           indices=test.indices[s:e], batch_size=batch_size, **opts)
        for w in caught:
            logging.warning("%s: autoattack [%d, %d): %s", name, s, e, w.message)
        if not (aa_dir / "stages.json").exists():
            _common.write_json(aa_dir / "stages.json", {"stages": list(r.stages)})
        m = e - s
        full = lambda v: np.full((m,), v)  # noqa: E731 -- a chunk's scalars, per example
        store.save(s, e, index=test.indices[s:e], x_adv=r.x_adv, robust=r.robust,
                   broken_by=r.broken_by, looks_randomised=full(r.looks_randomised),
                   randomness=full(r.randomness),
                   outputs_probabilities=full(r.outputs_probabilities),
                   final_accuracy=full(r.final_accuracy), consistent=full(r.consistent),
                   max_perturbation=full(r.max_perturbation),
                   seconds=full((time.perf_counter() - t0) / m))
        logging.info("%s: autoattack [%d, %d): %s", name, s, e,
                     {k: round(v, 3) for k, v in r.accuracy.items()})
    rec = store.load()
    order = np.argsort(rec.pop("position"), kind="stable")
    rec = {k: v[order] for k, v in rec.items()}
    stages = json.loads((aa_dir / "stages.json").read_text())["stages"]
    bb = rec["broken_by"]
    # the running robust accuracy after each stage, over every chunk
    accuracy = {st: float(np.mean((bb == -1) | (bb > j))) for j, st in enumerate(stages)}
    square_unreliable = False
    if "square" in accuracy and len(accuracy) > 2:
        best_other = min(v for k, v in accuracy.items() if k != "square")
        square_unreliable = accuracy["square"] < best_other - 0.002
    res = score_adversarial(
        defended, test.images, rec["x_adv"], test.labels, test.indices, key=key,
        protocols=tuple(config.eval.protocols), randomness=config.eval.randomness,
        batch_size=batch_size, store=ChunkStore(workdir / "chunks", fingerprint=fingerprint),
        mesh=mesh, vote_chunk=config.eval.get("vote_chunk"),
        log=lambda line: logging.info("%s: %s", name, line))
    per = res["per_example"]
    per["aa_robust"], per["aa_broken_by"] = rec["robust"], bb
    scored_robust = per["pred_adv"][:, 0] == per["label"]
    aa_s = float(np.nansum(rec["seconds"]))
    res["autoattack"] = {
        "version": opts["version"], "attacks": stages[1:], "n_iter": opts["n_iter"],
        "eot_samples": opts["eot_samples"], "n_target_classes": opts["n_target_classes"],
        "n_queries": opts["n_queries"], "accuracy": accuracy,
        "broken_by": {st: int(np.sum(bb == j)) for j, st in enumerate(stages)},
        "robust_accuracy": float(np.mean(rec["robust"])),
        "looks_randomised": bool(rec["looks_randomised"].any()),
        "randomness": float(rec["randomness"].max()),
        "outputs_probabilities": bool(rec["outputs_probabilities"].any()),
        "square_unreliable": bool(square_unreliable),
        "final_accuracy": float(np.mean(rec["final_accuracy"])),
        "consistent": bool(rec["consistent"].all()),
        "max_perturbation": float(rec["max_perturbation"].max()),
        # AutoAttack's robust flags vs the one-shot scoring of its x_adv (fresh noise)
        "agrees_with_scoring": int(np.sum(scored_robust == rec["robust"])),
        "seconds": aa_s}
    res["total_s"] += aa_s
    res["chunks_run"] += len(todo)
    res["chunks_total"] += len(store.finished())
    return res


def _stronger(config, factor: int, eot_factor: int | None = None):
    """The row's attack with ``factor`` x the iterations and ``eot_factor`` (default
    ``factor``) x the EoT samples when the row draws fresh purifier noise in the attack
    (stochastic, forward_lock)."""
    c = config.copy_and_resolve_references()
    if c.attack.name in ("pgd", "apgd"):
        c.attack.num_steps = int(c.attack.num_steps) * factor
        if c.attack.get("step_size") is None and c.attack.name == "pgd":
            # the default step 2.5 eps / T would shrink with T: keep the base run's step
            c.attack.step_size = 2.5 * float(c.attack.eps) / int(config.attack.num_steps)
    if c.attack.name == "autoattack":
        c.attack.num_steps = int(c.attack.num_steps) * factor
        if c.eval.randomness != "fixed" and c.purifier.enabled and "autoattack" in c.attack:
            c.attack.autoattack.eot_samples = _aa_options(config)["eot_samples"] * (
                factor if eot_factor is None else eot_factor)
        return c
    if c.eval.randomness != "fixed" and c.purifier.enabled:
        c.attack.eot_samples = int(c.attack.eot_samples) * (
            factor if eot_factor is None else eot_factor)
        c.attack.eot_chunk = config.attack.get("eot_chunk")
    return c


def convergence_dir(row_dir: pathlib.Path, factor: int, eot_factor: int) -> pathlib.Path:
    """Where a row's convergence check keeps its records (``convergence_x4``,
    ``convergence_x4_eot_x1``, ...)."""
    tag = f"x{factor}" + (f"_eot_x{eot_factor}" if eot_factor != factor else "")
    return pathlib.Path(row_dir) / f"convergence_{tag}"


def convergence_check(config, workdir: pathlib.Path, defended, test, base: dict, mesh,
                      name: str) -> dict | None:
    """Rerun the first ``eval.convergence.num_images`` images with a ``factor`` x stronger
    attack; flag the row when its robust accuracy falls outside the base run's 95% interval
    on those images."""
    from jaxrob.evaluation import summarize

    conv = config.eval.get("convergence")
    if conv is None or not conv.get("factor") or config.attack.name in ("none", "fgsm"):
        return None
    factor = int(conv.factor)
    m = min(int(conv.num_images), len(test))
    sub = test.subset(slice(0, m))
    eot_factor = int(conv.eot_factor) if conv.get("eot_factor") else factor
    strong = _stronger(config, factor, eot_factor)
    check_dir = convergence_dir(workdir, factor, eot_factor)
    res = _evaluate(strong, check_dir, defended, sub, mesh,
                    f"{name} {check_dir.name.removeprefix('convergence_')}")
    # the check's per-example record, like the row's own (read by experiments/addt_table.py
    # for paired differences under the stronger attack)
    _common.save_npz(check_dir / "per_example.npz", **res["per_example"])
    out = {"factor": factor, "eot_factor": eot_factor, "num_images": m,
           "attack": _attack_plain(strong), "total_s": res["total_s"],
           "protocols": {}}
    moved = False
    for p, s_strong in (res.get("adv") or {}).items():
        s_base = summarize(base["per_example"][f"adv@{p}"][:m])
        lo, hi = s_base["ci95"]
        # converged: the stronger attack's accuracy on the same images lies inside the base
        # run's 95% interval (two intervals that merely overlap would let a drop from 9.4%
        # to 3.1% on 64 images pass)
        agree = lo - 1e-12 <= s_strong["accuracy"] <= hi + 1e-12
        moved |= not agree
        out["protocols"][p] = {"base": s_base, "stronger": s_strong, "agree": bool(agree),
                               "drop": s_base["accuracy"] - s_strong["accuracy"]}
    out["converged"] = not moved
    return out


def _soundness_attack(config) -> dict:
    """The gradient attack of the soundness checks for the row's attack: PGD / APGD as
    configured (DiffAttack rows: on their base classification loss); FGSM as one PGD step of
    eps; AutoAttack as its APGD-CE (iterations, EoT)."""
    a = config.attack
    if a.name == "autoattack":
        return dict(attack="apgd", num_steps=int(a.num_steps), step_size=None,
                    eot_samples=_aa_options(config)["eot_samples"], loss="ce",
                    random_start=True, num_restarts=1)
    if a.name == "fgsm":
        return dict(attack="pgd", num_steps=1, step_size=float(a.eps),
                    eot_samples=int(a.eot_samples), loss=a.loss, random_start=False,
                    num_restarts=1)
    # DiffAttack rows: the checks run the attack on its classification loss alone (the
    # deviation term needs the clean batch, which the checks' attacks are not given)
    loss = a.diffattack.base if a.loss == "diffattack" else a.loss
    return dict(attack=a.name, num_steps=int(a.num_steps),
                step_size=a.get("step_size") if a.name == "pgd" else None,
                eot_samples=int(a.eot_samples), loss=loss,
                random_start=bool(a.random_start), num_restarts=int(a.num_restarts))


def _check_soundness(config, name: str) -> None:
    """Up-front checks of ``eval.soundness`` (the rest is checked by soundness_checks before
    its own work)."""
    from jaxrob.evaluation import CHECKS, parse_protocol

    conf = config.eval.get("soundness")
    if conf is None or conf.get("num_images") is None:
        return
    if int(conf.num_images) < 1:
        raise ValueError(f"rows: {name}: eval.soundness.num_images: expected >= 1 (None: off), "
                         f"got {conf.num_images}")
    checks = tuple(conf.checks)
    if not checks or any(c not in CHECKS for c in checks):
        raise ValueError(f"rows: {name}: eval.soundness.checks: expected names from "
                         f"{list(CHECKS)}, got {list(checks)}")
    if int(conf.factor) < 2:
        raise ValueError(f"rows: {name}: eval.soundness.factor: expected >= 2, got "
                         f"{conf.factor}")
    if conf.get("protocol"):
        parse_protocol(conf.protocol)


def soundness_check(config, workdir: pathlib.Path, defended, test, mesh, name: str) -> dict | None:
    """The soundness checks (:func:`jaxrob.evaluation.soundness_checks`) of the row's attack on
    its first ``eval.soundness.num_images`` images; kept in ``<row>/soundness.json`` and reused
    while the row and the options are the same."""
    from jaxrob.checkpoint import normalize_fingerprint
    from jaxrob.evaluation import soundness_checks

    conf = config.eval.get("soundness")
    if conf is None or conf.get("num_images") is None:
        return None
    if config.attack.name == "none":
        return {"skipped": "the row has no attack"}
    m = min(int(conf.num_images), len(test))
    sub = test.subset(slice(0, m))
    fp = {**_fingerprint(config), "soundness": _common.to_plain(conf), "num_images": m}
    if config.eval.randomness != "stochastic":
        # checks recorded before every run of a fixed / forward-lock row's checks attacked the
        # base run's fixed-noise model (soundness_checks, "Keys") are not reused
        fp["soundness_keys"] = "shared"
    fingerprint = normalize_fingerprint(fp)
    path = workdir / "soundness.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            logging.info("%s: soundness checks kept from %s", name, path)
            return stored["result"]
    protocol = conf.get("protocol") or tuple(config.eval.protocols)[0]
    res = soundness_checks(
        defended, sub.images, sub.labels, sub.indices, key=jr.key(int(config.seed)),
        eps=float(config.attack.eps), norm=config.attack.norm, **_soundness_attack(config),
        checks=tuple(conf.checks), randomness=config.eval.randomness, protocol=protocol,
        large_eps=conf.get("large_eps"), large_eps_accuracy=float(conf.large_eps_accuracy),
        factor=int(conf.factor), eot_factor=conf.get("eot_factor"),
        square_queries=int(conf.square_queries), mesh=mesh,
        vote_chunk=config.eval.get("vote_chunk"),
        log=lambda line: logging.info("%s: %s", name, line))
    _common.write_json(path, {"fingerprint": fingerprint, "result": res})
    return res


def _with_earlier_checks(workdir: pathlib.Path, res: dict, name: str, checks: dict) -> dict:
    """``checks`` (``{"convergence": ..., "soundness": ...}``, ``None`` for a check this run did
    not make) with each missing one taken from the row's previous ``results.json``, when this
    run resumed every chunk (the chunk store's fingerprint check then guarantees the same row
    and records): a rerun that does not ask for a check keeps the one already made instead of
    dropping it. A rerun that asks for one replaces it."""
    wanted = [k for k, v in checks.items() if v is None]
    path = workdir / "results.json"
    if not wanted or res["chunks_run"] or not path.is_file():
        return dict(checks)
    prev = json.loads(path.read_text())
    kept = {k: prev[k] for k in wanted if prev.get(k)}
    if kept:
        logging.info("%s: %s kept from the earlier run's %s", name, " and ".join(kept), path)
    return {**checks, **kept}


def run_row(config, name: str, workdir: pathlib.Path, models, test, mesh) -> dict:
    """Evaluate one row (resumable) and return its results entry."""
    from jaxrob.purify import DefendedModel

    ddpm, classifier = models
    purifier = _common.make_purifier(config.purifier, ddpm)
    defended = DefendedModel(classifier, purifier)
    protocols = tuple(config.eval.protocols)
    timer = _common.Timer()
    res = _evaluate(config, workdir, defended, test, mesh, name)
    checks = _with_earlier_checks(workdir, res, name, {
        "convergence": convergence_check(config, workdir, defended, test, res, mesh, name),
        "soundness": soundness_check(config, workdir, defended, test, mesh, name)})
    conv, sound = checks["convergence"], checks["soundness"]
    per = res.pop("per_example")
    _common.save_npz(workdir / "per_example.npz", **per)
    entry = {
        "name": name,
        "clean": res["clean"], "adv": res.get("adv"),
        "purifier": purifier.manifest() if purifier else None,
        "attack": _attack_plain(config),
        "randomness": config.eval.randomness, "protocols": list(protocols),
        "candidates": list(_candidates(config)),
        "num_images": len(test), "indices": [int(test.indices[0]), int(test.indices[-1]) + 1],
        "nfe": _nfe(config, purifier),
        "mean_linf": float(np.mean(per["linf"])) if "linf" in per else None,
        "mean_l2": float(np.mean(per["l2"])) if "l2" in per else None,
        # compute seconds of every chunk of the record (resumed runs included) + the check
        "wall_s": (res["total_s"] + (conv["total_s"] if conv else 0.0)
                   + ((sound or {}).get("wall_s") or 0.0)),
        "wall_s_this_run": timer(),
        "chunks_run": res["chunks_run"], "chunks_total": res["chunks_total"],
        "convergence": conv,
        # clean predictions of a few examples recomputed outside the chunk program
        "self_check": res["self_check"],
    }
    if "autoattack" in res:  # only in AutoAttack rows: its progression and flags
        entry["autoattack"] = res["autoattack"]
    if sound is not None:  # only with eval.soundness: the checks' verdicts and numbers
        entry["soundness"] = sound
    if res["self_check"]["mismatches"]:
        logging.warning("%s: self-check FAILED at examples %s: the chunk program's records "
                        "cannot be trusted (docs/known_faults.md)", name,
                        res["self_check"]["mismatches"])
    _common.write_json(workdir / "results.json", entry)
    return entry


def _conv(row) -> str:
    c = row.get("convergence")
    if not c:
        return "-"
    drops = ", ".join(f"{p} {100 * v['stronger']['accuracy']:.1f}"
                      for p, v in c["protocols"].items())
    verdict = "yes" if c["converged"] else "**NO**"
    eot = c.get("eot_factor", c["factor"])
    more = f"x{c['factor']}" + (f", EoT x{eot}" if eot != c["factor"] else "")
    return f"{verdict} ({more} on {c['num_images']}: {drops})"


def _fmt(summary) -> str:
    if summary is None:
        return "-"
    lo, hi = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(rows, protocols) -> str:
    """A markdown table of the rows (accuracy % with 95% interval)."""
    head = ["row", "purifier", "gradient", "randomness", "attack"]
    head += [f"clean {p}" for p in protocols] + [f"robust {p}" for p in protocols]
    head += ["NFE attack/img", "wall s", "converged"]
    sound = any(r.get("soundness") for r in rows)
    if sound:
        head.append("soundness")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pur = r["purifier"]
        pdesc = ("none" if pur is None else
                 f"{pur['sampler']} t*={pur['t_star']} {pur['steps']} steps")
        a = r["attack"]
        if a["name"] == "autoattack":
            aa = r.get("autoattack") or {}
            adesc = (f"autoattack-{aa.get('version')} {a['norm']} eps={a['eps']:g} "
                     f"x{a['num_steps']} EoT{aa.get('eot_samples')}")
        else:
            adesc = ("none" if a["name"] == "none" else
                     f"{a['name']} {a['norm']} eps={a['eps']:g} x{a.get('num_steps', 1)} "
                     f"EoT{a['eot_samples']}")
            if a["name"] != "none" and a.get("loss", "ce") != "ce":
                d = a.get("diffattack") or {}
                adesc += (f" loss {d.get('base')} + {d.get('weight'):g} x deviation (DiffAttack)"
                          if a["loss"] == "diffattack" else f" loss {a['loss']}")
        bad = (r.get("self_check") or {}).get("mismatches")
        cells = [r["name"] + (" **self-check FAILED**" if bad else ""), pdesc,
                 pur["gradient"] if pur else "-", r["randomness"], adesc]
        cells += [_fmt(r["clean"][p]) for p in protocols]
        cells += [_fmt((r["adv"] or {}).get(p)) for p in protocols]
        nfe = r["nfe"]["attack_per_image"]
        cells += ["varies" if nfe is None else str(nfe), f"{r['wall_s']:.0f}", _conv(r)]
        if sound:
            cells.append(_sound_cell(r.get("soundness")))
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    aa_rows = [r for r in rows if r.get("autoattack")]
    if aa_rows:
        out += "\n" + _aa_section(aa_rows)
    if sound:
        out += "\n" + _sound_section(rows)
    return out


def _pct(summary) -> str:
    return f"{100 * summary['accuracy']:.1f}"


def _sound_cell(s) -> str:
    if not s:
        return "-"
    if "skipped" in s:
        return "skipped"
    bad = [c for c, v in s["verdicts"].items() if v != "pass"]
    verdict = {"pass": "pass", "fail": "**FAIL**", "inconclusive": "inconclusive"}[s["verdict"]]
    detail = ", ".join(f"{c} {s['verdicts'][c]}" for c in bad)
    return verdict + (f" ({detail})" if bad else "")


def _sound_numbers(name: str, c: dict) -> str:
    if name == "large_eps":
        return f"robust {_pct(c['adv'])} at eps={c['eps']:g} (pass <= {100 * c['threshold']:g})"
    if name == "iterations":
        return (f"{_pct(c['base'])} -> {_pct(c['stronger'])} at {c['num_steps']} steps, "
                f"EoT {c['eot_samples']}")
    if name == "gradient_free" and "square" in c:
        return (f"Square {_pct(c['square'])} vs gradient {_pct(c['base'])} "
                f"({c['broken_only_by_square']} broken only by Square)")
    if name == "transfer" and "transfer" in c:
        return (f"transfer {_pct(c['transfer'])} vs adaptive {_pct(c['base'])}"
                + (" (undefended)" if c.get("undefended") else ""))
    return c.get("reason", "")


def _sound_section(rows) -> str:
    """The soundness checks of every row: verdict, the numbers behind it, seconds."""
    lines = ["## Soundness checks (robust accuracy %)", "",
             "| row | images | check | verdict | numbers | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("soundness")
        if not s or "skipped" in s:
            continue
        for name, c in s["checks"].items():
            lines.append(f"| {r['name']} | {s['num_images']} | {name} | {c['verdict']} | "
                         f"{_sound_numbers(name, c)} | {c['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _aa_section(rows) -> str:
    """AutoAttack's running robust accuracy after each attack, and its flags."""
    lines = ["## AutoAttack (running robust accuracy %)", ""]
    for r in rows:
        aa = r["autoattack"]
        steps = " -> ".join(f"{k} {100 * v:.1f}" for k, v in aa["accuracy"].items())
        flags = [f for f in ("looks_randomised", "outputs_probabilities", "square_unreliable")
                 if aa[f]]
        if not aa["consistent"]:
            flags.append(f"re-measure {100 * aa['final_accuracy']:.1f} differs")
        lines.append(f"- {r['name']} ({aa['version']}): {steps}; flags: "
                     + (", ".join(flags) if flags else "none"))
    return "\n".join(lines) + "\n"


def _only_rows(config, names: list[str]) -> set[str]:
    """The rows to run now: ``config.only_rows`` (comma-separated row names; empty: all)."""
    only = [t.strip() for t in str(config.get("only_rows") or "").split(",") if t.strip()]
    unknown = [t for t in only if t not in names]
    if unknown:
        raise ValueError(f"only_rows: expected names of config.rows {names}, got unknown "
                         f"{unknown}")
    return set(only or names)


def run(config, workdir) -> dict:
    """Evaluate every row of ``config.rows`` (or the ``config.only_rows`` subset, listing the
    other rows' finished records from the workdir); returns (and writes) ``results.json``."""
    from jaxrob.evaluation import check_randomness, parse_protocol

    timer, workdir, mesh = _common.begin(config, workdir, eot=True)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    image_shape = tuple(test.image_shape)
    # the reverse-mode twins: same parameters, fast conv input-gradients inside lax loops
    fast = bool(config.fast_vjp)
    ddpm, ddpm_info = _common.load_ddpm(config.ddpm, image_shape, fast_vjp=fast)
    classifier, clf_info = _common.load_classifier(config.classifier, config.data,
                                                   fast_vjp=fast)
    models = (ddpm, classifier)

    rows = list(config.rows) or [{"name": "base"}]
    names = [str(r.get("name", f"row{i}")) for i, r in enumerate(rows)]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: names must be unique, got {names}")
    row_configs = [_common.row_config(config, r) for r in rows]  # all checked up front
    for name, rc in zip(names, row_configs, strict=True):
        purifier = _common.make_purifier(rc.purifier, ddpm)
        if rc.attack.name == "autoattack":
            _check_autoattack(rc, name)
            if "eot" in mesh.shape:
                raise ValueError(f"rows: {name}: AutoAttack does not split its EoT samples over "
                                 f"devices; expected mesh.eot_devices=1, got "
                                 f"{mesh.shape['eot']}")
        else:
            try:
                _common.make_attack(rc.attack, return_iterates=bool(_candidates(rc)),
                                    mesh=mesh)
            except ValueError as e:
                raise ValueError(f"rows: {name}: {e}") from None
            if rc.attack.loss == "diffattack" and (
                    purifier is None or getattr(purifier, "gradient", "exact") != "exact"):
                raise ValueError(f"rows: {name}: attack.loss='diffattack' needs a purifier with "
                                 f"exact gradients (its reverse-chain states), got "
                                 f"{'no purifier' if purifier is None else purifier.gradient}")
            if rc.attack.loss == "diffattack" and rc.eval.randomness != "stochastic":
                raise ValueError(f"rows: {name}: attack.loss='diffattack' purifies with the "
                                 f"attack's own keys (stochastic setting); expected "
                                 f"eval.randomness='stochastic', got {rc.eval.randomness!r}")
        _check_soundness(rc, name)
        names_p = [parse_protocol(p)[0] for p in rc.eval.protocols]
        check_randomness(rc.eval.randomness)
        if _candidates(rc) and "fixed_aa" not in names_p:
            raise ValueError(f"rows: {name}: eval.candidates are scored only by a "
                             f"'fixed_aa@N' protocol, got {list(rc.eval.protocols)}")
        if rc.eval.randomness == "forward_lock" and purifier is not None \
                and not getattr(purifier, "splits_randomness", False):
            raise ValueError(f"rows: {name}: randomness='forward_lock' needs a purifier that "
                             f"splits its forward and reverse noise")
    selected = _only_rows(config, names)
    entries = []
    for name, rc in zip(names, row_configs, strict=True):
        if name not in selected:  # not run now: its finished record, if any, stays listed
            done = workdir / name / "results.json"
            if done.exists():
                entries.append(json.loads(done.read_text()))
                logging.info("row %s: not in only_rows; its finished record is kept", name)
            continue
        logging.info("row %s: purifier %s, attack %s, %s", name,
                     _common.to_plain(rc.purifier), _attack_plain(rc), rc.eval.randomness)
        entries.append(run_row(rc, name, workdir / name, models, test, mesh))
        logging.info("row %s done: %s", name, {p: _fmt(s) for p, s in
                                               (entries[-1]["adv"] or {}).items()})
    protocols = tuple(config.eval.protocols)
    md = table(entries, protocols)
    (workdir / "table.md").write_text(md)
    results = {"rows": entries, "ddpm": ddpm_info, "classifier": clf_info,
               "fast_vjp": fast, "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("\n%s", md)
    return results

