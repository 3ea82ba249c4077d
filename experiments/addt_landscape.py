"""Loss landscapes and attack trajectories of purification, stochastic vs DW-box (ADDT paper).

    python experiments/addt_landscape.py --config configs/digits_landscape.py \\
        --workdir runs/digits_landscape

Liu et al. (ICLR 2025, "Towards Understanding the Robustness of Diffusion-Based Purification: A
Stochastic Perspective") argue that a DBP model owes its robustness mostly to its randomness:
under the *DW-box* setting (the purifier's noise fixed and known to the attacker, so the
defence is a deterministic function) the attack loss climbs higher and faster than in the
*stochastic* setting (fresh noise at every call, EoT gradients), and the stochastic loss
landscape is smoother. This study measures both, for every model of ``config.models`` (the
base DDPM and ADDT fine-tunes; rows whose export is missing are skipped and listed) and every
setting of ``study.randomness``:

* the attack: ``config.attack`` (PGD, exact gradients through the purifier, ``return_iterates``)
  on every image alone, with ``study.dwbox_eot_samples`` EoT samples in the fixed setting (one
  key: every sample would be the same);
* the trajectory: the CE loss at every PGD iterate ``x_0 .. x_T``; fixed: under the image's
  fixed key (the attacked function itself); stochastic: under ``study.trajectory_eot`` fresh
  keys per iterate (mean over them: the expected loss the defence gives the iterate);
* the landscape: the CE loss at ``clip(x + eps (a d1 + b d2), 0, 1)`` on a ``grid_points`` x
  ``grid_points`` grid of ``a, b`` in ``[-grid_radius, grid_radius]`` (eps units) around the
  clean image, ``d1`` the setting's own adversarial direction ``x_adv - x`` and ``d2`` a
  random Rademacher direction orthogonal to it (both unit Linf:
  :func:`jaxrob.analysis.landscape_directions`); fixed: the fixed key; stochastic: the mean
  over ``study.landscape_eot`` keys, the same keys at every grid point (the EoT estimate of the
  expected loss, i.e. the mean of that many fixed-key landscapes);
* the scores: the fraction of ``study.score_eot`` purifications (fixed: the one) that classify
  the clean image and ``x_adv`` correctly, exactly as ``evaluate_robustness`` scores them.

Keys of image ``i``, ``k_i = fold_in(key(seed), index_i)``, as ``evaluate_robustness`` derives
them (tags of ``jaxrob._keys``): attack ``fold_in(k_i, ATTACK)`` (stochastic: its purifier keys
too); fixed purifier key ``fold_in(k_i, FIXED)`` (``jaxrob.evaluation.fixed_purifier_keys``,
the one purifier of every fixed-randomness study and robust_eval row); stochastic trajectory
key ``v`` of iterate ``t``: ``fold_in(fold_in(fold_in(k_i, CANDIDATE), t), v)`` (the keys that
score iterate ``t`` as a Fixed-AA candidate); stochastic landscape key ``v``:
``fold_in(fold_in(k_i, CLEAN), v)`` (the purifications that score the clean image, so the
landscape's origin is the clean score's loss); scoring keys ``fold_in(fold_in(k_i, CLEAN|ADV),
v)``; random direction: ``fold_in(k_i, STUDY)``.

Every (model, randomness) unit goes through ``jaxrob.evaluation.run_chunks`` with its own
fingerprinted ``ChunkStore`` (``units/<model>_<randomness>/``): finished chunks are written
atomically and a rerun skips them (a finished unit loads no model and computes nothing).
Writes ``results.json`` (per unit: trajectory mean/std/quartiles per iteration, the mean
landscape, landscape statistics, scores, compute time; manifest), ``landscape.npz`` (every
per-image array), ``landscape_<model>.png`` (surfaces and contours, stochastic vs DW-box),
``examples_<first model>.png`` (single images' landscapes), ``slices.png`` (the landscapes
along the two axes) and ``trajectories.png``.
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

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "digits_landscape.py")
RANDOMNESS = ("stochastic", "fixed")
LABELS = {"stochastic": "stochastic", "fixed": "DW-box (fixed noise)"}
_KEYS = {"image": "k_i = fold_in(key(seed), index_i)",
         "attack": f"fold_in(k_i, {tags.ATTACK}) (ATTACK)",
         "fixed": f"fold_in(k_i, {tags.FIXED}) (FIXED)",
         "trajectory": f"fold_in(fold_in(fold_in(k_i, {tags.CANDIDATE}), t), v) (CANDIDATE)",
         "landscape": f"fold_in(fold_in(k_i, {tags.CLEAN}), v) (CLEAN)",
         "score": f"fold_in(fold_in(k_i, {tags.CLEAN} | {tags.ADV}), v) (CLEAN / ADV)",
         "direction": f"fold_in(k_i, {tags.STUDY}) (STUDY)"}
PAPER = ("Liu et al., ICLR 2025 (ADDT): under DW-box the attack loss rises faster and higher "
         "along the attack than in the stochastic setting, whose loss landscape is smoother; "
         "DBP robustness is attributed mainly to stochasticity (CIFAR-10, PGD-20, EoT 10)")


# ----------------------------------------------------------------------------- config checks


def _int(value, what, minimum):
    if isinstance(value, bool) or value is None or int(value) != value or value < minimum:
        raise ValueError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_study(study) -> dict:
    """The validated ``config.study`` as plain values (ValueError on nonsense)."""
    randomness = tuple(study.randomness)
    if not randomness or len(set(randomness)) != len(randomness) or any(
            r not in RANDOMNESS for r in randomness):
        raise ValueError(f"study.randomness: expected distinct settings of {list(RANDOMNESS)}, "
                         f"got {list(randomness)}")
    radius = study.grid_radius
    if isinstance(radius, bool) or not (isinstance(radius, int | float) and math.isfinite(radius)
                                        and radius > 0):
        raise ValueError(f"study.grid_radius: expected a positive number of eps units, got "
                         f"{radius!r}")
    if study.direction not in ("rademacher", "gaussian"):
        raise ValueError(f"study.direction: expected 'rademacher' or 'gaussian', got "
                         f"{study.direction!r}")
    chunk = study.get("eval_batch")
    return {"randomness": randomness,
            "grid_points": _int(study.grid_points, "study.grid_points", 2),
            "grid_radius": float(radius),
            "landscape_eot": _int(study.landscape_eot, "study.landscape_eot", 1),
            "trajectory_eot": _int(study.trajectory_eot, "study.trajectory_eot", 1),
            "score_eot": _int(study.score_eot, "study.score_eot", 1),
            "dwbox_eot_samples": _int(study.dwbox_eot_samples, "study.dwbox_eot_samples", 1),
            "direction": study.direction, "sign": bool(study.sign),
            "batch_size": _int(study.batch_size, "study.batch_size", 1),
            "eval_batch": None if chunk is None else _int(chunk, "study.eval_batch", 1),
            "skip_missing": bool(study.skip_missing)}


def check_models(config) -> list[tuple[str, object]]:
    """``[(name, row config)]`` of ``config.models`` (each row merged into the config)."""
    rows = tuple(config.models)
    names = [dict(r).get("name") for r in rows]
    if not rows or any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(
            names):
        raise ValueError(f"models: expected rows with distinct non-empty names, got {names}")
    out = []
    for row in rows:
        rc = _common.row_config(config, row)
        if rc.attack.name != "pgd":
            raise ValueError(f"attack.name: the landscape study needs 'pgd' (its iterates), got "
                             f"{rc.attack.name!r}")
        if not rc.purifier.enabled:
            raise ValueError(f"models[{row['name']!r}]: the landscape study needs a purifier")
        out.append((row["name"], rc))
    return out


def _unit_attack(rc, randomness: str, s: dict):
    """The PGD of one unit (DW-box: ``dwbox_eot_samples`` EoT samples), returning iterates."""
    a = rc.attack.copy_and_resolve_references()
    if randomness == "fixed":
        a.eot_samples = s["dwbox_eot_samples"]
        a.eot_chunk = None
    return a, _common.make_attack(a, return_iterates=True)


# ----------------------------------------------------------------------------- device part

# What the chunks depend on (the rest of the study only changes the host summaries).
_DEVICE_FIELDS = ("grid_points", "grid_radius", "landscape_eot", "trajectory_eot", "score_eot",
                  "direction", "sign", "eval_batch")


def _grid(s: dict) -> np.ndarray:
    return np.linspace(-s["grid_radius"], s["grid_radius"], s["grid_points"])


def _sample_keys(keys_B, num: int):
    """(num, B): ``fold_in(keys_B[i], v)``."""
    return jax.vmap(lambda v: tags.fold(keys_B, v))(jnp.arange(num, dtype=jnp.uint32))


def _chunk(defended, attack, s: dict, randomness: str, eps, batch, keys) -> dict:
    """``run_chunks``' function: one (model, randomness) unit on a chunk of images."""
    from jaxrob.analysis import attack_trajectory, landscape_directions, loss_landscape
    from jaxrob.attacks import loss_from_logits
    from jaxrob.evaluation import predictions

    x, y = batch["x"], batch["y"]
    fixed = randomness == "fixed"
    fixed_B = tags.fold(keys, tags.FIXED)
    loss = loss_from_logits(defended, "ce")

    def attack_one(x_i, y_i, k_i):  # as evaluate_robustness attacks example i (alone)
        k_fixed = jr.fold_in(k_i, tags.FIXED)[None]
        model_i = ((lambda xx, _key: defended(xx, k_fixed)) if fixed
                   else (lambda xx, key: defended(xx, key[None])))
        res = attack(model_i, x_i[None], y_i[None], jr.fold_in(k_i, tags.ATTACK))
        return res.x_adv[0], res.iterates[:, 0]

    x_adv, its_BT = jax.vmap(attack_one)(x, y, keys)
    its = jnp.swapaxes(its_BT, 0, 1)  # (T + 1, B, H, W, C)
    num_its = its.shape[0]
    if fixed:
        traj_keys, land_keys = fixed_B[None], fixed_B[None]
        traj = attack_trajectory(loss, its, y, traj_keys, batch_size=s["eval_batch"])
        fixed_2B = jnp.concatenate([fixed_B, fixed_B])  # the clean image and x_adv
        model, num_score = (lambda xx, _keys: defended(xx, fixed_2B)), 1
    else:
        cand_B = tags.fold(keys, tags.CANDIDATE)
        traj_keys = jax.vmap(lambda t: _sample_keys(tags.fold(cand_B, t), s["trajectory_eot"]))(
            jnp.arange(num_its, dtype=jnp.uint32))  # (T + 1, K, B)
        traj = attack_trajectory(loss, its, y, traj_keys, per_iterate=True,
                                 batch_size=s["eval_batch"])
        land_keys = _sample_keys(tags.fold(keys, tags.CLEAN), s["landscape_eot"])
        model, num_score = defended, s["score_eot"]
    dirs = landscape_directions(x, x_adv, tags.fold(keys, tags.STUDY), kind=s["direction"],
                                sign=s["sign"], norm="linf")
    grid = jnp.asarray(_grid(s), jnp.float32)
    land = loss_landscape(loss, x, y, dirs, grid, grid, land_keys, norm="linf", scale=eps,
                          batch_size=s["eval_batch"])
    # the clean image and x_adv scored side by side (one batch: one purifier in the program)
    b = x.shape[0]
    score_keys = jnp.concatenate([tags.fold(keys, tags.CLEAN), tags.fold(keys, tags.ADV)])
    pred = predictions(model, jnp.concatenate([x, x_adv]), score_keys, num=num_score)
    correct = jnp.mean(pred == jnp.concatenate([y, y])[None], axis=0)
    delta = (x_adv - x).reshape(b, -1)
    return {"trajectory": traj.T, "landscape": jnp.moveaxis(land, -1, 0),
            "clean_correct": correct[:b], "adv_correct": correct[b:],
            "adv_linf": jnp.max(jnp.abs(delta), -1),
            "adv_l2": jnp.sqrt(jnp.sum(delta * delta, -1))}


# ----------------------------------------------------------------------------- host summaries


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a))}


def _at(grid: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(grid - value)))


def summarize_unit(per: dict, grid: np.ndarray) -> dict:
    """JSON summary of one unit's per-image record (trajectory (N, T+1), landscape (N, A, A))."""
    traj = np.asarray(per["trajectory"], np.float64)
    land = np.asarray(per["landscape"], np.float64)
    i0, i1 = _at(grid, 0.0), _at(grid, 1.0)
    inside = np.abs(grid) <= 1.0 + 1e-9
    origin = land[:, i0, i0]
    # roughness: mean |discrete Laplacian| over the interior grid points, per grid step^2
    lap = (land[:, 2:, 1:-1] + land[:, :-2, 1:-1] + land[:, 1:-1, 2:] + land[:, 1:-1, :-2]
           - 4 * land[:, 1:-1, 1:-1]) if land.shape[1] > 2 else np.zeros((land.shape[0], 1, 1))
    q = lambda p: np.percentile(traj, p, axis=0).round(5).tolist()
    return {
        "trajectory": {"mean": traj.mean(0).round(5).tolist(), "std": traj.std(0).round(5).tolist(),
                       "q25": q(25), "median": q(50), "q75": q(75),
                       "start": _stats(traj[:, 0]), "end": _stats(traj[:, -1]),
                       "max": _stats(traj.max(1)),
                       "rise": _stats(traj[:, -1] - traj[:, 0]),
                       # iterations until half of the image's total rise (its climb speed)
                       "half_rise_iteration": _stats(np.argmax(
                           traj - traj[:, :1] >= 0.5 * (traj.max(1, keepdims=True)
                                                        - traj[:, :1]), axis=1))},
        "landscape": {"mean": land.mean(0).round(5).tolist(),
                      "origin": _stats(origin),
                      "at_adversarial_eps": _stats(land[:, i1, i0]),
                      "at_random_eps": _stats(land[:, i0, i1]),
                      "adversarial_rise": _stats(land[:, i1, i0] - origin),
                      "random_rise": _stats(land[:, i0, i1] - origin),
                      "max_in_eps_box": _stats(land[:, inside][:, :, inside].max((1, 2))),
                      "max_on_grid": _stats(land.max((1, 2))),
                      "roughness": _stats(np.abs(lap).mean((1, 2))),
                      # the same over the image's loss range on the grid (scale-free)
                      "roughness_relative": _stats(np.abs(lap).mean((1, 2)) / np.maximum(
                          land.max((1, 2)) - land.min((1, 2)), 1e-12))},
        "accuracy": {"clean": float(np.mean(per["clean_correct"])),
                     "adversarial": float(np.mean(per["adv_correct"]))},
        "attack": {"mean_linf": float(np.mean(per["adv_linf"])),
                   "mean_l2": float(np.mean(per["adv_l2"]))},
    }


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_landscapes(path, name: str, units: dict, grid: np.ndarray) -> None:
    """Mean landscape over images: 3-D surfaces (top) and contours (bottom), one column per
    setting, one colour scale."""
    plt = _plt()
    settings = [r for r in RANDOMNESS if r in units]
    means = {r: np.asarray(units[r]["landscape"], np.float64).mean(0) for r in settings}
    lo = min(m.min() for m in means.values())
    hi = max(m.max() for m in means.values())
    a, b = np.meshgrid(grid, grid, indexing="ij")
    fig = plt.figure(figsize=(5 * len(settings), 8.5))
    levels = np.linspace(lo, hi, 21)
    for j, r in enumerate(settings):
        ax = fig.add_subplot(2, len(settings), j + 1, projection="3d")
        ax.plot_surface(a, b, means[r], cmap="viridis", vmin=lo, vmax=hi, linewidth=0)
        ax.set_zlim(lo, hi)
        ax.set_xlabel("adversarial (eps)")
        ax.set_ylabel("random (eps)")
        ax.set_zlabel("CE loss")
        ax.set_title(f"{name}: {LABELS[r]}")
        ax2 = fig.add_subplot(2, len(settings), len(settings) + j + 1)
        cs = ax2.contourf(a, b, means[r], levels=levels, cmap="viridis")
        ax2.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], "w--", lw=1)
        ax2.plot([1], [0], "r*", ms=10)
        ax2.set_xlabel("adversarial direction (eps units)")
        ax2.set_ylabel("random direction (eps units)")
        ax2.set_aspect("equal")
        fig.colorbar(cs, ax=ax2, shrink=0.8)
    fig.suptitle(f"{name}: mean CE loss around clean images (dashed: the eps-ball slice, "
                 f"star: x_adv direction at eps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(path, name: str, units: dict, grid: np.ndarray, index, num: int = 4) -> None:
    """The first ``num`` images' own landscapes (contours), one row per setting."""
    plt = _plt()
    settings = [r for r in RANDOMNESS if r in units]
    num = min(num, len(index))
    fig, axes = plt.subplots(len(settings), num, figsize=(3.0 * num, 2.9 * len(settings)),
                             squeeze=False, constrained_layout=True)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    for j in range(num):
        hi = max(np.asarray(units[r]["landscape"])[j].max() for r in settings)
        levels = np.linspace(0.0, max(hi, 1e-6), 16)
        for i, r in enumerate(settings):
            ax = axes[i, j]
            cs = ax.contourf(a, b, np.asarray(units[r]["landscape"])[j], levels=levels,
                             cmap="viridis")
            ax.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], "w--", lw=1)
            ax.set_aspect("equal")
            ax.set_title(f"#{int(index[j])}, {LABELS[r]}", fontsize=8)
            if j == 0:
                ax.set_ylabel("random (eps units)")
            if i == len(settings) - 1:
                ax.set_xlabel("adversarial (eps units)")
        fig.colorbar(cs, ax=axes[:, j], location="bottom", shrink=0.8, ticks=levels[::5],
                     format="%.1f", label="CE loss")
    fig.suptitle(f"{name}: CE loss around single images (each setting along its own attack "
                 f"direction)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_slices(path, units: dict, grid: np.ndarray) -> None:
    """Each model's landscape along the adversarial axis (b = 0) and the random axis (a = 0)."""
    plt = _plt()
    names = list(units)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    i0 = _at(grid, 0.0)
    for ax, name in zip(axes[0], names, strict=True):
        for c, r in enumerate(r for r in RANDOMNESS if r in units[name]):
            land = np.asarray(units[name][r]["landscape"], np.float64)
            ax.plot(grid, land[:, :, i0].mean(0), "-", color=f"C{c}",
                    label=f"{LABELS[r]}, adversarial")
            ax.plot(grid, land[:, i0, :].mean(0), ":", color=f"C{c}",
                    label=f"{LABELS[r]}, random")
        ax.axvspan(-1, 1, color="grey", alpha=0.1)
        ax.set_xlabel("step (eps units)")
        ax.set_title(name)
    axes[0, 0].set_ylabel("mean CE loss")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectories(path, units: dict) -> None:
    """Loss per PGD iteration, mean over images with the interquartile band, per model."""
    plt = _plt()
    names = list(units)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        for c, r in enumerate(r for r in RANDOMNESS if r in units[name]):
            traj = np.asarray(units[name][r]["trajectory"], np.float64)
            it = np.arange(traj.shape[1])
            ax.plot(it, traj.mean(0), color=f"C{c}", label=LABELS[r])
            ax.fill_between(it, np.percentile(traj, 25, 0), np.percentile(traj, 75, 0),
                            color=f"C{c}", alpha=0.2)
        ax.set_xlabel("PGD iteration")
        ax.set_title(name)
    axes[0, 0].set_ylabel("CE loss at the iterate")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _complete(store, n: int) -> bool:
    covered = np.zeros(n, bool)
    for s, e in store.finished():
        covered[s:min(e, n)] = True
    return bool(covered.all())


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    from jaxrob.evaluation import ChunkStore, run_chunks
    from jaxrob.purify import DefendedModel

    s = check_study(config.study)
    models = check_models(config)
    mesh = _common.get_mesh(config.mesh)
    _common.check_batch_size(s["batch_size"], mesh, "study.batch_size")
    for _, rc in models:  # every unit's attack builds before any work
        for r in s["randomness"]:
            _unit_attack(rc, r, s)
    timer, workdir, _ = _common.begin(config, workdir)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    fast = bool(config.fast_vjp)
    classifier, clf_info = None, None
    data = {"x": np.asarray(test.images, np.float32),
            "y": np.asarray(test.labels).astype(np.int32), "index": np.asarray(test.indices)}
    key = jr.key(int(config.seed))
    grid = _grid(s)
    device = {f: s[f] for f in _DEVICE_FIELDS}

    units, summary, skipped, timing, arrays = {}, {}, [], {}, {}
    for name, rc in models:
        if rc.ddpm.source == "export":
            path = _common.resolve_path(rc.ddpm.path, base=_common.REPO_ROOT)
            if not path.exists():
                if not s["skip_missing"]:
                    raise FileNotFoundError(f"models[{name!r}]: no export at {path}")
                logging.warning("model %s: no export at %s, skipped", name, path)
                skipped.append({"name": name, "path": str(path)})
                continue
        defended, ddpm_info = None, None
        for r in s["randomness"]:
            attack_cfg, attack = _unit_attack(rc, r, s)
            fingerprint = {"model": name, "randomness": r, "study": device,
                           "ddpm": _common.to_plain(rc.ddpm),
                           "purifier": _common.to_plain(rc.purifier),
                           "classifier": _common.to_plain(rc.classifier),
                           "attack": _common.to_plain(attack_cfg), "seed": int(config.seed),
                           "data": _common.to_plain(config.data), "keys": _KEYS}
            store = ChunkStore(workdir / "units" / f"{name}_{r}", fingerprint=fingerprint)
            if defended is None and not _complete(store, len(test)):
                if classifier is None:
                    classifier, clf_info = _common.load_classifier(config.classifier,
                                                                   config.data, fast_vjp=fast)
                ddpm, ddpm_info = _common.load_ddpm(rc.ddpm, tuple(test.image_shape),
                                                    fast_vjp=fast)
                defended = DefendedModel(classifier, _common.make_purifier(rc.purifier, ddpm))
            run_ = run_chunks(
                _chunk, data, key=key,
                args=(defended, attack, device, r, jnp.asarray(float(attack_cfg.eps))),
                batch_size=s["batch_size"], store=store, mesh=mesh,
                desc=f"landscape {name} {r}",
                log=lambda a, b, out: logging.info(
                    "chunk [%d, %d): final loss %.3f", a, b,
                    float(np.mean(out["trajectory"][:, -1]))))
            per = run_.records
            units.setdefault(name, {})[r] = per
            summary.setdefault(name, {})[r] = summarize_unit(per, grid)
            summary[name][r]["attack"]["config"] = _common.to_plain(attack_cfg)
            timing[f"{name}_{r}"] = {"compute_s": run_.total_s, "this_run_s": run_.wall_s,
                                     "chunks_run": run_.chunks_run,
                                     "chunks_total": run_.chunks_total}
            for k in ("trajectory", "landscape", "clean_correct", "adv_correct", "adv_linf",
                      "adv_l2"):
                arrays[f"{name}__{r}__{k}"] = per[k]
            logging.info("%s %s: trajectory %.3f -> %.3f, landscape origin %.3f, max in the "
                         "eps-box %.3f, robust accuracy %.3f", name, r,
                         summary[name][r]["trajectory"]["start"]["mean"],
                         summary[name][r]["trajectory"]["end"]["mean"],
                         summary[name][r]["landscape"]["origin"]["mean"],
                         summary[name][r]["landscape"]["max_in_eps_box"]["mean"],
                         summary[name][r]["accuracy"]["adversarial"])
        if ddpm_info is not None:
            summary[name]["ddpm"] = ddpm_info
        summary[name]["ddpm_config"] = {"source": rc.ddpm.source, "path": rc.ddpm.get("path")}
    if not units:
        raise ValueError("models: no model to study (every export is missing)")

    _common.save_npz(workdir / "landscape.npz", index=data["index"], label=data["y"],
                     grid=grid, **arrays)
    figures = []
    for name in units:
        p = workdir / f"landscape_{name}.png"
        plot_landscapes(p, name, units[name], grid)
        figures.append(p.name)
    first = next(iter(units))
    plot_examples(workdir / f"examples_{first}.png", first, units[first], grid, data["index"])
    figures.append(f"examples_{first}.png")
    plot_slices(workdir / "slices.png", units, grid)
    plot_trajectories(workdir / "trajectories.png", units)
    figures += ["slices.png", "trajectories.png"]
    results = {"summary": summary, "grid_eps_units": grid.tolist(),
               "study": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
               "purifier": _common.to_plain(config.purifier),
               "classifier": clf_info or _common.to_plain(config.classifier),
               "keys": _KEYS, "paper": PAPER, "skipped": skipped, "units": timing,
               "compute_s": float(sum(t["compute_s"] for t in timing.values())),
               "chunks_run": int(sum(t["chunks_run"] for t in timing.values())),
               "figures": figures, "num_images": len(test), "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
