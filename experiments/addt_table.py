"""ADDT's robustness table from ``configs/addt_robust.py`` runs: base vs ADDT vs the ablations.

    python experiments/addt_table.py runs/addt_robust/digits_* --out docs/addt_robust/digits_linf.md

Each argument is the workdir of one ``experiments/robust_eval.py --config
configs/addt_robust.py:<dataset>,<model>[,l2]`` run. Runs are grouped by (dataset, norm, eps);
within a group every run must have used the same images and attack (checked). Writes, per group:

1. the table: per setting (sampler, t*, randomness) and model, clean one-shot accuracy and
   robust accuracy one-shot, worst-of-10 and Fixed-AA@20 (95% intervals as ``robust_eval``
   records them);
2. ADDT's claims, paired on the same images: (i) stochasticity -- robust accuracy in the
   stochastic setting minus the DW-box setting, per model; (ii) fine-tuning -- each fine-tune
   minus the base model, and ADDT minus the Gaussian control (``no_cgpo``), per setting. Each
   difference with a paired bootstrap 95% interval over the images (2000 resamples, seed 0);
3. the rows' convergence checks, where a run made them (``--config.eval.convergence.factor=4
   --config.eval.convergence.num_images=64``): base vs stronger attack on the same images,
   and claim 2's paired differences again on the checks' records (their ``per_example.npz``,
   or rescored from their chunks for older checks; a record that does not reproduce the
   check's summary is refused);
4. the rows' soundness checks, where a run made them (``--config.eval.soundness.num_images=32``,
   :func:`jaxrob.evaluation.soundness_checks`): on the row's first images, the gradient attack
   against the same attack at a large eps, Square (gradient-free), the transfer attack from the
   bare classifier and, where run, more iterations (and EoT samples), with each check's verdict.

Every finished row is read (``<workdir>/<row>/results.json`` and ``per_example.npz``, written
when the row ends), so a run cut short contributes its finished rows; missing rows show ``-``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from configs.addt_robust import MODELS, model_path

MODEL_NAMES = {"base": "base DDPM", "addt": "ADDT", "no_rbgm": "ADDT w/o RBGM",
               "no_cgpo": "control (w/o CGPO)"}
PROTOCOLS = ("one_shot", "worst_of@10", "fixed_aa@20")
SETTING_NAMES = {"stochastic": "stochastic", "dwbox": "DW-box", "forward_lock": "forward-lock"}


def load_run(workdir: pathlib.Path) -> dict:
    """One run: its config's dataset / model / attack and its finished rows' summaries and
    per-example scores. Raises with the path when the run is not an ``addt_robust`` run or has
    no finished row."""
    workdir = pathlib.Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{workdir}: expected a robust_eval run of "
                                f"configs/addt_robust.py (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if "addt_table" not in cfg:
        raise ValueError(f"{workdir}: expected a run of configs/addt_robust.py (its config.json "
                         f"has no 'addt_table' entry)")
    rows = {}
    for spec in cfg.get("rows", ()):  # the config's order; only rows that have finished
        name = spec["name"]
        res_path, rec = workdir / name / "results.json", workdir / name / "per_example.npz"
        if not (res_path.is_file() and rec.is_file()):
            continue
        with np.load(rec) as z:
            scores = {k: np.asarray(z[k]) for k in z.files if "@" in k}
            scores["index"] = np.asarray(z["index"])
            labels = np.asarray(z["label"]) if "label" in z.files else None
        summary = json.loads(res_path.read_text())
        rows[name] = {"summary": summary, "scores": scores,
                      "conv_scores": _convergence_scores(workdir / name, summary,
                                                         scores["index"], labels)}
    if not rows:
        raise FileNotFoundError(f"{workdir}: no finished row (no <row>/results.json)")
    atk = cfg["attack"]
    return {"workdir": str(workdir), "dataset": cfg["addt_table"]["dataset"],
            "model": _model_of(cfg), "norm": atk["norm"], "eps": float(atk["eps"]),
            "attack": (atk["name"], atk["num_steps"], atk["eot_samples"], atk["loss"]),
            "test_split": cfg["data"]["test_split"], "rows": rows,
            "wall_s": sum(r["summary"].get("wall_s") or 0.0 for r in rows.values())}


def _convergence_scores(row_dir: pathlib.Path, summary: dict, index, labels) -> dict | None:
    """Per-example scores of the row's convergence check (its stronger attack on the first
    images): the check's ``per_example.npz`` (every protocol), or, for checks recorded before
    ``robust_eval`` wrote one, one-shot and Fixed-AA@20 rescored from its chunk records as
    ``robust_eval`` scores them (Fixed-AA over the clean input and the attack's result). Either
    must reproduce the check's own summary, else ValueError; None without a check."""
    conv = summary.get("convergence")
    if not conv or "factor" not in conv:
        return None
    from experiments._robust_eval import convergence_dir

    check = convergence_dir(row_dir, int(conv["factor"]), int(conv["eot_factor"]))
    if (check / "per_example.npz").is_file():
        source = check / "per_example.npz"
        with np.load(source) as z:
            out = {k: np.asarray(z[k]) for k in z.files if k.startswith("adv@")}
            out["index"] = np.asarray(z["index"])
    elif labels is not None and (check / "chunks").is_dir():
        source = check / "chunks"
        out = _rescore_chunks(source, summary, index, labels)
    else:
        return None
    for k, v in out.items():  # the record must reproduce the check's own summary
        want = conv["protocols"].get(k.removeprefix("adv@"), {}).get("stronger")
        if k != "index" and want and abs(float(np.mean(v)) - want["accuracy"]) > 1e-6:
            raise ValueError(f"{source}: {k} {float(np.mean(v)):.4f} differs from the "
                             f"check's recorded {want['accuracy']:.4f}")
    return out


def _rescore_chunks(chunks: pathlib.Path, summary: dict, index, labels) -> dict:
    """One-shot and Fixed-AA@20 per example from a convergence check's chunk records."""
    from jaxrob.evaluation import ChunkStore, fixed_aa_score, score_predictions

    rec = ChunkStore(chunks, write=False).load()
    idx = np.asarray(rec["index"])
    label_of = dict(zip(index.tolist(), labels.tolist(), strict=True))
    y = np.asarray([label_of[int(i)] for i in idx])
    pred_adv, pred_clean = np.asarray(rec["pred_adv"]).T, np.asarray(rec["pred_clean"]).T
    out = {"index": idx, "adv@one_shot": score_predictions(pred_adv, y, "one_shot")}
    if summary.get("randomness") == "fixed":  # one fixed purification: every protocol's score
        out["adv@fixed_aa@20"] = out["adv@one_shot"]
    elif pred_adv.shape[0] >= 20:
        out["adv@fixed_aa@20"] = fixed_aa_score(np.stack([pred_clean, pred_adv]), y, 20)
    return out


def _model_of(cfg: dict) -> str:
    """The model a run evaluated, from the DDPM export it loaded (the committed export
    ``configs.addt_robust.model_path`` names for it), so that a run whose ``ddpm.path`` was
    overridden on the command line is labelled by what it ran; the config arg's model for
    exports named otherwise."""
    name = pathlib.PurePath(str(cfg.get("ddpm", {}).get("path", ""))).name
    dataset = cfg["addt_table"]["dataset"]
    for model in MODELS:
        if pathlib.PurePath(model_path(dataset, model)).name == name:
            return model
    return cfg["addt_table"]["model"]


def _cell(summary: dict | None) -> str:
    if not summary:
        return "-"
    lo, hi = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def paired_diff(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0
                ) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired examples and its bootstrap 95% interval, in points."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_diff: expected two equal-length 1-d score arrays, got "
                         f"{a.shape} and {b.shape}")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return 100 * d.mean(), 100 * lo, 100 * hi


def _diff_cell(ra: dict | None, rb: dict | None, key: str) -> str:
    if not ra or not rb or key not in ra["scores"] or key not in rb["scores"]:
        return "-"
    if not np.array_equal(ra["scores"]["index"], rb["scores"]["index"]):
        raise ValueError("paired comparison: the two rows scored different images")
    m, lo, hi = paired_diff(ra["scores"][key], rb["scores"][key])
    mark = "" if lo <= 0 <= hi else " *"
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]{mark}"


def _settings(runs: list[dict]) -> list[str]:
    order = []
    for run in runs:
        for name in run["rows"]:
            if name != "classifier" and name not in order:
                order.append(name)
    return order


def _setting_label(name: str) -> str:
    sampler, t, rand = name.split("_", 2)
    return f"{sampler.upper()} t*={t[1:]} {SETTING_NAMES.get(rand, rand)}"


def group_table(runs: list[dict]) -> str:
    """The markdown of one (dataset, norm, eps) group."""
    first = runs[0]
    for run in runs[1:]:
        for key in ("test_split", "attack"):
            if run[key] != first[key]:
                raise ValueError(f"{run['workdir']}: {key} {run[key]} differs from "
                                 f"{first['workdir']}'s {first[key]}: not comparable")
    by_model = {r["model"]: r for r in runs}
    models = [m for m in MODELS if m in by_model]
    name, steps, eot, loss = first["attack"]
    n = next(iter(first["rows"].values()))["summary"]["num_images"]
    out = [f"### {first['dataset']}, {first['norm']} eps {first['eps']:g}: {n} test images "
           f"(`{first['test_split']}`), {name.upper()} x{steps}, EoT {eot} (DW-box: EoT 1), "
           f"{loss} loss, exact gradients", ""]
    clf = first["rows"].get("classifier")
    if clf:
        out += [f"Classifier alone: clean {_cell(clf['summary']['clean']['one_shot'])}, robust "
                f"{_cell(clf['summary']['adv']['one_shot'])}.", ""]
    out += ["| setting | model | clean one-shot | robust one-shot | robust worst-of-10 | "
            "robust Fixed-AA@20 | wall s |", "|---|---|---|---|---|---|---|"]
    for s in _settings(runs):
        for m in models:
            row = by_model[m]["rows"].get(s)
            summ = row["summary"] if row else None
            cells = [_cell(summ["clean"].get("one_shot")) if summ else "-"]
            cells += [_cell(summ["adv"].get(p)) if summ else "-" for p in PROTOCOLS]
            wall = f"{summ['wall_s']:.0f}" if summ and summ.get("wall_s") is not None else "-"
            out.append(f"| {_setting_label(s)} | {MODEL_NAMES[m]} | " + " | ".join(cells)
                       + f" | {wall} |")
    out += ["", "**Claim 1 (stochasticity)**: robust accuracy in the stochastic setting minus "
            "the DW-box setting, same images, points (paired bootstrap 95% interval; * = the "
            "interval excludes 0).", "",
            "| purifier | model | one-shot | Fixed-AA@20 |", "|---|---|---|---|"]
    for s in _settings(runs):
        if not s.endswith("_stochastic"):
            continue
        dw = s.replace("_stochastic", "_dwbox")
        for m in models:
            rows = by_model[m]["rows"]
            out.append(f"| {_setting_label(s).rsplit(' ', 1)[0]} | {MODEL_NAMES[m]} | "
                       + " | ".join(_diff_cell(rows.get(s), rows.get(dw), f"adv@{p}")
                                    for p in ("one_shot", "fixed_aa@20")) + " |")
    pairs = [(m, "base") for m in models if m != "base"] + (
        [("addt", "no_cgpo")] if {"addt", "no_cgpo"} <= set(models) else [])
    if pairs and "base" in by_model:
        out += ["", "**Claim 2 (fine-tuning)**: robust accuracy of a fine-tune minus the base "
                "DDPM's (and ADDT minus the Gaussian control), same images and keys, points "
                "(paired bootstrap 95% interval; * = excludes 0).", "",
                "| setting | " + " | ".join(f"{MODEL_NAMES[a]} - {MODEL_NAMES[b]} one-shot / "
                                            f"Fixed-AA@20" for a, b in pairs) + " |",
                "|---|" + "---|" * len(pairs)]
        for s in _settings(runs):
            cells = []
            for a, b in pairs:
                ra, rb = by_model[a]["rows"].get(s), by_model[b]["rows"].get(s)
                cells.append(" / ".join(_diff_cell(ra, rb, f"adv@{p}")
                                        for p in ("one_shot", "fixed_aa@20")))
            out.append(f"| {_setting_label(s)} | " + " | ".join(cells) + " |")
    out += _convergence(by_model, models, _settings(runs))
    out += _soundness(by_model, models, _settings(runs))
    out += ["", "Runs (compute seconds of their finished rows): "
            + "; ".join(f"{MODEL_NAMES[m]} `{by_model[m]['workdir']}` "
                        f"({by_model[m]['wall_s']:.0f} s)" for m in models), ""]
    return "\n".join(out)


def _convergence(by_model: dict, models: list[str], settings: list[str]) -> list[str]:
    """The rows that carry a convergence check (``robust_eval --config.eval.convergence.*``):
    the base and the stronger attack's accuracy on the same first images, and the verdict."""
    lines = []
    for s in settings:
        for m in models:
            row = by_model[m]["rows"].get(s)
            conv = row["summary"].get("convergence") if row else None
            if not conv:
                continue
            base, strong = row["summary"].get("attack") or {}, conv["attack"]
            cells = []
            for p in ("one_shot", "fixed_aa@20"):
                rec = conv["protocols"].get(p)
                cells.append(f"{_cell(rec['base'])} -> {_cell(rec['stronger'])}" if rec else "-")
            lines.append(
                f"| {_setting_label(s)} | {MODEL_NAMES[m]} | {conv['num_images']} | "
                f"x{base.get('num_steps', '?')} EoT {base.get('eot_samples', '?')} -> "
                f"x{strong['num_steps']} EoT {strong['eot_samples']} | " + " | ".join(cells)
                + f" | {'yes' if conv['converged'] else '**no**'} |")
    if not lines:
        return []
    out = ["", "**Convergence**: the row's first images attacked again with more iterations "
           "(and EoT samples); converged = the stronger attack's accuracy lies inside the base "
           "run's 95% interval on those images, under every protocol.", "",
           "| setting | model | images | attack -> stronger | robust one-shot | "
           "robust Fixed-AA@20 | converged |", "|---|---|---|---|---|---|---|"] + lines
    # claim 2 again under the stronger attack, where two models' checks scored the same images
    pairs = [(m, "base") for m in models if m != "base"] + (
        [("addt", "no_cgpo")] if {"addt", "no_cgpo"} <= set(models) else [])
    diff_lines = []
    for s in settings:
        for a, b in pairs:
            ra, rb = by_model[a]["rows"].get(s), by_model[b]["rows"].get(s)
            ca, cb = (ra or {}).get("conv_scores"), (rb or {}).get("conv_scores")
            if not ca or not cb or not np.array_equal(ca["index"], cb["index"]):
                continue
            ra_, rb_ = {"scores": ca}, {"scores": cb}
            diff_lines.append(f"| {_setting_label(s)} | {MODEL_NAMES[a]} - {MODEL_NAMES[b]} | "
                              f"{ca['index'].size} | " + " | ".join(
                                  _diff_cell(ra_, rb_, f"adv@{p}")
                                  for p in ("one_shot", "fixed_aa@20")) + " |")
    if diff_lines:
        out += ["", "Claim 2 under the stronger attack (the checks' records, same images and "
                "keys; paired bootstrap 95% interval, * = excludes 0):", "",
                "| setting | difference | images | one-shot | Fixed-AA@20 |",
                "|---|---|---|---|---|"] + diff_lines
    return out


def _sound_cell(check: dict | None, key: str | None = None, what: str = "") -> str:
    """One soundness check's accuracy ``check[key]`` (points, no interval; none for a check
    without one, e.g. the flags) and its verdict; ``-`` when the check was not run."""
    if not check:
        return "-"
    verdict = check["verdict"]
    mark = {"pass": "pass", "fail": "**fail**", "inconclusive": "inconcl."}[verdict]
    if key is None or key not in check:  # e.g. transfer without a bare classifier
        return mark
    return f"{100 * check[key]['accuracy']:.1f}{what} {mark}"


def _soundness(by_model: dict, models: list[str], settings: list[str]) -> list[str]:
    """The rows that carry soundness checks (``robust_eval --config.eval.soundness.*``): the
    gradient attack rerun on the row's first images, the other attacks' accuracies on them and
    each check's verdict."""
    lines, queries, large = [], set(), set()
    seen_classifier = False
    for s in ["classifier"] + settings:
        for m in models:
            row = by_model[m]["rows"].get(s)
            sound = row["summary"].get("soundness") if row else None
            if not sound:
                continue
            if s == "classifier" and seen_classifier:
                continue  # the same classifier row in every run: list it once
            seen_classifier |= s == "classifier"
            checks, base = sound["checks"], sound.get("base") or {}
            it = checks.get("iterations")
            stronger = (f" (x{it['num_steps']} EoT {it['eot_samples']})" if it and
                        "stronger" in it else "")
            if "gradient_free" in checks:
                queries.add(checks["gradient_free"].get("queries"))
            if "large_eps" in checks:
                large.add(checks["large_eps"].get("eps"))
            label = "classifier alone" if s == "classifier" else _setting_label(s)
            verdict = sound["verdict"]
            model = "-" if s == "classifier" else MODEL_NAMES[m]
            lines.append(
                f"| {label} | {model} | {sound['num_images']} | {_cell(base.get('adv'))} | "
                f"{_sound_cell(checks.get('large_eps'), 'adv')} | "
                f"{_sound_cell(checks.get('gradient_free'), 'square')} | "
                f"{_sound_cell(checks.get('transfer'), 'transfer')} | "
                f"{_sound_cell(it, 'stronger', stronger)} | "
                f"{_sound_cell(checks.get('flags'))} | "
                f"{'**fail**' if verdict == 'fail' else verdict} |")
    if not lines:
        return []
    big = ", ".join(f"{e:g}" for e in sorted(large)) or "-"
    q = ", ".join(str(v) for v in sorted(queries)) or "-"
    return ["", f"**Soundness**: on the row's first images, the gradient attack rerun, then "
            f"robust one-shot accuracy (%) under the same attack at eps {big} (pass: at most "
            f"10%), Square ({q} queries, no gradients; fail: below the gradient attack's 95% "
            f"interval), the attack run on the bare classifier and scored on the defence "
            f"(transfer; fail as Square), and more iterations / EoT samples where run (fail: "
            f"outside the interval); flags: AutoAttack's checks (EoT on a randomised model, "
            f"re-measured accuracy, eps-ball, logits; inconcl. on a DW-box row by design: a "
            f"randomised model scored with its noise fixed). inconcl. elsewhere = lower than "
            f"the gradient attack but inside its interval; '-' = not run.", "",
            "| setting | model | images | gradient attack | large eps | Square | transfer | "
            "more iterations | flags | verdict |", "|---|---|---|---|---|---|---|---|---|---|"
            ] + lines


def format_tables(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["norm"], run["eps"]), []).append(run)
    for key, g in groups.items():
        models = [r["model"] for r in g]
        if len(set(models)) != len(models):
            raise ValueError(f"group {key}: more than one run of the same model: "
                             f"{[r['workdir'] for r in g]}")
    return "\n".join(group_table(g) for _, g in sorted(groups.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="write the markdown here (also printed)")
    args = p.parse_args(argv)
    workdirs = [w for w in args.workdirs if w.is_dir()]
    for w in args.workdirs:
        if not w.is_dir():  # e.g. a shell glob that also matched the runs' log files
            print(f"addt_table: skipping {w} (not a directory)", file=sys.stderr)
    if not workdirs:
        p.error(f"expected run directories, got {[str(w) for w in args.workdirs]}")
    md = format_tables([load_run(w) for w in workdirs])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
