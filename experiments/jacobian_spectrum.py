"""Jacobian spectrum of a purifier with its randomness fixed (Yuezhang & Wei, Fig. 3a).

    python experiments/jacobian_spectrum.py --config configs/mnist_jacobian.py \
        --workdir runs/mnist_jacobian

For every purifier setting of ``config.settings`` (each a nested dict ``{"name": ...,
"purifier": {...}, "study": {...}}`` of overrides of the base config, merged by
``experiments._common.row_config`` like robust_eval's ``rows``) and every image ``x_i``, the
purifier with one fixed key is a deterministic map ``f_i(x) = purify(x, k_i)`` of R^D. For it
the run computes

* the dense Jacobian ``J = df_i/dx`` at ``x_i`` (``jaxrob.analysis.jacobian``, directions sharded
  over the mesh), all its singular values and their summary
  (``jaxrob.analysis.spectrum_summary``): the fractions below ``study.low`` / above
  ``study.high``, the geometric mean, sigma_max, the Frobenius norm and the RMS singular value
  ``||J||_F / sqrt(D)``. Output pixels that the purifier clips to 0 or 1 have zero Jacobian
  rows: ``frac_clipped`` (of f(x)) and ``frac_zero_sv`` (singular values <= 1e-5 sigma_max)
  record them, ``geometric_mean_nonzero`` leaves them out, and ``study.unclipped``
  differentiates the last reverse state instead;
* the top ``study.topk`` singular values without forming ``J`` (Lanczos or randomized SVD on
  JVP/VJP operators) and, when the dense spectrum is there, their relative error;
* the empirical compression rate in an L2 ball of radius ``study.eps`` (``study.num`` samples)
  with the same fixed key (``jaxrob.analysis.compression_rate_empirical``); for a small ball
  away from the [0, 1] box it approaches the RMS singular value (``rate_over_rms``).

Keys (so a result never depends on chunking, restarts or devices; tags of
``jaxrob._keys``): ``k_i = fold_in(key(seed), index_i)`` with the image's global index; the
purifier key is ``fold_in(k_i, FIXED)`` (``jaxrob.evaluation.fixed_purifier_keys``), the key
that robust_eval's ``fixed`` randomness mode gives the same image with the same seed, so the
spectrum is that of the very map the deterministic white-box attack attacks; Lanczos starts from
``fold_in(k_i, LANCZOS)``; ball sample ``j`` is ``fold_in(fold_in(fold_in(k_i, STUDY), 0), j)``;
the Jacobian's self-check probe is ``normal(fold_in(k_i, PROBE))`` (tags 4, 5, 6, 7: the values
of the records made before the tags had names).

Forward-mode methods (``jvp_chunks``, ``jacfwd``) run through the ``fast_vjp=False`` UNet and
Lanczos with ``ad="jvp"``; reverse-mode methods (``vjp_chunks``, ``jacrev``) through the
``fast_vjp=True`` twin and ``ad="vjp"`` (JAX cannot forward-differentiate its custom VJP).

Resumable: per setting and part, ``jaxrob.evaluation.run_chunks`` writes finished images in
chunks of ``study.images_per_chunk`` to ``<workdir>/<setting>/chunks/<part>/`` (a
``ChunkStore`` fingerprinted with the setting, study, data, model and seed); rerunning the same
command after a kill recomputes nothing finished. The parts: ``dense`` (the Jacobian, each
image's directions spread over the devices) and ``matrix_free`` (top-k and ball rate, on one
device: a program over several devices would repeat them on each); the images of a chunk are
computed one after the other. Writes ``results.json`` (per setting: mean/std/median/p10/p90
over images of every quantity, pooled fractions and quantiles, the paper's numbers, compute
and wall time and chunks run vs total per part, the purifier manifest; the run manifest),
``per_example.npz`` (``<setting>.<field>`` arrays: all singular values, top-k, rates, each
part's compute seconds per image ``time_<part>``), ``spectrum.png`` (pooled density with the
0.25 / 1.0 lines; median sorted spectrum with a 10-90% band) and ``settings.png`` (settings
compared).
"""

from __future__ import annotations

import functools
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

import jaxrob._keys as tags
from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_jacobian.py")
FORWARD_METHODS = ("jacfwd", "jvp_chunks")
# Yuezhang & Wei (arXiv 2505.22839), Fig. 3a: CIFAR-10, DiffPure (DDPM t* = 0.1), randomness
# fixed: "over 90% of singular values are below 0.25, and only 1.3% exceed 1.0".
PAPER = {"dataset": "cifar10", "purifier": "DDPM t*=0.1 (DiffPure), fixed randomness",
         "frac_below_0.25": ">0.90", "frac_above_1.0": 0.013, "figure": "3a"}
_KEYS = {"image": "k_i = fold_in(key(seed), index_i)",
         "purifier": f"fold_in(k_i, {tags.FIXED}) (FIXED: robust_eval's fixed randomness)",
         "lanczos": f"fold_in(k_i, {tags.LANCZOS}) (LANCZOS)",
         "ball": f"fold_in(fold_in(fold_in(k_i, {tags.STUDY}), 0), j) (STUDY)",
         "check": f"normal(fold_in(k_i, {tags.PROBE})) (PROBE)"}
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
            sc = _common.row_config(config, st)
        except ValueError as e:
            raise ValueError(f"settings[{i}] ({name}): {str(e).replace('rows: ', '')}") from None
        out.append((name, st, sc))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"settings: names must be unique, got {names}")
    return out


# ----------------------------------------------------------------------------- computation


def _fixed_map(purifier, key, unclipped: bool):
    """The deterministic map ``x -> purify(x, key)`` (or its last reverse state, unclipped)."""
    if unclipped:  # the final reverse state before the purifier's [0, 1] clip
        return lambda x: purifier.trajectory(x, key)[1][-1]
    return lambda x: purifier(x, key)


def _parts(study: dict) -> tuple[str, ...]:
    """What a setting computes, each part its own resumable pass over the images: ``dense``
    (the Jacobian, its directions sharded over every device) and ``matrix_free`` (top-k and
    ball rate, one device, as a single-device program computes them)."""
    return (("dense",) if study["dense"] else ()) + (
        ("matrix_free",) if study["topk"] or study["num"] else ())


def _dense(purifier, study: dict, mesh, x, k_i) -> dict:
    """The dense Jacobian of one image ``x`` (1, H, W, C), its spectrum and self-check."""
    from jaxrob.analysis import jacobian, singular_values, spectrum_summary

    forward = study["method"] in FORWARD_METHODS
    chunked = study["method"] in ("jvp_chunks", "vjp_chunks")
    f = _fixed_map(purifier, jr.fold_in(k_i, tags.FIXED), study["unclipped"])
    jac = jacobian(f, x, method=study["method"], chunk=study["chunk"] if chunked else None,
                   mesh=mesh if chunked else None)
    # self-check against one independent JVP (VJP for the reverse-mode model): a silently
    # wrong column or row (seen with sharded jvp_chunks under XLA:CPU's no-YNN flag) shows
    kv = jr.fold_in(k_i, tags.PROBE)
    if forward:
        v = jr.normal(kv, x.shape)
        ref, got = jax.jvp(f, (x,), (v,))[1].reshape(-1), jac @ v.reshape(-1)
    else:
        y, vjp = jax.vjp(f, x)
        u = jr.normal(kv, y.shape)
        ref, got = vjp(u)[0].reshape(-1), u.reshape(-1) @ jac
    check = jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
    s = singular_values(jac)
    sm = spectrum_summary(s, low=study["low"], high=study["high"])
    return {"svals": s, "frac_below": sm.frac_below, "frac_above": sm.frac_above,
            "geometric_mean": sm.geometric_mean,
            "geometric_mean_nonzero": sm.geometric_mean_nonzero, "sigma_max": sm.sigma_max,
            "frobenius": sm.frobenius, "rms_sv": sm.rms, "frac_zero_sv": sm.frac_zero,
            "jacobian_check": check}


def _matrix_free(purifier, purifier_rev, study: dict, x, k_i) -> dict:
    """Top-k singular values (Lanczos / randomized SVD) and the empirical ball rate of one
    image; ``purifier_rev`` (the same parameters over the ``fast_vjp=True`` twin) gives
    Lanczos its ``J^T`` in forward mode."""
    from jaxrob.analysis import compression_rate_empirical, top_singular_values

    forward = study["method"] in FORWARD_METHODS
    key = jr.fold_in(k_i, tags.FIXED)
    f = _fixed_map(purifier, key, study["unclipped"])
    out = {}
    if study["topk"]:
        out["topk"] = top_singular_values(
            f, x, k=study["topk"], key=jr.fold_in(k_i, tags.LANCZOS),
            method=study["topk_method"], num_iters=study["topk_iters"],
            ad="mixed" if forward else "vjp", chunk=study["chunk"],
            # J^T from the fast_vjp twin's reverse mode: ~4x faster on CPU
            f_reverse=_fixed_map(purifier_rev, key, study["unclipped"]) if forward else None)
    if study["num"]:
        r = compression_rate_empirical(f, x, jr.fold_in(k_i, tags.STUDY), eps=study["eps"],
                                       num=study["num"], norm="l2",
                                       chunk=study["empirical_chunk"])
        out.update(rate=r.rate[0], input_norm=r.input_norm[0], output_norm=r.output_norm[0])
    return out


def _chunk(part: str, purifier, purifier_rev, study: dict, mesh, batch, keys) -> dict:
    """``run_chunks``' function for one part: the images of a chunk one after the other; the
    statistics of ``f(x)`` ride along with the setting's first part."""

    def one(a):
        x, k_i = a[0][None], a[1]
        out = (_dense(purifier, study, mesh, x, k_i) if part == "dense"
               else _matrix_free(purifier, purifier_rev, study, x, k_i))
        if part == _parts(study)[0]:
            y = purifier(x, jr.fold_in(k_i, tags.FIXED))
            out["frac_clipped"] = jnp.mean(((y <= 0.0) | (y >= 1.0)).astype(jnp.float32))
        return out

    return jax.lax.map(one, (batch["x"], keys))


def _chunk_mesh(part: str, study: dict, mesh):
    """The mesh ``run_chunks`` places a part's chunk on. Images go one by one (so any
    ``images_per_chunk`` works): a ``data`` axis of 1, times every device of ``mesh`` when the
    dense Jacobian's directions are sharded over them (the chunk is replicated there), else one
    device (a program over several devices would replicate the work on each)."""
    from jax.sharding import AxisType

    from jaxrob.parallel import DATA_AXIS

    sharded = part == "dense" and study["method"] in ("jvp_chunks", "vjp_chunks")
    devices = list(mesh.devices.ravel()) if sharded else list(mesh.devices.ravel())[:1]
    return jax.make_mesh((1, len(devices)), (DATA_AXIS, "directions"),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _chunk_done(name: str, part: str, start: int, stop: int, out: dict) -> None:
    """Called by ``run_chunks`` after every stored chunk."""
    msg = ", ".join(f"{k} {float(np.mean(out[k])):.4g}" for k in
                    ("frac_below", "frac_above", "sigma_max", "rate") if k in out)
    logging.info("%s (%s): images [%d, %d) in %.1f s: %s", name, part, start, stop,
                 float(np.sum(out["seconds"])), msg)


def _derived(res: dict) -> dict:
    """Per-image quantities derived on the host from the record (not stored)."""
    out = {}
    if "svals" in res and "topk" in res:
        k = res["topk"].shape[1]
        ref = res["svals"][:, :k]
        out["topk_rel_err"] = np.abs(res["topk"] - ref) / np.maximum(ref, 1e-12)
        out["topk_max_rel_err"] = out["topk_rel_err"].max(axis=1)
    if "rate" in res and "rms_sv" in res:
        out["rate_over_rms"] = res["rate"] / np.maximum(res["rms_sv"], 1e-12)
    return out


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "p10": float(np.quantile(a, 0.1)), "p90": float(np.quantile(a, 0.9)),
            "min": float(a.min()), "max": float(a.max())}


def run_setting(name, overrides, sc, study, workdir, ddpm, test, mesh, key) -> tuple:
    """One setting (resumable): ``(results entry, per-example arrays)``."""
    from jaxrob.evaluation import ChunkStore, run_chunks

    forward = study["method"] in FORWARD_METHODS
    # forward-mode methods differentiate the fast_vjp=False UNet, reverse-mode ones its twin
    purifier = _common.make_purifier(sc.purifier, ddpm.with_fast_vjp(not forward))
    purifier_rev = (purifier.replace(eps_fn=ddpm.with_fast_vjp(True))
                    if forward and study["topk"] else None)
    n = len(test)
    fingerprint = {"setting": _common.to_plain(overrides),
                   "purifier": _common.to_plain(sc.purifier),
                   # these only change speed or limits: a resumed run may retune them
                   "study": {k: v for k, v in study.items()
                             if k not in ("chunk", "empirical_chunk", "max_dense_mib")},
                   "data": _common.to_plain(sc.data), "ddpm": _common.to_plain(sc.ddpm),
                   "seed": int(sc.seed), "keys": _KEYS}
    data = {"x": np.asarray(test.images, np.float32),
            "index": np.asarray(test.indices, np.int64)}
    timer = _common.Timer()
    res, runs = {}, {}
    for part in _parts(study):
        store = ChunkStore(workdir / name / "chunks" / part,
                           fingerprint={**fingerprint, "part": part})
        args = ((part, purifier, None, study, mesh) if part == "dense"
                else (part, purifier, purifier_rev, study, None))
        runs[part] = run_chunks(
            _chunk, data, key=key, args=args, batch_size=study["images_per_chunk"],
            store=store, mesh=_chunk_mesh(part, study, mesh), desc=f"jacobian {name} {part}",
            log=functools.partial(_chunk_done, name, part))
        rec = dict(runs[part].records)
        rec[f"time_{part}"] = rec.pop("seconds")
        res.update(rec)
    res.update(_derived(res))
    summary = {k: _stats(res[k]) for k in _SCALARS if k in res}
    pooled = None
    if "svals" in res:
        s = res["svals"].ravel()
        pooled = {"frac_below": float(np.mean(s < study["low"])),
                  "frac_above": float(np.mean(s > study["high"])),
                  "quantiles": {str(q): float(np.quantile(s, q))
                                for q in (0.1, 0.5, 0.9, 0.99)},
                  "num_values": int(s.size)}
    # compute seconds per image and part: its chunk's share (a run's first chunk includes the
    # compilation); over the whole record, resumed chunks included
    times = {part: float(np.nanmedian(res[f"time_{part}"]))
             if np.isfinite(res[f"time_{part}"]).any() else None for part in runs}
    entry = {"name": name, "overrides": _common.to_plain(overrides),
             "purifier": purifier.manifest(), "study": study,
             "jacobian_mode": "forward (fast_vjp=False UNet, Lanczos ad=mixed)" if forward
             else "reverse (fast_vjp=True UNet, Lanczos ad=vjp)",
             "dim": int(np.prod(test.image_shape)), "num_images": n,
             "summary": summary, "pooled": pooled, "paper": PAPER,
             "median_image_s": times,
             "compute_s": {part: r.total_s for part, r in runs.items()},
             "wall_s_this_run": timer(),
             "chunks_run": {part: r.chunks_run for part, r in runs.items()},
             "chunks_total": {part: r.chunks_total for part, r in runs.items()}}
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


class _ScheduleOnly:
    """Stands in for the DDPM (identity eps) while the settings' purifiers are checked."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x_t, step):
        return x_t


def run(config, workdir) -> dict:
    """Every setting of ``config.settings``; returns (and writes) ``results.json``'s content."""
    from jaxrob.models import schedule_from_metadata

    timer = _common.Timer()
    settings = _settings(config)
    studies = [_check_study(sc.study, what=f"{name}: study") for name, _, sc in settings]
    # purifiers are checked before any model or data loads, on the config's schedule
    stand_in = _ScheduleOnly(schedule_from_metadata(_common.to_plain(config.ddpm.diffusion)))
    for (name, _, sc) in settings:
        if _common.make_purifier(sc.purifier, stand_in) is None:
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
    ddpm, ddpm_info = _common.load_ddpm(config.ddpm, tuple(test.image_shape))
    key = jr.key(int(config.seed))
    entries, per = [], {}
    for (name, overrides, sc), study in zip(settings, studies, strict=True):
        logging.info("setting %s: purifier %s", name, _common.to_plain(sc.purifier))
        entry, res = run_setting(name, overrides, sc, study, workdir, ddpm, test, mesh, key)
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
               "keys": _KEYS, "num_images": len(test), "devices": int(mesh.size),
               "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
