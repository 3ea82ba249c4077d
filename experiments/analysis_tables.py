"""Markdown tables of finished analysis runs (the numbers of docs/analysis.md), from results.json.

    python experiments/analysis_tables.py runs/mnist_jacobian runs/mnist_compression \
        runs/mnist_threshold

Each argument is the workdir of ``jacobian_spectrum.py``, ``compression_fit.py`` or
``critical_threshold.py`` (recognised by its results.json); the tables are printed, nothing is
computed again.
"""

from __future__ import annotations

import json
import pathlib
import sys


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _ms(d, fmt="{:.3f}"):
    return "-" if d is None or d.get("mean") is None else (
        f"{fmt.format(d['mean'])} ± {fmt.format(d['std'])}")


def jacobian_table(r) -> str:
    lines = [f"{r['num_images']} images, wall {r['wall_s'] / 60:.1f} min",
             "| setting | below 0.25 | above 1.0 | sigma_max | empirical rate | top-k rel. err "
             "(max) |", "|---|---|---|---|---|---|"]
    for s in r["settings"]:
        m = s["summary"]
        err = m.get("topk_rel_err_max") or m.get("topk_max_rel_err") or {}
        lines.append(f"| {s['name']} | {_f(m['frac_below']['mean'])} | "
                     f"{_f(m['frac_above']['mean'], '{:.4f}')} | {_ms(m['sigma_max'], '{:.2f}')} | "
                     f"{_ms(m.get('rate'), '{:.3f}')} | {_f(err.get('max'), '{:.1e}')} |")
    return "\n".join(lines)


def compression_table(r) -> str:
    lines = [f"{r['num_images']} images, wall {r['wall_s'] / 60:.1f} min",
             "| setting | clean | robust (fixed) | adversarial rate | empirical rate |",
             "|---|---|---|---|---|"]
    for s in r["settings"]:
        c = s["compression"]
        lines.append(f"| {s['name']} | {_f(s['clean']['accuracy'])} | "
                     f"{_f(s['robust']['accuracy'])} [{_f(s['robust']['ci95'][0])}, "
                     f"{_f(s['robust']['ci95'][1])}] | {_f(c['adversarial']['mean'])} | "
                     f"{_f(c['empirical']['mean'])} |")
    lines += ["", "| x | fit | bottom | top | k | x0 | R^2 |", "|---|---|---|---|---|---|---|"]
    for x, fits in r["fits"].items():
        for name, fit in fits.items():
            if not isinstance(fit, dict) or "params" not in fit:
                continue
            p, ci = fit["params"], fit["ci"]
            fixed = dict(zip(("bottom", "top"), fit.get("asymptotes") or (None, None),
                             strict=True))
            cells = [f"{p[n]:.3g} [{ci[n][0]:.3g}, {ci[n][1]:.3g}]" if n in p
                     else f"{fixed[n]:.3g} (fixed)" for n in ("bottom", "top", "k", "x0")]
            lines.append(f"| {x} | {name} | " + " | ".join(cells) + f" | {fit['r2']:.3f} |")
    return "\n".join(lines)


def threshold_table(r) -> str:
    s = r["summary"]
    lines = [f"{r['num_images']} images, wall {r['wall_s'] / 60:.1f} min",
             "| direction | curves | censored | threshold (median) | slope k (mean ± std) | "
             "fixed key step-like | second crossings |", "|---|---|---|---|---|---|---|"]
    for d in ("adversarial", "random"):
        a = s[d]
        lines.append(f"| {d} | {a['curves']} | {a['censored_fraction']:.2f} | "
                     f"{_f(a['threshold']['median'], '{:.2f}')} | "
                     f"{_ms(a['slope'], '{:.2f}')} | "
                     f"{a['fixed_key']['step_like_fraction']:.2f} | "
                     f"{a['fixed_key']['second_crossing_fraction']:.2f} |")
    f = s["fuzzy"]
    lines.append(f"\nfuzzy: mean attack-success probability "
                 f"{f['success_probability']['mean']:.3f}, CFR area {f['area']:.3f}, never broken "
                 f"{f['never_broken']:.3f}, always broken {f['always_broken']:.3f}")
    return "\n".join(lines)


def table(workdir) -> str:
    r = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    if "fits" in r:
        return compression_table(r)
    if "settings" in r:
        return jacobian_table(r)
    if "summary" in r and "fuzzy" in r["summary"]:
        return threshold_table(r)
    raise ValueError(f"{workdir}: expected the workdir of jacobian_spectrum, compression_fit "
                     "or critical_threshold")


if __name__ == "__main__":
    for w in sys.argv[1:]:
        print(f"## {w}\n\n{table(w)}\n")
