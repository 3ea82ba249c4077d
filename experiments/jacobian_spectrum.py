"""Jacobian spectrum of a purifier with its randomness fixed (Yuezhang & Wei, Fig. 3a).

    python experiments/jacobian_spectrum.py --config configs/mnist_jacobian.py \
        --workdir runs/mnist_jacobian

For every purifier setting of ``config.settings`` (each a dict ``{"name": ..., "dotted.field":
value}`` of overrides of the base config, applied like ``robust_eval``'s ``rows``; study fields
such as ``study.topk`` may be overridden too) and every image ``x_i``, the purifier with one
fixed key is a deterministic map ``f_i(x) = purify(x, k_i)`` of R^D. For it the run computes

* the dense Jacobian ``J = df_i/dx`` at ``x_i`` (``jaxrob.analysis.jacobian``, directions sharded
  over the mesh), all its singular values, the fractions below ``study.low`` / above
  ``study.high`` and the geometric mean (``jaxrob.analysis.spectral_compression``), sigma_max,
  the Frobenius norm and the RMS singular value ``||J||_F / sqrt(D)``. Output pixels that the
  purifier clips to 0 or 1 have zero Jacobian rows: ``frac_clipped`` (of f(x)) and
  ``frac_zero_sv`` (singular values <= 1e-5 sigma_max) record them, ``geometric_mean_nonzero``
  leaves them out, and ``study.unclipped`` differentiates the last reverse state instead;
* the top ``study.topk`` singular values without forming ``J`` (Lanczos or randomized SVD on
  JVP/VJP operators) and, when the dense spectrum is there, their relative error;
* the empirical compression rate in an L2 ball of radius ``study.eps`` (``study.num`` samples)
  with the same fixed key (``jaxrob.analysis.compression_rate_empirical``); for a small ball
  away from the [0, 1] box it approaches the RMS singular value (``rate_over_rms``).

Keys (so a result never depends on chunking, restarts or devices): ``k_i = fold_in(key(seed),
index_i)`` with the image's global index; the purifier key is ``fold_in(k_i, 4)``, the key that
``robust_eval``'s ``fixed`` randomness mode gives the same image with the same seed, so the
spectrum is that of the very map the deterministic white-box attack attacks; Lanczos starts from
``fold_in(k_i, 5)``; ball sample ``j`` is ``fold_in(fold_in(fold_in(k_i, 6), 0), j)``.

Forward-mode methods (``jvp_chunks``, ``jacfwd``) run through the ``fast_vjp=False`` UNet and
Lanczos with ``ad="jvp"``; reverse-mode methods (``vjp_chunks``, ``jacrev``) through the
``fast_vjp=True`` twin and ``ad="vjp"`` (JAX cannot forward-differentiate its custom VJP).

Resumable: per setting, finished images are written in chunks of ``study.images_per_chunk`` to
``<workdir>/<setting>/chunks/`` (a ``ChunkStore`` fingerprinted with the setting, study, data,
model and seed); rerunning the same command after a kill recomputes nothing finished. Writes
``results.json`` (per setting: mean/std/median/p10/p90 over images of every quantity, pooled
fractions and quantiles, the paper's numbers, compile and wall time, chunks run vs total, the
purifier manifest; the run manifest), ``per_example.npz`` (``<setting>.<field>`` arrays: all
singular values, top-k, rates, timings), ``spectrum.png`` (pooled density with the 0.25 / 1.0
lines; median sorted spectrum with a 10-90% band) and ``settings.png`` (settings compared).
"""

from __future__ import annotations

import pathlib
import re
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common
from experiments.robust_eval import load_ddpm, make_purifier, row_config, write_results

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_jacobian.py")
FORWARD_METHODS = ("jacfwd", "jvp_chunks")
# Yuezhang & Wei (arXiv 2505.22839), Fig. 3a: CIFAR-10, DiffPure (DDPM t* = 0.1), randomness
# fixed: "over 90% of singular values are below 0.25, and only 1.3% exceed 1.0".
PAPER = {"dataset": "cifar10", "purifier": "DDPM t*=0.1 (DiffPure), fixed randomness",
         "frac_below_0.25": ">0.90", "frac_above_1.0": 0.013, "figure": "3a"}
# Tags folded into k_i = fold_in(key(seed), index): 4 is robust_eval's fixed-randomness key
# (jaxrob.evaluation._robust._FIXED), so both studies see the same deterministic map.
_FIXED, _LANCZOS, _BALL, _CHECK = 4, 5, 6, 7
_NAME_RE = re.compile(r"[A-Za-z0-9_.+=-]+")
_SCALARS = ("frac_below", "frac_above", "geometric_mean", "geometric_mean_nonzero", "sigma_max",
            "frobenius", "rms_sv",
            "frac_zero_sv", "frac_clipped", "topk_max_rel_err", "rate", "rate_over_rms",
            "jacobian_check")


# ----------------------------------------------------------------------------- checks


def _check_study(s, *, what: str) -> dict:
    """The study block as plain keyword values; raises ValueError naming the bad field."""
    from jaxrob.analysis import METHODS, SVD_METHODS

    def pos(name):
        return _common.check_positive(s[name], f"{what}.{name}")

    if s.method not in METHODS:
        raise ValueError(f"{what}.method: expected one of {list(METHODS)}, got {s.method!r}")
    if s.topk_method not in SVD_METHODS:
        raise ValueError(f"{what}.topk_method: expected one of {list(SVD_METHODS)}, got "
                         f"{s.topk_method!r}")
    topk = s.topk
    if isinstance(topk, bool) or int(topk) != topk or topk < 0:
        raise ValueError(f"{what}.topk: expected an integer >= 0 (0: skip), got {topk!r}")
    num = s.num
    if isinstance(num, bool) or int(num) != num or num < 0:
        raise ValueError(f"{what}.num: expected an integer >= 0 ball samples (0: skip the "
                         f"empirical compression rate), got {num!r}")
    if num and not float(s.eps) > 0:
        raise ValueError(f"{what}.eps: expected a positive L2 radius, got {s.eps!r}")
    low, high = float(s.low), float(s.high)
    if not 0 <= low <= high:
        raise ValueError(f"{what}.low/high: expected 0 <= low <= high, got {low}, {high}")
    if not s.dense and not topk:
        raise ValueError(f"{what}: dense=False and topk=0 leave nothing to compute")
    out = dict(method=s.method, chunk=pos("chunk"), images_per_chunk=pos("images_per_chunk"),
               dense=bool(s.dense), max_dense_mib=float(s.max_dense_mib), topk=int(topk),
               topk_method=s.topk_method, topk_iters=s.get("topk_iters"), low=low, high=high,
               eps=float(s.eps), num=int(num), empirical_chunk=s.get("empirical_chunk"),
               unclipped=bool(s.unclipped))
    if out["topk_iters"] is not None:
        out["topk_iters"] = pos("topk_iters")
    if out["empirical_chunk"] is not None:
        out["empirical_chunk"] = pos("empirical_chunk")
    return out


def _check_dims(study: dict, dim: int, *, what: str) -> None:
    """Checks that need the input dimension D (topk <= D, the dense matrix fits)."""
    if study["topk"] > dim:
        raise ValueError(f"{what}.topk: expected at most D = {dim} (the image's size), got "
                         f"{study['topk']}")
    iters = study["topk_iters"]
    if study["topk"] and study["topk_method"] == "lanczos" and iters is not None and not (
            study["topk"] <= iters <= dim):
        raise ValueError(f"{what}.topk_iters: Lanczos needs topk <= topk_iters <= D, i.e. "
                         f"{study['topk']}..{dim}, got {iters}")
    mib = dim * dim * 4 / 2**20
    if study["dense"] and mib > study["max_dense_mib"]:
        raise ValueError(f"{what}.dense: the {dim} x {dim} Jacobian needs {mib:.0f} MiB > "
                         f"study.max_dense_mib={study['max_dense_mib']:g}; set "
                         f"study.dense=False (matrix-free top-k only) or raise the limit")


def _settings(config) -> list[tuple[str, dict, object]]:
    """``[(name, overrides, setting_config)]``, every override and name checked."""
    settings = list(config.get("settings") or ()) or [{"name": "base"}]
    out = []
    for i, st in enumerate(settings):
        st = dict(st)
        name = str(st.get("name", f"setting{i}"))
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"settings[{i}].name: expected letters, digits and _.+=- (it "
                             f"names a sub-directory), got {name!r}")
        try:
            sc = row_config(config, st)
        except ValueError as e:
            raise ValueError(f"settings[{i}] ({name}): {str(e).replace('rows: ', '')}") from None
        out.append((name, st, sc))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"settings: names must be unique, got {names}")
    return out


# ----------------------------------------------------------------------------- computation


_COMPILED: dict = {}  # process-level cache: a sweep or a notebook never compiles a part twice


def _cache_key(net, schedule, purifier_config, study, mesh, example_x, params):
    sched = tuple(np.asarray(a).tobytes() for a in (schedule.betas, schedule.model_steps))
    shapes = jax.tree.map(lambda a: (tuple(np.shape(a)), str(a.dtype)), params)
    return (repr(net), sched, schedule.num_train_steps,
            repr(sorted(_common.to_plain(purifier_config).items())),
            repr(sorted(study.items())), mesh, example_x.shape, str(example_x.dtype),
            repr(jax.tree.structure(shapes)), repr(jax.tree.leaves(shapes)))


def _functions(net, params, schedule, purifier_config, study: dict, mesh, example_x):
    """Compiled per-image parts of one setting: ``({part: fn(params, x, k_i) -> dict},
    {part: compile seconds})``.

    Parts: ``dense`` (Jacobian, spectrum, summaries), ``topk`` (matrix-free top-k) and
    ``empirical`` (ball compression rate); the statistics of ``f(x)`` ride along with the first
    part. The model parameters are an argument (not constants baked into the executable), so
    the executables are cached for the process on the model's structure, the purifier and
    study settings, the mesh and the input shape; compiled ahead of time
    (``lower().compile()``) so compile time is measured apart from the per-image time.
    """
    from jaxrob.analysis import (
        compression_rate_empirical,
        jacobian,
        singular_values,
        spectral_compression,
        top_singular_values,
    )

    cache_key = _cache_key(net, schedule, purifier_config, study, mesh, example_x, params)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key], {}
    forward = study["method"] in FORWARD_METHODS
    chunked = study["method"] in ("jvp_chunks", "vjp_chunks")

    def purifier(params, model=net):
        return make_purifier(purifier_config,
                             lambda x, s: model.apply(params, x, s, train=False), schedule)

    def fmap(params, k_i, model=net):
        pur, key = purifier(params, model), jr.fold_in(k_i, _FIXED)
        if study["unclipped"]:  # the final reverse state before the purifier's [0, 1] clip
            return lambda x: pur.trajectory(x, key)[1][-1]
        return lambda x: pur(x, key)

    def output_stats(params, x, k_i):
        y = purifier(params)(x, jr.fold_in(k_i, _FIXED))
        return {"frac_clipped": jnp.mean(((y <= 0.0) | (y >= 1.0)).astype(jnp.float32))}

    def dense(params, x, k_i):
        f = fmap(params, k_i)
        jac = jacobian(f, x, method=study["method"],
                       chunk=study["chunk"] if chunked else None, mesh=mesh if chunked else None)
        # self-check against one independent JVP (VJP for the reverse-mode model): a silently
        # wrong column or row (seen with sharded jvp_chunks under XLA:CPU's no-YNN flag) shows
        kv = jr.fold_in(k_i, _CHECK)
        if forward:
            v = jr.normal(kv, x.shape)
            ref, got = jax.jvp(f, (x,), (v,))[1].reshape(-1), jac @ v.reshape(-1)
        else:
            y, vjp = jax.vjp(f, x)
            u = jr.normal(kv, y.shape)
            ref, got = vjp(u)[0].reshape(-1), u.reshape(-1) @ jac
        check = jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
        s = singular_values(jac)
        sc = spectral_compression(s, low=study["low"], high=study["high"])
        fro = jnp.sqrt(jnp.sum(jnp.square(s)))
        # numerically zero: the directions of output pixels clipped to 0 or 1 (frac_clipped)
        nonzero = s > 1e-5 * s[0]
        log_nz = jnp.sum(jnp.where(nonzero, jnp.log(jnp.where(nonzero, s, 1.0)), 0.0))
        return {"svals": s, "frac_below": sc.frac_below, "frac_above": sc.frac_above,
                "geometric_mean": sc.geometric_mean,
                "geometric_mean_nonzero": jnp.exp(log_nz / jnp.maximum(jnp.sum(nonzero), 1)),
                "sigma_max": s[0], "frobenius": fro,
                "rms_sv": fro / jnp.sqrt(jnp.float32(s.shape[0])),
                "frac_zero_sv": 1.0 - jnp.mean(nonzero.astype(jnp.float32)),
                "jacobian_check": check}

    def topk(params, x, k_i):
        s = top_singular_values(fmap(params, k_i), x, k=study["topk"],
                                key=jr.fold_in(k_i, _LANCZOS), method=study["topk_method"],
                                num_iters=study["topk_iters"], ad="mixed" if forward else "vjp",
                                chunk=study["chunk"],
                                # J^T from the fast_vjp twin's reverse mode: ~4x faster on CPU
                                f_reverse=fmap(params, k_i, net.clone(fast_vjp=True))
                                if forward else None)
        return {"topk": s}

    def empirical(params, x, k_i):
        r = compression_rate_empirical(fmap(params, k_i), x, jr.fold_in(k_i, _BALL),
                                       eps=study["eps"], num=study["num"], norm="l2",
                                       chunk=study["empirical_chunk"])
        return {"rate": r.rate[0], "input_norm": r.input_norm[0],
                "output_norm": r.output_norm[0]}

    parts = {"dense": dense} if study["dense"] else {}
    if study["topk"]:
        parts["topk"] = topk
    if study["num"]:
        parts["empirical"] = empirical
    first = next(iter(parts))
    inner = parts[first]
    parts[first] = lambda p, x, k_i: {**inner(p, x, k_i), **output_stats(p, x, k_i)}
    k0 = jr.fold_in(jr.key(0), 0)
    compiled, compile_s = {}, {}
    for name, fn in parts.items():
        t = _common.Timer()
        compiled[name] = jax.jit(fn).lower(params, example_x, k0).compile()
        compile_s[name] = t()
    _COMPILED[cache_key] = compiled
    return compiled, compile_s


def _compute_image(fns, params, x_1HWC, k_i) -> dict:
    """All parts for one image; per-part seconds as ``time_<part>``."""
    out = {}
    for name, fn in fns.items():
        t = _common.Timer()
        res = jax.block_until_ready(fn(params, x_1HWC, k_i))
        out[f"time_{name}"] = np.float32(t())
        out.update({k: np.asarray(v) for k, v in res.items()})
    return out


def _compute_chunk(fns, params, images, indices, key) -> dict[str, np.ndarray]:
    """Per-image results of one chunk, stacked (``index`` first); derived scalars added."""
    rows = []
    for x, idx in zip(images, indices, strict=True):
        k_i = jr.fold_in(key, int(idx))
        rows.append(_compute_image(fns, params, np.asarray(x[None], np.float32), k_i))
    out = {"index": np.asarray(indices, np.int64)}
    out.update({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    if "svals" in out and "topk" in out:
        k = out["topk"].shape[1]
        ref = out["svals"][:, :k]
        out["topk_rel_err"] = np.abs(out["topk"] - ref) / np.maximum(ref, 1e-12)
        out["topk_max_rel_err"] = out["topk_rel_err"].max(axis=1)
    if "rate" in out and "rms_sv" in out:
        out["rate_over_rms"] = out["rate"] / np.maximum(out["rms_sv"], 1e-12)
    return out


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "p10": float(np.quantile(a, 0.1)), "p90": float(np.quantile(a, 0.9)),
            "min": float(a.min()), "max": float(a.max())}


def run_setting(name, overrides, sc, study, workdir, models, test, mesh, key) -> tuple:
    """One setting (resumable): ``(results entry, per-example arrays)``."""
    from jaxrob.evaluation import ChunkStore

    unet, ddpm_vars, schedule = models
    forward = study["method"] in FORWARD_METHODS
    net = unet.clone(fast_vjp=not forward)
    purifier = make_purifier(sc.purifier, lambda x, s: x, schedule)  # for its manifest
    n, per = len(test), study["images_per_chunk"]
    fingerprint = {"setting": _common.to_plain(overrides),
                   "purifier": _common.to_plain(sc.purifier),
                   # these only change speed or limits: a resumed run may retune them
                   "study": {k: v for k, v in study.items()
                             if k not in ("chunk", "empirical_chunk", "max_dense_mib")},
                   "data": _common.to_plain(sc.data), "ddpm": _common.to_plain(sc.ddpm),
                   "seed": int(sc.seed), "key": "fold_in(key(seed), index); purifier tag 4"}
    store = ChunkStore(workdir / name / "chunks", fingerprint=fingerprint)
    starts = list(range(0, n, per))
    todo = [s for s in starts if not store.is_done(s, min(s + per, n))]
    timer = _common.Timer()
    compile_s = {}
    if todo:
        images = np.asarray(test.images, np.float32)
        fns, compile_s = _functions(net, ddpm_vars, schedule, sc.purifier, study, mesh,
                                    images[:1])
        logging.info("%s: compiled %s in %s s", name, list(fns),
                     {k: round(v, 1) for k, v in compile_s.items()})
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"jacobian {name}", unit="chunk")
        for s in todo:
            e = min(s + per, n)
            t = _common.Timer()
            out = _compute_chunk(fns, ddpm_vars, images[s:e], np.asarray(test.indices[s:e]),
                                 key)
            store.save(s, e, **out)
            bar.update(1)
            msg = ", ".join(f"{k} {float(np.mean(out[k])):.4g}" for k in
                            ("frac_below", "frac_above", "sigma_max", "rate") if k in out)
            logging.info("%s: images [%d, %d) in %.1f s: %s", name, s, e, t(), msg)
        bar.close()
    res = store.load()
    if sorted(res["position"].tolist()) != list(range(n)):
        raise RuntimeError(f"{store.directory}: finished chunks do not cover the {n} images "
                           "exactly")
    res.pop("position")
    summary = {k: _stats(res[k]) for k in _SCALARS if k in res}
    pooled = None
    if "svals" in res:
        s = res["svals"].ravel()
        pooled = {"frac_below": float(np.mean(s < study["low"])),
                  "frac_above": float(np.mean(s > study["high"])),
                  "quantiles": {str(q): float(np.quantile(s, q))
                                for q in (0.1, 0.5, 0.9, 0.99)},
                  "num_values": int(s.size)}
    times = {k[5:]: _stats(v)["median"] for k, v in res.items() if k.startswith("time_")}
    entry = {"name": name, "overrides": _common.to_plain(overrides),
             "purifier": purifier.manifest(), "study": study,
             "jacobian_mode": "forward (fast_vjp=False UNet, Lanczos ad=mixed)" if forward
             else "reverse (fast_vjp=True UNet, Lanczos ad=vjp)",
             "dim": int(np.prod(test.image_shape)), "num_images": n,
             "summary": summary, "pooled": pooled, "paper": PAPER,
             "median_image_s": times, "compile_s": compile_s,
             "compiled_this_run": bool(compile_s), "wall_s_this_run": timer(),
             "chunks_run": len(todo), "chunks_total": len(starts)}
    return entry, res


# ----------------------------------------------------------------------------- plots


_FLOOR = 1e-4  # plots show smaller singular values (numerically zero ones included) here


def _plot_spectrum(path, entries, per, low, high):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, e in enumerate(entries):
        r = per[e["name"]]
        s = r.get("svals", r.get("topk"))
        label = e["name"] if "svals" in r else f"{e['name']} (top-{s.shape[1]})"
        s = np.maximum(s, _FLOOR)
        top = max(float(s.max()), 10 * _FLOOR)
        bins = np.logspace(np.log10(_FLOOR), np.log10(top) + 1e-6, 60)
        a1.hist(s.ravel(), bins=bins, histtype="step", color=f"C{i}", label=label,
                weights=np.full(s.size, 1.0 / s.size))
        rank = np.arange(1, s.shape[1] + 1)
        lo, med, hi = np.quantile(s, [0.1, 0.5, 0.9], axis=0)
        a2.plot(rank, med, color=f"C{i}", label=label)
        a2.fill_between(rank, lo, hi, color=f"C{i}", alpha=0.2)
    a1.set_xscale("log")
    a1.set_xlabel(f"singular value (values < {_FLOOR:g}, e.g. clipped pixels, at {_FLOOR:g})")
    a1.set_ylabel("fraction of singular values (pooled)")
    for v, ls in ((low, "--"), (high, ":")):
        a1.axvline(v, color="k", ls=ls, lw=1)
        a2.axhline(v, color="k", ls=ls, lw=1)
    a2.set_yscale("log")
    a2.set_xlabel("rank")
    a2.set_ylabel("singular value (median, 10-90% band)")
    a2.legend(fontsize=7)
    fig.suptitle(f"Jacobian spectra (cf. Yuezhang & Wei Fig. 3a: >90% below {low:g}, 1.3% "
                 f"above {high:g} on CIFAR-10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_settings(path, entries):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in entries]
    x = np.arange(len(names))
    panels = [("frac_below", "fraction of s < low"), ("frac_above", "fraction of s > high"),
              ("sigma_max", "sigma_max"), ("rate", "empirical compression rate")]
    panels = [(k, t) for k, t in panels if any(k in e["summary"] for e in entries)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for a, (k, title) in zip(axes[0], panels, strict=True):
        m = [e["summary"].get(k, {}).get("mean", np.nan) for e in entries]
        sd = [e["summary"].get(k, {}).get("std", 0.0) for e in entries]
        a.bar(x, m, yerr=sd, color=[f"C{i}" for i in range(len(names))])
        if k == "rate":
            rms = [e["summary"].get("rms_sv", {}).get("mean", np.nan) for e in entries]
            a.plot(x, rms, "k_", ms=14, label="RMS singular value")
            a.legend(fontsize=7)
        a.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        a.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def run(config, workdir) -> dict:
    """Every setting of ``config.settings``; returns (and writes) ``results.json``'s content."""
    timer = _common.Timer()
    settings = _settings(config)
    studies = [_check_study(sc.study, what=f"{name}: study") for name, _, sc in settings]
    schedule = _common.build_schedule(config.ddpm.diffusion)
    for (name, _, sc) in settings:  # purifiers are checked before any model or data loads
        if make_purifier(sc.purifier, lambda x, s: x, schedule) is None:
            raise ValueError(f"{name}: purifier.enabled=False: the study needs a purifier")
        grad = sc.purifier.gradient
        if grad != "exact":
            raise ValueError(f"{name}: purifier.gradient: expected 'exact' (the Jacobian of a "
                             f"{grad!r} purifier is that of its gradient approximation), got "
                             f"{grad!r}")
        if sc.study.unclipped and sc.purifier.get("stages"):
            raise ValueError(f"{name}: study.unclipped needs a single-stage purifier")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.write_json(workdir / "config.json", config)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    dim = int(np.prod(test.image_shape))
    for (name, _, _), study in zip(settings, studies, strict=True):
        _check_dims(study, dim, what=f"{name}: study")
    mesh = _common.get_mesh(config.mesh)
    unet, ddpm_vars, schedule, ddpm_info = load_ddpm(config.ddpm, tuple(test.image_shape))
    key = jr.key(int(config.seed))
    entries, per = [], {}
    for (name, overrides, sc), study in zip(settings, studies, strict=True):
        logging.info("setting %s: purifier %s", name, _common.to_plain(sc.purifier))
        entry, res = run_setting(name, overrides, sc, study, workdir,
                                 (unet, ddpm_vars, schedule), test, mesh, key)
        entries.append(entry)
        per[name] = res
        s = entry["summary"]
        logging.info("setting %s done: %s", name, {k: round(s[k]["mean"], 4) for k in
                                                   ("frac_below", "frac_above", "sigma_max",
                                                    "topk_max_rel_err", "rate") if k in s})
    _common.save_npz(workdir / "per_example.npz",
                     **{f"{n}.{k}": v for n, r in per.items() for k, v in r.items()})
    low, high = studies[0]["low"], studies[0]["high"]
    if _common.is_main_process():
        _plot_spectrum(workdir / "spectrum.png", entries, per, low, high)
        _plot_settings(workdir / "settings.png", entries)
    results = {"settings": entries, "paper": PAPER, "ddpm": ddpm_info,
               "keys": {"image": "k_i = fold_in(key(seed), index_i)",
                        "purifier": "fold_in(k_i, 4) (= robust_eval's fixed randomness)",
                        "lanczos": "fold_in(k_i, 5)",
                        "ball": "fold_in(fold_in(fold_in(k_i, 6), 0), j)"},
                   "num_images": len(test), "devices": int(mesh.size), "wall_s": timer()}
    write_results(config, workdir, results, test)
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
