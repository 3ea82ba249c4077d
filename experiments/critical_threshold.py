"""Critical threshold along adversarial directions and fuzzy robustness (Yuezhang & Wei).

    python experiments/critical_threshold.py --config configs/mnist_threshold.py \\
        --workdir runs/mnist_threshold

Per image ``x`` (label ``y``):

* directions: the adversarial one, ``u = (x_adv - x) / ||x_adv - x||_2`` with ``x_adv`` from
  ``config.attack`` on the purified classifier (stochastic randomness: fresh purifier noise at
  every EoT sample, exact gradients unless the purifier says otherwise), and
  ``study.random_directions`` Gaussian directions normalised to unit L2 norm (the control);
* step lengths ``s`` on ``linspace(0, study.max_step, study.num_points)``; the point
  ``clip(x + s u, 0, 1)`` is classified after purification under ``study.num_keys``
  independent purifier keys per point (the stochastic curve: ``num_keys`` binomial trials per
  step length) and under the image's ``study.fixed_keys`` fixed keys (one deterministic
  purifier each, the same key at every step length: its flips as a function of ``s``);
* a flip is ``prediction != y`` (``study.flip_reference = "label"``) or ``prediction !=`` the
  majority purified prediction of the clean image (``"clean"``);
* the psychometric function (a binomial logistic fit, :func:`jaxrob.analysis.
  psychometric_threshold`) of each stochastic curve: threshold ``x0`` (flip probability 1/2)
  and slope ``k`` per L2 unit of [0, 1] pixels; fixed-key curves are checked for being steps
  (number of crossings, where the second crossing is);
* fuzzy robustness: the attack-success probability of ``x_adv``, ``p_i`` = fraction of
  ``study.fuzzy_keys`` purifier keys under which it is misclassified, and its cumulative curve
  (CFR, :func:`jaxrob.analysis.fuzzy_robustness`); the same along the adversarial direction at
  every step length (from the stochastic curve).

The stochastic curve is the average over keys of fixed-key step functions, so its slope
measures how much the key moves the step, not how sharp one step is.

Randomness of example ``i``, ``k_i = fold_in(key(seed), index_i)``, with the tags of
``jaxrob._keys``: attack ``fold_in(k_i, ATTACK)``; fixed key ``f = 0`` is
``fold_in(k_i, FIXED)`` (``jaxrob.evaluation.fixed_purifier_keys``: the very purifier that
robust_eval's and jacobian_spectrum's fixed randomness use for the image), further fixed keys
``fold_in(fold_in(k_i, FIXED_EXTRA), f)``; curve keys ``fold_in(fold_in(fold_in(fold_in(k_i,
CURVE), d), j), n)`` (direction ``d``, step index ``j``, trial ``n``); fuzzy keys
``fold_in(fold_in(k_i, ADV), m)`` (robust_eval's keys scoring the adversarial input); random
direction ``r``: ``normal(fold_in(fold_in(k_i, STUDY), r))``. Records made before these tags
(fixed keys under tag 2, fuzzy keys under 4, curves under 3, directions under 5) differ from
today's for that reason; the chunks' fingerprint holds the key layout, so they are not resumed.
Nothing depends on the batch size or device count: ``jaxrob.evaluation.run_chunks`` stores
chunks of ``study.batch_size`` images as they finish (``chunks/``) and a rerun skips them.

Writes ``results.json`` (summary, the paper's numbers, manifest; ``compute_wall_s`` sums the
chunks' time over restarts, ``wall_s`` is this invocation's), ``per_example.npz``,
``threshold.png`` and ``fuzzy.png``.

References:
  Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839
  (critical threshold, psychometric slope 5.91 +- 1.07 in the rebuttal); ICLR 2025 submission
  "How and How Well Do Diffusion Models Improve Adversarial Robustness?" (OpenReview
  EVK0sQHVCd; fuzzy adversarial robustness, the CFR curve).
"""

from __future__ import annotations

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
from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_threshold.py")
FLIP_REFERENCES = ("label", "clean")
# The draws of example i (tags of jaxrob._keys folded into k_i); in results.json and the
# chunks' fingerprint, so records made with the earlier tags are not resumed into these.
_KEYS = {"image": "k_i = fold_in(key(seed), index_i)",
         "attack": f"fold_in(k_i, {tags.ATTACK}) (ATTACK)",
         "fixed": f"f = 0: fold_in(k_i, {tags.FIXED}) (FIXED: robust_eval's fixed randomness); "
                  f"f > 0: fold_in(fold_in(k_i, {tags.FIXED_EXTRA}), f) (FIXED_EXTRA)",
         "curve": f"fold_in(fold_in(fold_in(fold_in(k_i, {tags.CURVE}), d), j), n) (CURVE)",
         "fuzzy": f"fold_in(fold_in(k_i, {tags.ADV}), m) (ADV)",
         "direction": f"normal(fold_in(fold_in(k_i, {tags.STUDY}), r)) (STUDY)"}
# Yuezhang & Wei (arXiv 2505.22839, rebuttal; ANCHORS.md section 4): CIFAR-10 (d = 3072),
# WRN-28-10, DDPM t* = 0.1 in 100 steps; slope per L2 unit of [0, 1] pixels.
PAPER = {"slope": {"mean": 5.91, "std": 1.07},
         "second_crossings_beyond_l2": 5.0,
         "setting": "CIFAR-10 WRN-28-10, DDPM t*=0.1 (100+100 steps); 100 random 2-D slices x "
                    "1000 points per image; class flips step-like, second crossings only "
                    "beyond l2 ~ 5"}


# ----------------------------------------------------------------------------- config checks


def _int(value, what, minimum):
    if isinstance(value, bool) or value is None or int(value) != value or value < minimum:
        raise ValueError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_study(study) -> dict:
    """The validated ``config.study`` as plain keyword values (ValueError on nonsense)."""
    s = {"random_directions": _int(study.random_directions, "study.random_directions", 0),
         "num_points": _int(study.num_points, "study.num_points", 3),
         "num_keys": _int(study.num_keys, "study.num_keys", 1),
         "fixed_keys": _int(study.fixed_keys, "study.fixed_keys", 1),
         "fuzzy_keys": _int(study.fuzzy_keys, "study.fuzzy_keys", 1),
         "batch_size": _int(study.batch_size, "study.batch_size", 1)}
    max_step = study.max_step
    if isinstance(max_step, bool) or not (isinstance(max_step, int | float)
                                          and math.isfinite(max_step) and max_step > 0):
        raise ValueError(f"study.max_step: expected a positive L2 step length, got {max_step!r}")
    s["max_step"] = float(max_step)
    if study.flip_reference not in FLIP_REFERENCES:
        raise ValueError(f"study.flip_reference: expected one of {list(FLIP_REFERENCES)}, got "
                         f"{study.flip_reference!r}")
    s["flip_reference"] = study.flip_reference
    chunk = study.get("step_chunk")
    s["step_chunk"] = None if chunk is None else _int(chunk, "study.step_chunk", 1)
    s["clip"] = bool(study.clip)
    level = float(study.level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"study.level: expected a confidence level in (0, 1), got {level}")
    s["level"] = level
    return s


# ----------------------------------------------------------------------------- device part

# What the device part depends on (the rest of the study only changes the host analysis).
_DEVICE_FIELDS = ("random_directions", "num_points", "num_keys", "fixed_keys", "fuzzy_keys",
                  "max_step", "clip", "step_chunk")


def _fold(key, *data):
    for d in data:
        key = jr.fold_in(key, d)
    return key


def _grid(s: dict):
    return jnp.linspace(0.0, s["max_step"], s["num_points"], dtype=jnp.float32)


def _fixed_keys(k, num: int):
    """The image's ``num`` fixed purifier keys: first robust_eval's (FIXED), then FIXED_EXTRA's."""
    extra = jax.vmap(lambda f: _fold(k, tags.FIXED_EXTRA, f))(jnp.arange(1, num))
    return jnp.concatenate([jr.fold_in(k, tags.FIXED)[None], extra])


def _image(defended, attack, s: dict, x, y, k) -> dict:
    """Everything of one image (vmapped over the chunk's images)."""
    classify = lambda xs, keys: jnp.argmax(defended(xs, keys), -1).astype(jnp.int8)
    model = lambda xx, key: defended(xx, key[None])
    x_adv = attack(model, x[None], y[None], jr.fold_in(k, tags.ATTACK)).x_adv[0]
    delta = x_adv - x
    adv_l2 = jnp.sqrt(jnp.sum(delta * delta))
    u_adv = delta / jnp.maximum(adv_l2, 1e-12)
    gauss = jax.vmap(lambda r: jr.normal(_fold(k, tags.STUDY, r), x.shape, x.dtype))(
        jnp.arange(s["random_directions"]))
    norms = jnp.sqrt(jnp.sum(gauss * gauss, axis=tuple(range(1, gauss.ndim))))
    u_rand = gauss / norms.reshape(-1, *([1] * x.ndim))
    dirs = jnp.concatenate([u_adv[None], u_rand])  # (D, H, W, C)
    num_dirs, num_keys, fixed_keys = dirs.shape[0], s["num_keys"], s["fixed_keys"]
    fixed = _fixed_keys(k, fixed_keys)  # (F,)
    trials = num_keys + fixed_keys
    grid = _grid(s)

    def at_step(args):
        j, step = args
        pts = x[None] + step * dirs
        pts = jnp.clip(pts, 0.0, 1.0) if s["clip"] else pts
        d = (pts - x[None]).reshape(num_dirs, -1)
        curve = jax.vmap(lambda dd: jax.vmap(lambda n: _fold(k, tags.CURVE, dd, j, n))(
            jnp.arange(num_keys)))(jnp.arange(num_dirs))  # (D, N)
        keys = jnp.concatenate([curve, jnp.broadcast_to(fixed, (num_dirs, fixed_keys))], 1)
        xs = jnp.broadcast_to(pts[:, None], (num_dirs, trials, *x.shape))
        pred = classify(xs.reshape(-1, *x.shape), keys.reshape(-1)).reshape(num_dirs, trials)
        return pred[:, :num_keys], pred[:, num_keys:], jnp.sqrt(jnp.sum(d * d, -1))

    steps = jnp.arange(grid.shape[0])
    pred, pred_fixed, dist = jax.lax.map(at_step, (steps, grid),
                                         batch_size=s["step_chunk"] or grid.shape[0])
    # fuzzy robustness: x_adv scored under independent keys, as robust_eval scores it (ADV)
    fuzzy = jax.vmap(lambda m: _fold(k, tags.ADV, m))(jnp.arange(s["fuzzy_keys"]))
    pred_fuzzy = classify(jnp.broadcast_to(x_adv, (s["fuzzy_keys"], *x.shape)), fuzzy)
    return {"pred": jnp.moveaxis(pred, 0, 1), "pred_fixed": jnp.moveaxis(pred_fixed, 0, 1),
            "dist": jnp.moveaxis(dist, 0, 1), "pred_fuzzy": pred_fuzzy, "adv_l2": adv_l2,
            "adv_linf": jnp.max(jnp.abs(delta))}


def _chunk(defended, attack, s: dict, batch, keys) -> dict:
    """``run_chunks``' function: the images of a chunk side by side (vmap)."""
    one = lambda x, y, k: _image(defended, attack, s, x, y, k)
    return jax.vmap(one)(batch["x"], batch["y"], keys)


def _chunk_done(start: int, stop: int, out: dict) -> None:
    logging.info("chunk [%d, %d): mean adversarial L2 %.3f", start, stop,
                 float(np.mean(out["adv_l2"])))


def _compute(defended, attack, test, s, key, mesh, store):
    """Run (or resume) every chunk; returns the per-example record, the grid and the
    :class:`jaxrob.evaluation.ChunkRun`."""
    from jaxrob.evaluation import run_chunks

    data = {"x": np.asarray(test.images, np.float32),
            "y": np.asarray(test.labels).astype(np.int32), "index": np.asarray(test.indices)}
    run = run_chunks(_chunk, data, key=key,
                     args=(defended, attack, {f: s[f] for f in _DEVICE_FIELDS}),
                     batch_size=s["batch_size"], store=store, mesh=mesh,
                     desc="critical threshold", log=_chunk_done)
    per = {**run.records, "label": np.asarray(test.labels)}
    return per, np.asarray(_grid(s), np.float64), run


# ----------------------------------------------------------------------------- host analysis


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": None, "std": None, "median": None, "count": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "count": int(a.size)}


def fit_curves(flips, trials, grid, dist, level) -> dict:
    """Psychometric fits of every (image, direction) curve.

    Args:
      flips: (B, D, S) flip counts; trials: trials per point; grid: (S,) step lengths;
      dist: (B, D, S) actual L2 distances of the (clipped) points; level: CI level.

    Returns:
      (B, D) arrays ``threshold``, ``slope``, ``threshold_lo/hi``, ``slope_lo/hi``,
      ``separated``, ``censored`` (the flip fraction never reaches 1/2 on the grid) and
      ``threshold_l2`` (the threshold as the actual L2 distance of the clipped point).
    """
    from jaxrob.analysis import psychometric_threshold

    b, d, _ = flips.shape
    out = {k: np.full((b, d), np.nan) for k in
           ("threshold", "slope", "threshold_lo", "threshold_hi", "slope_lo", "slope_hi",
            "threshold_l2")}
    out["separated"] = np.zeros((b, d), bool)
    out["censored"] = flips.max(axis=-1) * 2 < trials
    n = np.full(grid.shape, float(trials))
    for i in range(b):
        for j in range(d):
            fit = psychometric_threshold(grid, flips[i, j], trials=n, level=level)
            out["threshold"][i, j], out["slope"][i, j] = fit.threshold, fit.slope
            (out["threshold_lo"][i, j], out["threshold_hi"][i, j]) = fit.threshold_ci
            (out["slope_lo"][i, j], out["slope_hi"][i, j]) = fit.slope_ci
            out["separated"][i, j] = fit.separated
            if np.isfinite(fit.threshold):
                out["threshold_l2"][i, j] = np.interp(fit.threshold, grid, dist[i, j])
    return out


def crossings(flip_seq, grid) -> dict:
    """Step-likeness of deterministic (fixed-key) flip sequences.

    Args:
      flip_seq: (..., S) booleans along the step grid; grid: (S,) step lengths.

    Returns:
      ``count`` (..., ): number of changes along the grid; ``first`` (...,): step length of
      the first flip of a curve that starts unflipped (NaN: never flips, or flipped at 0);
      ``second`` (...,): step length where it first flips back afterwards (NaN: never).
    """
    f = np.asarray(flip_seq, bool)
    count = np.sum(f[..., 1:] != f[..., :-1], axis=-1)
    first = np.full(f.shape[:-1], np.nan)
    second = np.full(f.shape[:-1], np.nan)
    for idx in np.ndindex(f.shape[:-1]):
        row = f[idx]
        if row[0] or not row.any():
            continue
        j = int(np.argmax(row))
        first[idx] = grid[j]
        back = np.flatnonzero(~row[j:])
        if back.size:
            second[idx] = grid[j + back[0]]
    return {"count": count, "first": first, "second": second}


def _direction_summary(fits, valid, cross) -> dict:
    """Aggregate fits and fixed-key steps over the valid curves of one kind of direction."""
    ok = valid & ~fits["censored"]
    finite = ok & ~fits["separated"] & np.isfinite(fits["slope"])
    per_key = np.broadcast_to(valid[..., None], cross["count"].shape)
    cnt = cross["count"][per_key]
    first, second = cross["first"][per_key], cross["second"][per_key]
    n_valid = int(valid.sum())
    # censored curves (flip probability < 1/2 on the whole grid) count as infinitely far;
    # None when that median lies beyond the grid
    everything = np.where(fits["censored"], np.inf, fits["threshold"])[valid]
    median_all = float(np.median(everything)) if n_valid else math.inf
    return {
        "curves": n_valid,
        "censored_fraction": float(fits["censored"][valid].mean()) if n_valid else None,
        "threshold_median_all": median_all if math.isfinite(median_all) else None,
        "separated_fraction": float(fits["separated"][ok].mean()) if ok.any() else None,
        "threshold": _stats(fits["threshold"][ok]),
        "threshold_l2": _stats(fits["threshold_l2"][ok]),
        "slope": _stats(fits["slope"][finite]),
        "slope_ci_halfwidth": _stats(0.5 * (fits["slope_hi"] - fits["slope_lo"])[finite]),
        "fixed_key": {
            "curves": int(cnt.size),
            "crossings_mean": float(cnt.mean()) if cnt.size else None,
            "step_like_fraction": float((cnt <= 1).mean()) if cnt.size else None,
            "constant_fraction": float((cnt == 0).mean()) if cnt.size else None,
            "second_crossing_fraction": float(np.isfinite(second).mean()) if cnt.size else None,
            "second_crossing_step": _stats(second),
            "first_crossing_step": _stats(first),
        },
    }


def analyse(per, grid, s) -> tuple[dict, dict]:
    """Flips, fits, fixed-key steps and fuzzy robustness from the per-example record.

    Returns ``(summary, arrays)``: the JSON summary and per-example arrays for the npz.
    """
    from jaxrob.analysis import fuzzy_robustness

    pred, pred_fixed = per["pred"], per["pred_fixed"]  # (B, D, S, N), (B, D, S, F)
    labels = per["label"].astype(np.int64)
    b = labels.shape[0]
    # the clean image is the s = 0 point of every direction: B x (D N) purifications of x
    clean = pred[:, :, 0, :].reshape(b, -1)
    counts = np.stack([np.bincount(r, minlength=int(max(clean.max(), labels.max())) + 1)
                       for r in clean.astype(np.int64)])
    clean_majority = counts.argmax(-1)
    ref = labels if s["flip_reference"] == "label" else clean_majority
    flips = (pred != ref[:, None, None, None]).sum(-1)  # (B, D, S)
    flips_fixed = pred_fixed != ref[:, None, None, None]  # (B, D, S, F)
    fits = fit_curves(flips, s["num_keys"], grid, per["dist"], s["level"])
    # a curve counts when the clean image is on the reference's side (flip probability < 1/2
    # at s = 0); the adversarial direction also needs a non-zero perturbation
    at_zero = flips[:, :, 0].sum(1) / (flips.shape[1] * s["num_keys"])
    valid = np.repeat((at_zero < 0.5)[:, None], flips.shape[1], axis=1)
    valid[:, 0] &= per["adv_l2"] > 0
    cross = crossings(np.moveaxis(flips_fixed, -1, -2), grid)  # (B, D, F)
    summary = {"adversarial": _direction_summary(
        {k: v[:, :1] for k, v in fits.items()}, valid[:, :1],
        {k: v[:, :1] for k, v in cross.items()})}
    if flips.shape[1] > 1:
        summary["random"] = _direction_summary(
            {k: v[:, 1:] for k, v in fits.items()}, valid[:, 1:],
            {k: v[:, 1:] for k, v in cross.items()})
    adv_mis = per["pred_fuzzy"] != labels[:, None]
    success = adv_mis.mean(-1)
    fz = fuzzy_robustness(success)
    along = []
    for j, step in enumerate(grid):
        q = (pred[:, 0, j, :] != labels[:, None]).mean(-1)
        f = fuzzy_robustness(q, grid=np.array([0.0]))
        along.append({"step": float(step), "never_broken": float(f.curve[0]),
                      "area": float(f.area)})
    summary["fuzzy"] = {
        "success_probability": _stats(success),
        "area": float(fz.area), "never_broken": float(fz.curve[0]),
        "always_broken": float(np.mean(success >= 1.0)),
        "curve": {"p": np.round(np.asarray(fz.p, np.float64), 6).tolist(),
                  "cfr": np.round(np.asarray(fz.curve, np.float64), 6).tolist()},
        "along_adversarial": along,
    }
    summary["clean_accuracy"] = float((clean == labels[:, None]).mean())
    summary["clean_majority_accuracy"] = float((clean_majority == labels).mean())
    summary["attack"] = {"one_shot_success": float(adv_mis[:, 0].mean()),
                         "mean_success_probability": float(success.mean()),
                         "mean_l2": float(per["adv_l2"].mean()),
                         "mean_linf": float(per["adv_linf"].mean())}
    adv = summary["adversarial"]
    rnd = summary.get("random")
    if rnd and adv["threshold"]["median"] is not None and rnd["threshold"]["median"] is not None:
        # over uncensored curves only: a lower bound when many random curves are censored
        summary["threshold_ratio_random_over_adversarial_uncensored"] = (
            rnd["threshold"]["median"] / adv["threshold"]["median"])
    arrays = {"index": per["index"], "label": labels, "flips": flips, "valid": valid,
              "flips_fixed": flips_fixed, "dist": per["dist"], "adv_l2": per["adv_l2"],
              "adv_linf": per["adv_linf"], "success_prob": success,
              "clean_majority": clean_majority, "grid": np.broadcast_to(grid, (b, grid.size)),
              "crossings": cross["count"], "first_crossing": cross["first"],
              "second_crossing": cross["second"], **{f"fit_{k}": v for k, v in fits.items()}}
    return summary, arrays


# ----------------------------------------------------------------------------- plots


def _plot_threshold(path, arrays, grid, num_keys, max_images=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxrob.analysis._fits import _sigmoid

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    valid = arrays["valid"]
    rows = np.flatnonzero(valid[:, 0])[:max_images]
    fine = np.linspace(grid[0], grid[-1], 200)
    for c, i in enumerate(rows):
        for d in range(arrays["flips"].shape[1]):
            if d > 1:  # first random direction only, to keep the plot readable
                break
            style = "-" if d == 0 else "--"
            a1.plot(grid, arrays["flips"][i, d] / num_keys, "o" if d == 0 else "x",
                    color=f"C{c}", ms=3)
            k, x0 = arrays["fit_slope"][i, d], arrays["fit_threshold"][i, d]
            if np.isfinite(x0) and not np.isnan(k):  # separated: the fit is a step
                curve = (_sigmoid(k * (fine - x0)) if np.isfinite(k)
                         else ((fine >= x0) == (k > 0)).astype(float))
                a1.plot(fine, curve, style, color=f"C{c}", lw=1,
                        label=f"#{int(arrays['index'][i])} {'adv' if d == 0 else 'random'}")
    a1.set_xlabel("step length s (L2)")
    a1.set_ylabel("flip probability")
    a1.set_ylim(-0.03, 1.03)
    a1.legend(fontsize=7)
    a1.set_title("adversarial (o, solid) vs random (x, dashed)")
    ok = valid & ~arrays["fit_censored"]
    thr = arrays["fit_threshold"]
    bins = np.linspace(0, grid[-1], 25)
    a2.hist(thr[:, 0][ok[:, 0]], bins=bins, alpha=0.6, label="adversarial")
    if thr.shape[1] > 1:
        a2.hist(thr[:, 1:][ok[:, 1:]], bins=bins, alpha=0.6, label="random")
    a2.set_xlabel("threshold x0 (uncensored curves)")
    a2.legend()
    slope = arrays["fit_slope"]
    fin = ok & np.isfinite(slope)
    a3.hist(slope[:, 0][fin[:, 0]], bins=20, alpha=0.6, label="adversarial")
    if slope.shape[1] > 1 and fin[:, 1:].any():
        a3.hist(slope[:, 1:][fin[:, 1:]], bins=20, alpha=0.6, label="random")
    a3.set_xlabel("psychometric slope k (per L2 unit)")
    a3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_fuzzy(path, summary, arrays, grid, num_keys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxrob.analysis import fuzzy_robustness

    fig, ax = plt.subplots(figsize=(5, 4))
    fz = summary["fuzzy"]
    ax.step(fz["curve"]["p"], fz["curve"]["cfr"], where="post", color="k", lw=2,
            label=f"x_adv (area {fz['area']:.3f})")
    flips = arrays["flips"]
    radius = float(np.mean(arrays["adv_l2"]))  # steps at 0, 1/3, 2/3 and 1 x the attack's
    picks = np.unique([int(np.argmin(np.abs(grid - f * radius))) for f in (0, 1 / 3, 2 / 3, 1)])
    for c, j in enumerate(picks):
        q = flips[:, 0, j] / num_keys
        f = fuzzy_robustness(q)
        ax.step(np.asarray(f.p), np.asarray(f.curve), where="post", color=f"C{c}", lw=1,
                label=f"along u, s={grid[j]:.2f}")
    ax.set_xlabel("attack-success probability p")
    ax.set_ylabel("fraction of images with success prob <= p")
    ax.set_title("cumulative fuzzy robustness")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    from jaxrob.evaluation import ChunkStore
    from jaxrob.purify import DefendedModel

    s = check_study(config.study)
    attack = _common.make_attack(config.attack)
    if attack is None:
        raise ValueError("attack.name: the critical-threshold study needs an attack for the "
                         "adversarial direction, got 'none'")
    mesh = _common.get_mesh(config.mesh)
    _common.check_batch_size(s["batch_size"], mesh, "study.batch_size")
    # reverse-mode twins (same parameters): fast input gradients for the attack
    fast = bool(config.fast_vjp)
    timer, workdir, test, purifier, ddpm_info = _common.start_study(
        config, workdir, "critical-threshold study", fast_vjp=fast)
    classifier, clf_info = _common.load_classifier(config.classifier, config.data,
                                                   fast_vjp=fast)

    stored = {k: v for k, v in s.items() if k not in ("step_chunk", "flip_reference", "level")}
    fingerprint = {"study": stored, "purifier": _common.to_plain(config.purifier),
                   "attack": _common.to_plain(config.attack), "seed": int(config.seed),
                   "data": _common.to_plain(config.data), "ddpm": _common.to_plain(config.ddpm),
                   "classifier": _common.to_plain(config.classifier), "keys": _KEYS}
    store = ChunkStore(workdir / "chunks", fingerprint=fingerprint)
    per, grid, run = _compute(DefendedModel(classifier, purifier), attack, test, s,
                              jr.key(int(config.seed)), mesh, store)
    summary, arrays = analyse(per, grid, s)
    _common.save_npz(workdir / "per_example.npz", **arrays)
    _plot_threshold(workdir / "threshold.png", arrays, grid, s["num_keys"])
    _plot_fuzzy(workdir / "fuzzy.png", summary, arrays, grid, s["num_keys"])
    num_dirs = 1 + s["random_directions"]
    per_image = num_dirs * s["num_points"] * (s["num_keys"] + s["fixed_keys"]) + s["fuzzy_keys"]
    results = {"summary": summary, "paper": PAPER, "grid": grid.tolist(),
               "flip_reference": s["flip_reference"],
               "units": "step lengths and thresholds in L2 of [0, 1] pixels, slope per L2 "
                        f"unit; d = {int(np.prod(test.image_shape))} (the paper's CIFAR-10: "
                        "d = 3072)",
               "purifier": purifier.manifest(), "ddpm": ddpm_info, "classifier": clf_info,
               "attack": _common.to_plain(config.attack), "randomness": "stochastic",
               "purifications_per_image": per_image, "keys": _KEYS, "num_images": len(test),
               "chunks_run": run.chunks_run, "chunks_total": run.chunks_total,
               "compute_wall_s": run.total_s, "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    a, r = summary["adversarial"], summary.get("random", {})
    logging.info("slope adversarial %s, random %s (paper %.2f +- %.2f); threshold median adv "
                 "%s, random %s; fixed-key step-like %s; CFR area %.3f",
                 a["slope"], r.get("slope"), PAPER["slope"]["mean"], PAPER["slope"]["std"],
                 a["threshold"]["median"], (r.get("threshold") or {}).get("median"),
                 a["fixed_key"]["step_like_fraction"], summary["fuzzy"]["area"])
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
