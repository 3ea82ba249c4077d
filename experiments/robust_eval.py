"""Robust accuracy of DiffPure-style purification + classifier under an adaptive attack.

    python experiments/robust_eval.py --config configs/mnist_robust.py --workdir runs/mnist_robust

One run evaluates the settings listed in ``config.rows`` (each a dict of overrides of the base
config: purifier, attack, randomness) on the same images, one sub-workdir per row, and writes
``results.json`` (per row: clean and robust accuracy with 95% intervals under every protocol
of ``config.eval.protocols``, the full manifest of DESIGN.md, NFEs, wall time) and
``table.md``. Per-example records are kept under ``<row>/chunks/`` (resumable: kill the run,
rerun the same command, finished chunks are kept and nothing is counted twice) and as
``<row>/per_example.npz``.

Randomness modes: ``stochastic`` (fresh purifier noise in every attack step and in scoring)
and ``fixed`` (one purifier key per image shared by attack and scoring: the deterministic
white-box setting). Gradient methods: ``exact`` (scan + remat through every step), ``bpda``
(identity backward), ``surrogate`` (gradient of a shorter chain).
"""

from __future__ import annotations

import functools
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.random as jr
import numpy as np
from absl import logging
from ml_collections import config_dict

from experiments import _common
from experiments.eval_classifier import load_classifier

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_robust.py")
DDPM_SOURCES = ("export", "random", "diffusers")
ATTACKS = ("none", "fgsm", "pgd", "apgd")


def load_ddpm(ddpm_config, image_shape):
    """``(unet, variables, schedule, description)`` for ``config.ddpm``.

    Sources: ``export`` (a jaxrob export directory, model and schedule from its metadata),
    ``random`` (``ddpm.model`` randomly initialised: smoke tests, timing), ``diffusers`` (a
    diffusers ``UNet2DModel`` state dict file, e.g. google/ddpm-cifar10-32, with
    ``ddpm.model.config`` naming the UNet configuration).
    """
    from jaxrob.models import load_state_dict_file, unet_from_diffusers_state_dict

    source = ddpm_config.source
    if source == "export":
        from jaxrob.checkpoint import load_params

        path = _common.resolve_path(ddpm_config.path, base=_common.REPO_ROOT)
        variables, meta = load_params(path)
        if meta.get("kind") != "ddpm":
            raise ValueError(f"ddpm.path: {path} holds a {meta.get('kind')!r} export, "
                             "expected a ddpm")
        unet = _common.build_unet(config_dict.ConfigDict(meta["model"]))
        schedule = _common.build_schedule(config_dict.ConfigDict(meta["diffusion"]))
        return unet, variables, schedule, {"source": source, "path": str(path),
                                           "step": meta.get("step"),
                                           "num_params": meta.get("num_params")}
    unet = _common.build_unet(ddpm_config.model)
    schedule = _common.build_schedule(ddpm_config.diffusion)
    if source == "random":
        x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
        variables = jax.jit(unet.init)(jr.key(int(ddpm_config.seed)), x,
                                       jax.ShapeDtypeStruct((1,), np.int32))
        return unet, variables, schedule, {"source": source, "seed": int(ddpm_config.seed)}
    if source == "diffusers":
        path = _common.resolve_path(ddpm_config.path, base=_common.REPO_ROOT)
        variables = unet_from_diffusers_state_dict(load_state_dict_file(path), unet)
        return unet, variables, schedule, {"source": source, "path": str(path)}
    raise ValueError(f"ddpm.source: expected one of {list(DDPM_SOURCES)}, got {source!r}")


def make_attack(attack_config):
    """``attack(model, x, y, key) -> x_adv`` from ``config.attack`` (None for ``"none"``)."""
    from jaxrob import attacks

    a = attack_config
    name = a.name
    if name not in ATTACKS:
        raise ValueError(f"attack.name: expected one of {list(ATTACKS)}, got {name!r}")
    if name == "none":
        return None
    eps = float(a.eps)
    if eps < 0:
        raise ValueError(f"attack.eps: expected >= 0, got {eps}")
    eot_samples, eot_chunk = int(a.eot_samples), a.get("eot_chunk")
    if eot_samples < 1 or (eot_chunk is not None and (eot_chunk < 1 or eot_samples % eot_chunk)):
        raise ValueError(f"attack.eot_chunk: expected a positive divisor of attack.eot_samples="
                         f"{eot_samples}, got {eot_chunk}")
    common = dict(eps=eps, eot_samples=eot_samples, eot_chunk=eot_chunk)
    if name == "fgsm":
        fn = functools.partial(attacks.fgsm, loss=a.loss, **common)
    elif name == "pgd":
        fn = functools.partial(attacks.pgd, loss=a.loss, norm=a.norm, num_steps=int(a.num_steps),
                               step_size=a.get("step_size"), random_start=bool(a.random_start),
                               num_restarts=int(a.num_restarts), **common)
    else:
        fn = functools.partial(attacks.apgd, loss=a.loss, norm=a.norm,
                               num_steps=int(a.num_steps), random_start=bool(a.random_start),
                               num_restarts=int(a.num_restarts), **common)
    return _Attack(fn)


class _Attack:
    """Hashable wrapper (so the evaluation's jit cache sees equal attacks as equal)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, model, x, y, key):
        return self.fn(model, x, y, key).x_adv

    def __eq__(self, other):
        return isinstance(other, _Attack) and (self.fn.func, self.fn.args,
                                               sorted(self.fn.keywords.items())) == (
            other.fn.func, other.fn.args, sorted(other.fn.keywords.items()))

    def __hash__(self):
        return hash((self.fn.func, tuple(sorted(self.fn.keywords.items()))))


def make_purifier(purifier_config, eps_fn, schedule):
    """A :class:`jaxrob.purify.Purifier` from ``config.purifier`` (None when disabled)."""
    from jaxrob.purify import diffpure, multistage

    p = purifier_config
    if not p.enabled:
        return None
    kw = dict(sampler=p.sampler, gradient=p.gradient, surrogate_steps=p.get("surrogate_steps"),
              variance=p.variance, eta=float(p.eta), remat=bool(p.remat))
    stages = p.get("stages")
    if stages:
        return multistage(eps_fn, schedule, [tuple(s) for s in stages], **kw)
    return diffpure(eps_fn, schedule, t_star=float(p.t_star), num_steps=int(p.num_steps), **kw)


def start_study(config, workdir, what: str, *, single_stage: bool = False,
                fast_vjp: bool = False):
    """Common start of the purifier studies: workdir, config.json, test split, DDPM, purifier.

    Returns ``(timer, workdir, test, purifier, ddpm_info)``; ``what`` names the study in the
    error raised when ``config.purifier`` is disabled (or not single-stage when required).
    ``fast_vjp``: build the purifier over the UNet's reverse-mode twin (same parameters; for
    studies that differentiate through it in reverse mode only).
    """
    timer = _common.Timer()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.write_json(workdir / "config.json", config)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    unet, variables, schedule, ddpm_info = load_ddpm(config.ddpm, tuple(test.image_shape))
    unet = unet.clone(fast_vjp=True) if fast_vjp else unet
    eps_fn = lambda x, s: unet.apply(variables, x, s, train=False)
    purifier = make_purifier(config.purifier, eps_fn, schedule)
    if purifier is None or (single_stage and len(purifier.stages) != 1):
        kind = "one single-stage purifier" if single_stage else "a purifier"
        raise ValueError(f"purifier: the {what} needs {kind}")
    return timer, workdir, test, purifier, ddpm_info


def write_results(config, workdir: pathlib.Path, results: dict, test) -> dict:
    """Add the manifest (with the images' dataset, split and index range) and write
    ``results.json``; returns ``results``."""
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"], seeds={"seed": int(config.seed)},
        extra={"num_images": len(test), "dataset": test.name, "split": test.split,
               "indices": [int(test.indices[0]), int(test.indices[-1]) + 1]})
    _common.write_json(workdir / "results.json", results)
    return results


def row_config(config, overrides) -> config_dict.ConfigDict:
    """The base config with one row's dotted overrides applied (``{"purifier.t_star": 0.3}``)."""
    c = config.copy_and_resolve_references()
    for key, value in dict(overrides).items():
        if key == "name":
            continue
        *path, leaf = key.split(".")
        node = c
        for p in path:
            if p not in node:
                raise ValueError(f"rows: unknown config field {key!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"rows: unknown config field {key!r}")
        node[leaf] = value
    return c


def _defended(logits_fn, purifier):
    from jaxrob.purify import purified_logits

    if purifier is None:
        return _Undefended(logits_fn)
    return purified_logits(logits_fn, purifier)


class _Undefended:
    def __init__(self, logits_fn):
        self.logits_fn = logits_fn

    def __call__(self, x, keys):
        return self.logits_fn(x)


def run_row(config, name: str, workdir: pathlib.Path, models, test, mesh) -> dict:
    """Evaluate one row (resumable) and return its results entry."""
    from jaxrob.evaluation import ChunkStore, evaluate_robustness

    unet_fast, ddpm_vars, schedule, logits_fn = models
    eps_fn = lambda x, s: unet_fast.apply(ddpm_vars, x, s, train=False)
    purifier = make_purifier(config.purifier, eps_fn, schedule)
    attack = make_attack(config.attack)
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
    store = ChunkStore(workdir / "chunks", fingerprint=fingerprint)
    timer = _common.Timer()
    res = evaluate_robustness(
        _defended(logits_fn, purifier), attack, test.images, test.labels, test.indices,
        key=jr.key(int(config.seed)), protocols=protocols, randomness=config.eval.randomness,
        batch_size=_common.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size"),
        store=store, mesh=mesh, vote_chunk=config.eval.get("vote_chunk"), keep_x_adv=keep_x_adv,
        log=lambda line: logging.info("%s: %s", name, line))
    per = res.pop("per_example")
    _common.save_npz(workdir / "per_example.npz", **per)
    a = config.attack
    n_img = len(test)
    nfe_fwd = purifier.nfe if purifier else 0
    nfe_bwd = purifier.nfe_backward if purifier else 0
    iters = 0 if a.name == "none" else (1 if a.name == "fgsm" else int(a.num_steps))
    restarts = 1 if a.name in ("none", "fgsm") else int(a.num_restarts)
    samples = 1 if config.eval.randomness == "fixed" else max(
        int(p.split("@")[1]) if "@" in p else 1 for p in protocols)
    nfe_attack = (iters + 1) * restarts * int(a.eot_samples) * (nfe_fwd + nfe_bwd) \
        if iters else 0
    entry = {
        "name": name,
        "clean": res["clean"], "adv": res.get("adv"),
        "purifier": purifier.manifest() if purifier else None,
        "attack": _common.to_plain(config.attack),
        "randomness": config.eval.randomness, "protocols": list(protocols),
        "num_images": n_img, "indices": [int(test.indices[0]), int(test.indices[-1]) + 1],
        "nfe": {"per_purification": nfe_fwd, "per_gradient": nfe_bwd,
                "attack_per_image": nfe_attack,
                "scoring_per_image": 2 * samples * nfe_fwd},
        "mean_linf": float(np.mean(per["linf"])) if "linf" in per else None,
        "mean_l2": float(np.mean(per["l2"])) if "l2" in per else None,
        "wall_s": timer(), "eval_wall_s_this_run": res["wall_s"],
        "chunks_run": res["chunks_run"], "chunks_total": res["chunks_total"],
    }
    _common.write_json(workdir / "results.json", entry)
    return entry


def _fmt(summary) -> str:
    if summary is None:
        return "-"
    lo, hi = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(rows, protocols) -> str:
    """A markdown table of the rows (accuracy % with 95% interval)."""
    head = ["row", "purifier", "gradient", "randomness", "attack"]
    head += [f"clean {p}" for p in protocols] + [f"robust {p}" for p in protocols]
    head += ["NFE attack/img", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pur = r["purifier"]
        pdesc = ("none" if pur is None else
                 f"{pur['sampler']} t*={pur['t_star']} {pur['steps']} steps")
        a = r["attack"]
        adesc = ("none" if a["name"] == "none" else
                 f"{a['name']} {a['norm']} eps={a['eps']:g} x{a.get('num_steps', 1)} "
                 f"EoT{a['eot_samples']}")
        cells = [r["name"], pdesc, pur["gradient"] if pur else "-", r["randomness"], adesc]
        cells += [_fmt(r["clean"][p]) for p in protocols]
        cells += [_fmt((r["adv"] or {}).get(p)) for p in protocols]
        cells += [str(r["nfe"]["attack_per_image"]), f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config, workdir) -> dict:
    """Evaluate every row of ``config.rows``; returns (and writes) ``results.json``."""
    from jaxrob.evaluation import check_randomness, parse_protocol

    timer = _common.Timer()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.write_json(workdir / "config.json", config)
    mesh = _common.get_mesh(config.mesh)
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    image_shape = tuple(test.image_shape)
    unet, ddpm_vars, schedule, ddpm_info = load_ddpm(config.ddpm, image_shape)
    # the reverse-mode twins: same parameters, fast conv input-gradients inside lax loops
    fast = bool(config.fast_vjp)
    unet_fast = unet.clone(fast_vjp=fast)
    classifier, clf_vars, clf_info = load_classifier(config.classifier, config.data)
    classifier_fast = classifier.clone(fast_vjp=fast)
    logits_fn = lambda x: classifier_fast.apply(clf_vars, x, train=False)
    models = (unet_fast, ddpm_vars, schedule, logits_fn)

    rows = list(config.rows) or [{"name": "base"}]
    names = [str(r.get("name", f"row{i}")) for i, r in enumerate(rows)]
    if len(set(names)) != len(names):
        raise ValueError(f"rows: names must be unique, got {names}")
    row_configs = [row_config(config, r) for r in rows]  # all overrides checked up front
    for rc in row_configs:
        make_purifier(rc.purifier, lambda x, s: x, schedule)
        make_attack(rc.attack)
        for p in rc.eval.protocols:
            parse_protocol(p)
        check_randomness(rc.eval.randomness)
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
    write_results(config, workdir, results, test)
    logging.info("\n%s", md)
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
