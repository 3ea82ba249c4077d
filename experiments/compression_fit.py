"""Compression rate vs fixed-randomness robust accuracy (Yuezhang & Wei 2025, Fig. 3b and 3c).

    python experiments/compression_fit.py --config configs/mnist_compression.py \
        --workdir runs/mnist_compression

For each purifier setting of ``config.settings`` (nested dicts ``{"name": ..., "purifier":
{"t_star": ..., "sampler": ..., "num_steps": ...}}`` merged by ``experiments._common.row_config``,
exactly like robust_eval's ``rows``):

1. fixed-randomness robust accuracy under the exact-gradient attack of ``config.attack``
   (``experiments._robust_eval.run_row``, resumable: ``<workdir>/<name>/chunks``). Example
   ``i`` is purified with the key ``fold_in(fold_in(key(seed), index_i), FIXED)``
   (``jaxrob.evaluation.fixed_purifier_keys``) by the attack AND the scoring
   (``jaxrob.evaluation``'s fixed mode);
2. per image, under that same key ``f = purifier(., k_i)``: the adversarial compression rate
   ``||f(x_adv) - f(x)||_2 / ||x_adv - x||_2`` (the paper's definition: how much the
   purifier shrinks the adversarial displacement around the anchor ``f(x)``) and the empirical
   rate of :func:`jaxrob.analysis.compression_rate_empirical` (random points of the attack's
   ball; gradient-free), in resumable chunks (``jaxrob.evaluation.run_chunks``,
   ``<name>/compression``). ``x_adv`` comes from run_row's record when it keeps it
   (``config.eval.keep_x_adv``), else the attack is recomputed with the same function, keys
   and chunking (``<name>/x_adv``; its predictions are checked against run_row's record);
3. across settings: :func:`jaxrob.analysis.fit_sigmoid` of robust accuracy vs mean compression
   rate (4-parameter, binomially weighted, and with asymptotes (0, clean accuracy)), with
   standard errors, confidence intervals, R^2 and the extrapolation to rate 0 next to the
   clean accuracies; Fig. 3c: the undefended classifier's robust accuracy under the same attack
   at radius ``eps * rate`` for ``config.study.classifier_rates`` (``<workdir>/classifier/``).

Writes ``results.json`` (per setting and fit; the paper's claims next to ours; manifest),
``per_example.npz`` (``<setting>__<field>`` arrays) and ``compression_fit.png``.
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

import jaxrob._keys as tags
from experiments import _common, _robust_eval

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_compression.py")
# jaxrob.evaluation (fixed randomness): example i's purifier key is
# jaxrob.evaluation.fixed_purifier_keys(key(seed), indices)[i], shared by every attack step and
# the scoring. The rates are measured under the same key; "key_check" in results.json
# confirms it (the predictions of f(x) must equal run_row's clean predictions).
# the paper's statements about Fig. 3b/3c (CIFAR-10, WRN-28-10, DiffPure-style DDPM/DDIM,
# PGD-EoT Linf 8/255; the fitted values are not given in the text) and its fixed-randomness
# robust accuracies (ANCHORS.md section 4)
PAPER = {
    "fig3b": "the compression rate and the robustness without stochasticity follow a "
             "consistent relation well captured by a sigmoid; the curve generalizes across "
             "sampling methods and extrapolates smoothly to clean accuracies at the "
             "y-intercept",
    "fig3c": "the compression-robustness curve resembles the PGD robustness curve of the "
             "base classifier under smaller attack budgets",
    "compression_rate": "per-image shrinkage of the adversarial displacement toward the "
                        "anchor f(x0) under fixed randomness",
    "fixed_randomness_robust_accuracy": {"cifar10": 0.237, "imagenet": 0.295},
}
_PER_IMAGE = ("adv_rate", "adv_in", "adv_out", "emp_rate", "emp_in", "emp_out")


# ----------------------------------------------------------------------------- config checks


def _settings(config) -> list[tuple[str, object]]:
    """``[(name, row config)]`` of ``config.settings``, every field checked before any work."""
    settings = list(config.get("settings") or ())
    if not settings:
        raise ValueError("settings: expected at least one purifier setting, e.g. "
                         "({'name': 'ddpm_t0.1', 'purifier': {'t_star': 0.1}},)")
    names = []
    for i, s in enumerate(settings):
        if not hasattr(s, "items"):
            raise ValueError(f"settings[{i}]: expected a dict {{'name': ..., 'purifier': "
                             f"{{<field>: value}}}}, got {s!r}")
        other = [k for k in s if k not in ("name", "purifier")]
        if other:
            raise ValueError(f"settings[{i}]: a setting may only change purifier fields "
                             f"(the attack and protocol are shared), got {other}")
        names.append(str(s.get("name", f"setting{i}")))
    if len(set(names)) != len(names):
        raise ValueError(f"settings: names must be unique, got {names}")
    if "classifier" in names:
        raise ValueError("settings: the name 'classifier' is reserved (Fig. 3c rows)")
    if config.eval.randomness != "fixed":
        raise ValueError(f"eval.randomness: the compression study needs 'fixed' (one purifier "
                         f"key per image), got {config.eval.randomness!r}")
    if int(config.attack.eot_samples) != 1:
        raise ValueError(f"attack.eot_samples: expected 1 with fixed randomness (every sample "
                         f"would be the same), got {config.attack.eot_samples}")
    if config.attack.name == "none":
        raise ValueError("attack.name: the compression study needs an attack, got 'none'")
    _common.make_attack(config.attack)
    s = config.study
    _common.check_positive(s.num, "study.num")
    rates = [float(r) for r in s.classifier_rates]
    if any(not r > 0 for r in rates):
        raise ValueError(f"study.classifier_rates: expected positive rates, got {rates}")
    if not 0.0 < float(s.level) < 1.0:
        raise ValueError(f"study.level: expected a confidence level in (0, 1), got {s.level}")
    out = []
    for name, setting in zip(names, settings, strict=True):
        rc = _common.row_config(config, setting)
        if not rc.purifier.enabled:
            raise ValueError(f"settings {name}: every setting needs the purifier enabled")
        if rc.purifier.gradient != "exact":
            raise ValueError(f"settings {name}: purifier.gradient must be 'exact', got "
                             f"{rc.purifier.gradient!r}")
        out.append((name, rc))
    return out


# ----------------------------------------------------------------------------- per setting


def _rates_chunk(purifier, classifier, ball: dict, batch, keys) -> dict:
    """``run_chunks``' function: per-image rates and predictions under the fixed keys."""
    from jaxrob.analysis import compression_rate_empirical

    flat = lambda d: jnp.sqrt(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1))
    x, x_adv, idx = batch["x"], batch["x_adv"], batch["index"]
    fixed = tags.fold(keys, tags.FIXED)  # = jaxrob.evaluation.fixed_purifier_keys(key, idx)
    fx, fa = purifier(x, fixed), purifier(x_adv, fixed)
    adv_in, adv_out = flat(x_adv - x), flat(fa - fx)
    adv_rate = jnp.where(adv_in > 0, adv_out / jnp.where(adv_in > 0, adv_in, 1.0), jnp.nan)

    def empirical(xi, ki, ii):
        # f with example i's fixed key; compression_rate_empirical folds the index into the
        # ball key, so the ball samples do not depend on batching either
        f = lambda z: purifier(z, ki)
        r = compression_rate_empirical(f, xi[None], jr.key(ball["seed"]), eps=ball["eps"],
                                       num=ball["num"], norm=ball["norm"], indices=ii[None])
        return r.rate[0], r.input_norm[0], r.output_norm[0]

    emp_rate, emp_in, emp_out = jax.vmap(empirical)(x, fixed, idx)
    return {"adv_rate": adv_rate, "adv_in": adv_in, "adv_out": adv_out,
            "emp_rate": emp_rate, "emp_in": emp_in, "emp_out": emp_out,
            "pred_fx": jnp.argmax(classifier(fx), -1),
            "pred_fadv": jnp.argmax(classifier(fa), -1)}


def _rates_done(name: str, start: int, stop: int, out: dict) -> None:
    logging.info("%s: compression rates of [%d, %d) done", name, start, stop)


def _fingerprint(rc, extra: dict) -> dict:
    return {"purifier": _common.to_plain(rc.purifier), "attack": _common.to_plain(rc.attack),
            "seed": int(rc.seed), "data": _common.to_plain(rc.data),
            "ddpm": _common.to_plain(rc.ddpm), "classifier": _common.to_plain(rc.classifier),
            **extra}


def _x_adv(rc, name, wd, models, test, mesh, per_row) -> tuple[np.ndarray, str, float | None]:
    """Adversarial images of a setting: from run_row's record, or recomputed (resumable)."""
    from jaxrob.evaluation import ChunkStore, evaluate_robustness
    from jaxrob.purify import DefendedModel

    x_adv = per_row.get("x_adv")
    if x_adv is not None and x_adv.shape == test.images.shape:
        return np.asarray(x_adv, np.float32), "run_row", None
    ddpm, classifier = models
    purifier = _common.make_purifier(rc.purifier, ddpm)
    store = ChunkStore(wd / "x_adv", fingerprint=_fingerprint(rc, {"what": "x_adv"}))
    # the same attack function, run key, randomness mode and chunking as run_row
    res = evaluate_robustness(
        DefendedModel(classifier, purifier), _common.make_attack(rc.attack), test.images,
        test.labels, test.indices, key=jr.key(int(rc.seed)), protocols=("one_shot",),
        randomness="fixed", batch_size=int(rc.eval.batch_size), store=store, mesh=mesh,
        keep_x_adv=True, log=lambda line: logging.info("%s x_adv: %s", name, line))
    per = res["per_example"]
    agree = float(np.mean(per["pred_adv"][:, 0] == per_row["pred_adv"][:, 0]))
    if agree < 1.0:
        logging.warning("%s: the recomputed attack's predictions agree with run_row's on "
                        "%.1f%% of the images only", name, 100 * agree)
    if per["x_adv"].shape != test.images.shape:
        raise RuntimeError(f"{store.directory}: the stored adversarial images do not cover the "
                           f"{len(test)} images")
    return np.asarray(per["x_adv"], np.float32), "recomputed", agree


def _finite(v) -> float | None:
    """``v`` as a float, None when undefined (NaN / inf): results.json stays valid JSON."""
    return float(v) if v is not None and np.isfinite(v) else None


def _stats(a: np.ndarray) -> dict:
    """Mean, std, median and 95% interval of the mean of the finite entries (None: undefined;
    the adversarial rate is undefined where the attack kept the clean image)."""
    a = np.asarray(a, np.float64)
    ok = a[np.isfinite(a)]
    m = float(ok.mean()) if ok.size else None
    sem = float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else None
    return {"mean": m, "std": float(ok.std()) if ok.size else None,
            "median": float(np.median(ok)) if ok.size else None, "sem": sem,
            "ci95": None if sem is None else [m - 1.96 * sem, m + 1.96 * sem],
            "num": int(ok.size), "num_undefined": int(a.size - ok.size)}


def _mean_rate(row, which: str) -> float:
    m = row["compression"][which]["mean"]
    return math.nan if m is None else m


def _setting(rc, name, wd, models, test, mesh) -> tuple[dict, dict]:
    """Robust accuracy (run_row) and per-image compression rates of one setting."""
    from jaxrob.evaluation import ChunkStore, run_chunks

    timer = _common.Timer()
    entry = _robust_eval.run_row(rc, name, wd, models, test, mesh)
    with np.load(wd / "per_example.npz") as z:
        per_row = {k: z[k] for k in z.files}
    x_adv, source, agree = _x_adv(rc, name, wd, models, test, mesh, per_row)

    ddpm, classifier = models
    purifier = _common.make_purifier(rc.purifier, ddpm)
    s, a = rc.study, rc.attack
    store = ChunkStore(wd / "compression", fingerprint=_fingerprint(
        rc, {"what": "compression", "num": int(s.num), "ball_seed": int(s.ball_seed),
             "x_adv": source}))
    bs = _common.check_batch_size(rc.eval.batch_size, mesh, "eval.batch_size")
    t0 = _common.Timer()
    ball = {"seed": int(s.ball_seed), "eps": float(a.eps), "norm": a.norm, "num": int(s.num)}
    comp = run_chunks(
        _rates_chunk, {"x": np.asarray(test.images, np.float32), "x_adv": x_adv,
                       "index": np.asarray(test.indices)},
        key=jr.key(int(rc.seed)), args=(purifier, classifier, ball), batch_size=bs,
        store=store, mesh=mesh, desc=f"compression {name}",
        log=functools.partial(_rates_done, name)).records
    label = per_row["label"]
    robust = (per_row["pred_adv"][:, 0] == label).astype(np.float32)
    clean = (per_row["pred_clean"][:, 0] == label).astype(np.float32)
    nfe = dict(entry["nfe"])
    nfe["compression_per_image"] = (2 + int(s.num) + 1) * nfe["per_purification"]
    pur = entry["purifier"]
    res = {
        "name": name, "sampler": pur["sampler"], "t_star": pur["t_star"],
        "num_steps": pur["steps"],
        "clean": entry["clean"]["one_shot"], "robust": entry["adv"]["one_shot"],
        # robust accuracy among the images the defended model classifies correctly: separates
        # the loss of robustness from the loss of clean accuracy at large t*
        "robust_given_clean": _finite(robust[clean == 1].mean()) if clean.any() else None,
        "compression": {
            "adversarial": _stats(comp["adv_rate"]),
            "empirical": _stats(comp["emp_rate"]),
            "adversarial_by_outcome": {"robust": _stats(comp["adv_rate"][robust == 1]),
                                       "broken": _stats(comp["adv_rate"][robust == 0])},
            "mean_adv_l2": float(np.mean(comp["adv_in"])),
            "mean_ball_l2": float(np.mean(comp["emp_in"])),
        },
        "x_adv_source": source, "recompute_agreement": agree,
        # f(x) with our key must classify like run_row's fixed-key scoring
        "key_check": {"clean": float(np.mean(comp["pred_fx"] == per_row["pred_clean"][:, 0])),
                      "adv": float(np.mean(comp["pred_fadv"] == per_row["pred_adv"][:, 0]))},
        "purifier": pur, "nfe": nfe, "mean_linf": entry["mean_linf"],
        "mean_l2": entry["mean_l2"], "compression_wall_s_this_run": t0(),
        "wall_s": timer(),
    }
    per = {"robust": robust, "clean": clean, **{k: comp[k] for k in _PER_IMAGE}}
    return res, per


# ----------------------------------------------------------------------------- fits


def _intercept(fit, level: float) -> dict:
    """The fitted curve at rate 0 with a delta-method interval (t quantile of the fit)."""
    from scipy import stats

    p = fit.as_dict()
    b, t = fit.asymptotes
    k, x0 = p["k"], p["x0"]
    sig = 0.5 * (1.0 + math.tanh(0.5 * (-k * x0)))
    ds = sig * (1.0 - sig)
    g_kx0 = [(t - b) * ds * (-x0), -(t - b) * ds * k]
    grad = np.array(([1.0 - sig, sig] if len(fit.names) == 4 else []) + g_kx0)
    value = b + (t - b) * sig
    se = float(math.sqrt(max(grad @ fit.cov @ grad, 0.0)))
    q = float(stats.t.ppf(0.5 + level / 2.0, max(fit.dof, 1)))
    return {"value": value, "stderr": se, "ci": [value - q * se, value + q * se]}


def _fit(x, y, *, names, samplers, clean_acc, level, kind, n_images) -> dict:
    """One sigmoid fit of robust accuracy ``y`` vs mean compression rate ``x`` (JSON-able)."""
    from jaxrob.analysis import fit_sigmoid

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    need = 2 if kind == "anchored" else 4
    if x.size <= need or not np.all(np.isfinite(x)):
        return {"skipped": f"needs more than {need} settings with a finite mean rate, "
                           f"got {int(np.isfinite(x).sum())} of {x.size}"}
    kw = {}
    if kind == "weighted":
        # binomial variance of each robust accuracy, (k + 1) / (n + 2) so that 0 and 1 keep
        # a positive variance; absolute weights: the covariance is (J^T W J)^-1
        p = (y * n_images + 1.0) / (n_images + 2.0)
        kw = {"weights": n_images / (p * (1.0 - p)), "absolute_weights": True}
    elif kind == "anchored":
        kw = {"asymptotes": (0.0, clean_acc)}
    try:
        fit = fit_sigmoid(x, y, level=level, **kw)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as err:
        return {"failed": str(err)}
    pred = fit.predict(x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else None
    resid = y - pred
    icpt = _intercept(fit, level)
    out = {
        "model": kind, "names": list(fit.names), "params": fit.as_dict(),
        "stderr": dict(zip(fit.names, map(float, fit.stderr), strict=True)),
        "ci": {nm: [float(lo), float(hi)] for nm, (lo, hi) in zip(fit.names, fit.ci,
                                                                   strict=True)},
        "level": level, "asymptotes": list(fit.asymptotes), "rss": fit.rss, "dof": fit.dof,
        "converged": fit.converged, "r2": r2,
        # a 4-parameter fit can run off to a step function with asymptotes far outside [0, 1]
        "asymptotes_in_range": bool(all(-0.1 <= v <= 1.1 for v in fit.asymptotes)),
        "residuals": dict(zip(names, map(float, resid), strict=True)),
        "mean_residual_by_sampler": {sp: float(np.mean(resid[np.asarray(samplers) == sp]))
                                     for sp in sorted(set(samplers))},
        "y_intercept": {**icpt, "clean_accuracy_mean": clean_acc,
                        "clean_within_ci": bool(icpt["ci"][0] <= clean_acc <= icpt["ci"][1])},
    }
    if kind == "weighted":
        out["reduced_chi2"] = fit.rss / fit.dof
    return out


def _fits(rows, level, n_images) -> dict:
    """The fits of robust accuracy against both mean rates; the "clean accuracy" of the
    y-intercept comparison and of the anchored fit is the settings' mean purified clean
    accuracy (at rate 0 every input purifies to its anchor f(x))."""
    names = [r["name"] for r in rows]
    samplers = [r["sampler"] for r in rows]
    y = [r["robust"]["accuracy"] for r in rows]
    clean_acc = float(np.mean([r["clean"]["accuracy"] for r in rows]))
    out = {}
    for which in ("adversarial", "empirical"):
        x = [_mean_rate(r, which) for r in rows]
        out[which] = {kind: _fit(x, y, names=names, samplers=samplers, clean_acc=clean_acc,
                                 level=level, kind=kind, n_images=n_images)
                      for kind in ("free", "weighted", "anchored")}
    return out


# ----------------------------------------------------------------------------- Fig. 3c


def _classifier_curve(config, workdir, models, test, mesh, rates) -> dict:
    """Robust accuracy of the undefended classifier under the attack at ``eps * rate``."""
    eps = float(config.attack.eps)
    out = {"rates": [0.0], "accuracy": [], "ci95": [], "eps": [0.0], "per_example": {}}
    first = None
    for r in rates:
        rc = _common.row_config(config, {"purifier": {"enabled": False},
                                         "attack": {"eps": eps * r}})
        name = f"classifier_r{r:g}"
        entry = _robust_eval.run_row(rc, name, workdir / "classifier" / name, models, test,
                                     mesh)
        if first is None:  # rate 0: no attack, the clean accuracy
            first = entry["clean"]["one_shot"]
            out["accuracy"].append(first["accuracy"])
            out["ci95"].append(first["ci95"])
        adv = entry["adv"]["one_shot"]
        out["rates"].append(float(r))
        out["eps"].append(eps * r)
        out["accuracy"].append(adv["accuracy"])
        out["ci95"].append(adv["ci95"])
        with np.load(workdir / "classifier" / name / "per_example.npz") as z:
            out["per_example"][name] = (z["pred_adv"][:, 0] == z["label"]).astype(np.float32)
    out["clean"] = first
    return out


def _compare_curve(rows, curve) -> dict:
    """Each setting's robust accuracy minus the classifier's at ``eps * its mean rate``."""
    r, acc = np.asarray(curve["rates"]), np.asarray(curve["accuracy"])
    diffs = {}
    for row in rows:
        m = _mean_rate(row, "adversarial")
        if not np.isfinite(m) or m > r[-1]:
            diffs[row["name"]] = None  # outside the measured grid: no extrapolation
            continue
        diffs[row["name"]] = row["robust"]["accuracy"] - float(np.interp(m, r, acc))
    vals = [abs(v) for v in diffs.values() if v is not None]
    return {"difference": diffs,
            "mean_abs_difference": float(np.mean(vals)) if vals else None}


# ----------------------------------------------------------------------------- plot


def _plot(path, rows, fits, curve, attack_desc, base_clean=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = sorted({r["sampler"] for r in rows})
    colour = {s: f"C{i}" for i, s in enumerate(samplers)}
    clean = np.mean([r["clean"]["accuracy"] for r in rows])
    panels = [("adversarial", "adversarial compression rate\n||f(x_adv)-f(x)|| / ||x_adv-x||"),
              ("empirical", "empirical compression rate (random ball)")]
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(15 if curve else 10, 4.5))
    for ax, (which, xlabel) in zip(axes, panels, strict=False):
        xs = [_mean_rate(r, which) for r in rows]
        for r, xv in zip(rows, xs, strict=True):
            acc, (lo, hi) = r["robust"]["accuracy"], r["robust"]["ci95"]
            sem = r["compression"][which]["sem"]
            ax.errorbar(xv, acc, yerr=[[acc - lo], [hi - acc]],
                        xerr=None if sem is None else 1.96 * sem, fmt="o",
                        color=colour[r["sampler"]], capsize=2)
            ax.annotate(f"{r['t_star']:g}", (xv, acc), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        finite = [v for v in xs if np.isfinite(v)]
        hi_x = 1.15 * max(finite) if finite else 1.0
        grid = np.linspace(0.0, hi_x, 200)
        for kind, style in (("free", "-"), ("anchored", ":")):
            f = fits[which][kind]
            if "params" in f:
                b, t = f["asymptotes"]
                k, x0 = f["params"]["k"], f["params"]["x0"]
                yv = b + (t - b) * 0.5 * (1.0 + np.tanh(0.5 * k * (grid - x0)))
                ax.plot(grid, yv, "k" + style, lw=1,
                        label=f"sigmoid ({kind}), R$^2$={f['r2']:.2f}")
        cl = [r["clean"]["accuracy"] for r in rows]
        ax.errorbar([0.0], [clean], yerr=[[clean - min(cl)], [max(cl) - clean]], fmt="k*",
                    ms=10, capsize=3, label="clean accuracy, purified (mean, range)")
        if base_clean is not None:
            ax.plot([0.0], [base_clean], "kx", ms=8, label="clean accuracy, classifier alone")
        for s in samplers:
            ax.plot([], [], "o", color=colour[s], label=s)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robust accuracy (fixed randomness)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=-0.04)
        ax.legend(fontsize=6, framealpha=0.5, loc="best")
    if curve:
        ax = axes[2]
        lo = [c[0] for c in curve["ci95"]]
        hi = [c[1] for c in curve["ci95"]]
        ax.fill_between(curve["rates"], lo, hi, color="grey", alpha=0.3)
        ax.plot(curve["rates"], curve["accuracy"], "k-", label="classifier alone, eps x rate")
        for r in rows:
            ax.plot(_mean_rate(r, "adversarial"), r["robust"]["accuracy"], "o",
                    color=colour[r["sampler"]])
        for s in samplers:
            ax.plot([], [], "o", color=colour[s], label=f"purified ({s})")
        ax.set_xlabel("compression rate (classifier: attack radius / eps)")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.set_title("Fig. 3c", fontsize=9)
    axes[0].set_title(f"Fig. 3b: {attack_desc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- run


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    timer = _common.Timer()
    settings = _settings(config)  # every setting checked before any work
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.write_json(workdir / "config.json", config)
    mesh = _common.get_mesh(config.mesh)
    _common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    # the reverse-mode twins (same parameters): fast input gradients for the attacks
    fast = bool(config.fast_vjp)
    ddpm, ddpm_info = _common.load_ddpm(config.ddpm, tuple(test.image_shape), fast_vjp=fast)
    for _, rc in settings:  # the real schedule: t_star / steps errors before the first row
        _common.make_purifier(rc.purifier, ddpm)
    classifier, clf_info = _common.load_classifier(config.classifier, config.data,
                                                   fast_vjp=fast)
    models = (ddpm, classifier)

    rows, per = [], {"index": np.asarray(test.indices), "label": np.asarray(test.labels)}
    for name, rc in settings:
        logging.info("setting %s: %s", name, _common.to_plain(rc.purifier))
        res, arrays = _setting(rc, name, workdir / name, models, test, mesh)
        rows.append(res)
        per.update({f"{name}__{k}": v for k, v in arrays.items()})
        c = res["compression"]
        logging.info("setting %s: robust %.3f clean %.3f, adversarial rate %.3f, empirical "
                     "rate %.3f", name, res["robust"]["accuracy"], res["clean"]["accuracy"],
                     c["adversarial"]["mean"], c["empirical"]["mean"])
    s = config.study
    level = float(s.level)
    fits = _fits(rows, level, len(test))
    curve, comparison = None, None
    if tuple(s.classifier_rates):
        curve = _classifier_curve(config, workdir, models, test, mesh,
                                  [float(r) for r in s.classifier_rates])
        per.update({f"{k}__robust": v for k, v in curve.pop("per_example").items()})
        comparison = _compare_curve(rows, curve)
    a = config.attack
    attack_desc = (f"{a.name} {a.norm} eps={float(a.eps):g} x{int(a.num_steps)}, "
                   f"{len(test)} images")
    _common.save_npz(workdir / "per_example.npz", **per)
    _plot(workdir / "compression_fit.png", rows, fits, curve, attack_desc,
          base_clean=curve["clean"]["accuracy"] if curve else None)
    free = fits["adversarial"]["free"]
    rates = np.array([_mean_rate(r, "adversarial") for r in rows])
    ours = {
        "sigmoid_r2_adversarial": free.get("r2"),
        "sigmoid_r2_empirical": fits["empirical"]["free"].get("r2"),
        "y_intercept": free.get("y_intercept"),
        "rate_range": [_finite(np.nanmin(rates)), _finite(np.nanmax(rates))],
        "robust_accuracy_range": [min(r["robust"]["accuracy"] for r in rows),
                                  max(r["robust"]["accuracy"] for r in rows)],
        "classifier_curve_mean_abs_difference": (comparison or {}).get("mean_abs_difference"),
    }
    results = {"settings": rows, "fits": fits, "classifier_curve": curve,
               "classifier_curve_comparison": comparison, "claims": ours, "paper": PAPER,
               "attack": _common.to_plain(config.attack), "study": _common.to_plain(s),
               "ddpm": ddpm_info, "classifier": clf_info, "num_images": len(test),
               "fast_vjp": fast, "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("fit (adversarial rate, 4-parameter): %s, R^2 %s; intercept %s",
                 free.get("params"), free.get("r2"), free.get("y_intercept"))
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
