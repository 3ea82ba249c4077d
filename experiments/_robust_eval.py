"""The implementation behind ``experiments/robust_eval.py`` (its docstring says what the run
does); a private module, so the other entry points can share it without importing an entry point.
"""

from __future__ import annotations

import pathlib

import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_robust.py")


def _nfe(config, purifier) -> dict:
    from jaxrob.evaluation import attack_nfe, parse_protocol

    a = config.attack
    iters = 0 if a.name == "none" else (1 if a.name == "fgsm" else int(a.num_steps))
    restarts = 1 if a.name in ("none", "fgsm") else int(a.num_restarts)
    # forward_lock purifies every time (fresh reverse noise) and counts like stochastic
    samples = 1 if config.eval.randomness == "fixed" else max(
        parse_protocol(p)[1] for p in config.eval.protocols)
    nfe_fwd = purifier.nfe if purifier else 0
    # clean + adversarial input, plus the Fixed-AA candidates (attack iterates) when asked for
    inputs = 2 + len(_candidates(config))
    return {"per_purification": nfe_fwd,
            "per_gradient": purifier.nfe_backward if purifier else 0,
            "attack_per_image": attack_nfe(purifier, iterations=iters, restarts=restarts,
                                           eot_samples=int(a.eot_samples)),
            "scoring_per_image": inputs * samples * nfe_fwd}


def _candidates(config) -> tuple[int, ...]:
    """The attack iterates scored as extra Fixed-AA candidates (``eval.candidates``)."""
    return tuple(int(c) for c in (config.eval.get("candidates") or ()))


def _evaluate(config, workdir: pathlib.Path, defended, test, mesh, name: str) -> dict:
    """One resumable evaluation of ``config`` (purifier, attack, protocols) on ``test``."""
    from jaxrob.evaluation import ChunkStore, evaluate_robustness

    protocols = tuple(config.eval.protocols)
    fingerprint = {"purifier": _common.to_plain(config.purifier),
                   "attack": _common.to_plain(config.attack),
                   "randomness": config.eval.randomness, "protocols": list(protocols),
                   "seed": int(config.seed), "data": _common.to_plain(config.data),
                   "ddpm": _common.to_plain(config.ddpm),
                   "classifier": _common.to_plain(config.classifier)}
    keep_x_adv = bool(config.eval.get("keep_x_adv") or False)
    if keep_x_adv:  # only when set, so workdirs written before this option still resume
        fingerprint["keep_x_adv"] = True
    candidates = _candidates(config)
    if candidates:  # likewise
        fingerprint["candidates"] = list(candidates)
    store = ChunkStore(workdir / "chunks", fingerprint=fingerprint)
    attack = _common.make_attack(config.attack, return_iterates=bool(candidates))
    return evaluate_robustness(
        defended, attack, test.images, test.labels, test.indices,
        key=jr.key(int(config.seed)), protocols=protocols, randomness=config.eval.randomness,
        batch_size=_common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size"),
        store=store, mesh=mesh, vote_chunk=config.eval.get("vote_chunk"), keep_x_adv=keep_x_adv,
        candidates=candidates or None, log=lambda line: logging.info("%s: %s", name, line))


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
    if c.eval.randomness != "fixed" and c.purifier.enabled:
        c.attack.eot_samples = int(c.attack.eot_samples) * (
            factor if eot_factor is None else eot_factor)
        c.attack.eot_chunk = config.attack.get("eot_chunk")
    return c


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
    tag = f"x{factor}" + (f"_eot_x{eot_factor}" if eot_factor != factor else "")
    res = _evaluate(strong, workdir / f"convergence_{tag}", defended, sub, mesh,
                    f"{name} {tag}")
    out = {"factor": factor, "eot_factor": eot_factor, "num_images": m,
           "attack": _common.to_plain(strong.attack), "total_s": res["total_s"],
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


def run_row(config, name: str, workdir: pathlib.Path, models, test, mesh) -> dict:
    """Evaluate one row (resumable) and return its results entry."""
    from jaxrob.purify import DefendedModel

    ddpm, classifier = models
    purifier = _common.make_purifier(config.purifier, ddpm)
    defended = DefendedModel(classifier, purifier)
    protocols = tuple(config.eval.protocols)
    timer = _common.Timer()
    res = _evaluate(config, workdir, defended, test, mesh, name)
    conv = convergence_check(config, workdir, defended, test, res, mesh, name)
    per = res.pop("per_example")
    _common.save_npz(workdir / "per_example.npz", **per)
    entry = {
        "name": name,
        "clean": res["clean"], "adv": res.get("adv"),
        "purifier": purifier.manifest() if purifier else None,
        "attack": _common.to_plain(config.attack),
        "randomness": config.eval.randomness, "protocols": list(protocols),
        "candidates": list(_candidates(config)),
        "num_images": len(test), "indices": [int(test.indices[0]), int(test.indices[-1]) + 1],
        "nfe": _nfe(config, purifier),
        "mean_linf": float(np.mean(per["linf"])) if "linf" in per else None,
        "mean_l2": float(np.mean(per["l2"])) if "l2" in per else None,
        # compute seconds of every chunk of the record (resumed runs included) + the check
        "wall_s": res["total_s"] + (conv["total_s"] if conv else 0.0),
        "wall_s_this_run": timer(),
        "chunks_run": res["chunks_run"], "chunks_total": res["chunks_total"],
        "convergence": conv,
        # clean predictions of a few examples recomputed outside the chunk program
        "self_check": res["self_check"],
    }
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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pur = r["purifier"]
        pdesc = ("none" if pur is None else
                 f"{pur['sampler']} t*={pur['t_star']} {pur['steps']} steps")
        a = r["attack"]
        adesc = ("none" if a["name"] == "none" else
                 f"{a['name']} {a['norm']} eps={a['eps']:g} x{a.get('num_steps', 1)} "
                 f"EoT{a['eot_samples']}")
        bad = (r.get("self_check") or {}).get("mismatches")
        cells = [r["name"] + (" **self-check FAILED**" if bad else ""), pdesc,
                 pur["gradient"] if pur else "-", r["randomness"], adesc]
        cells += [_fmt(r["clean"][p]) for p in protocols]
        cells += [_fmt((r["adv"] or {}).get(p)) for p in protocols]
        cells += [str(r["nfe"]["attack_per_image"]), f"{r['wall_s']:.0f}", _conv(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config, workdir) -> dict:
    """Evaluate every row of ``config.rows``; returns (and writes) ``results.json``."""
    from jaxrob.evaluation import check_randomness, parse_protocol

    timer, workdir, mesh = _common.begin(config, workdir)
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
        _common.make_attack(rc.attack, return_iterates=bool(_candidates(rc)))
        names_p = [parse_protocol(p)[0] for p in rc.eval.protocols]
        check_randomness(rc.eval.randomness)
        if _candidates(rc) and "fixed_aa" not in names_p:
            raise ValueError(f"rows: {name}: eval.candidates are scored only by a "
                             f"'fixed_aa@N' protocol, got {list(rc.eval.protocols)}")
        if rc.eval.randomness == "forward_lock" and purifier is not None \
                and not getattr(purifier, "splits_randomness", False):
            raise ValueError(f"rows: {name}: randomness='forward_lock' needs a purifier that "
                             f"splits its forward and reverse noise")
    entries = []
    for name, rc in zip(names, row_configs, strict=True):
        logging.info("row %s: purifier %s, attack %s, %s", name,
                     _common.to_plain(rc.purifier), _common.to_plain(rc.attack),
                     rc.eval.randomness)
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

