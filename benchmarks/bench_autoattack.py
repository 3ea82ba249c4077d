"""AutoAttack standard (Linf 8/255) on akamaster's CIFAR-10 ResNet-20: jaxrob vs the original.

    nice -n 19 python benchmarks/bench_autoattack.py \\
        --reference-path /work/ext/auto-attack --resnet-path /work/ext/pytorch_resnet_cifar10
    # --n 200 (default 1000: the lossless CIFAR-10 test images 0..999); --smoke (16 images,
    # 5 iterations, 50 Square queries: a check that the script works, numbers mean nothing)

Both sides attack the same weights (``resnet20-12fca82f``: jaxrob reads the ``.npz``, PyTorch
the upstream ``.th``) on the same images, in one process, one after the other (``--order``):

* jaxrob: :func:`jaxrob.attacks.autoattack` (``version="standard"``, batch 250) on one XLA:CPU
  host device (its thread pool spans the machine's cores), the model with the fast conv VJPs
  as ``experiments/robust_eval.py`` runs it;
* the original: fra31/auto-attack's ``AutoAttack(..., version="standard", seed=0)``
  ``run_standard_evaluation(bs=250)``, imported from ``--reference-path`` (a checkout of
  github.com/fra31/auto-attack, not a dependency of jaxrob), on akamaster's own ``resnet.py``
  (``--resnet-path``, a checkout of github.com/akamaster/pytorch_resnet_cifar10) behind the
  training normalisation; ``torch.set_num_threads(--threads)``, default ``os.cpu_count()``.

Recorded: the wall time and the process CPU time of each (jaxrob's wall time with compilation
included, and with it excluded: the wall time minus the tracing, lowering and XLA compile
durations that ``jax.monitoring`` reports), ``ratio = torch_wall / jax_wall`` (> 1: jaxrob
faster), clean and robust accuracy of each and the running robust accuracy after each
component (APGD-CE, APGD-T, FAB-T, Square), the per-example agreement (clean prediction,
robust flag, which component broke the example), the logits' agreement on the clean images,
and the machine's load (``os.getloadavg``) around each side. The original does not return its
per-component flags: a wrapper around its ``EvaluationState.add_run_attack`` (called once
after each component) copies the robust flags.

Output: ``benchmarks/results/bench_autoattack_<n|smoke>.json`` (or ``--out``) and a ``.txt``
table next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WEIGHTS = "pretrained_cifar10_resnet_akamaster/resnet20-12fca82f"
# akamaster's training normalisation (trainer.py), the same constants jaxrob's CifarResNet has
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
SMOKE = {"n": 16, "n_iter": 5, "n_queries": 50}
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                   "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _check_checkout(path, flag: str, marker: str, what: str) -> pathlib.Path:
    """``path`` as a directory holding ``marker``, else a ValueError naming ``flag``."""
    if path is None:
        raise ValueError(f"{flag}: expected the path of a checkout of {what}, got none")
    p = pathlib.Path(path).expanduser().resolve()
    if not (p / marker).is_file():
        raise ValueError(f"{flag}: expected a checkout of {what} (with {marker}) at {p}; "
                         f"not found")
    return p


def _data_dir(arg) -> pathlib.Path:
    if arg:
        return pathlib.Path(arg)
    env = os.environ.get("JAXROB_DATA_DIR")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "datasets"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-path", help="checkout of github.com/fra31/auto-attack (the "
                   "folder holding autoattack/); put on sys.path")
    p.add_argument("--resnet-path", help="checkout of github.com/akamaster/"
                   "pytorch_resnet_cifar10 (the folder holding resnet.py)")
    p.add_argument("--n", type=int, default=1000, help="test images 0..n-1 (at most 1000)")
    p.add_argument("--smoke", action="store_true",
                   help=f"{SMOKE['n']} images, {SMOKE['n_iter']} iterations, "
                        f"{SMOKE['n_queries']} Square queries")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: os.cpu_count(), the cores XLA:CPU's "
                        "thread pool uses)")
    p.add_argument("--order", choices=("jax,torch", "torch,jax"), default="jax,torch")
    p.add_argument("--sides", choices=("both", "jax", "torch"), default="both",
                   help="run one side only (no ratio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="default: $JAXROB_DATA_DIR, else ../shared/datasets")
    p.add_argument("--out", help="JSON path (default benchmarks/results/"
                   "bench_autoattack_<n|smoke>.json)")
    a = p.parse_args(argv)
    if a.smoke:
        a.n = SMOKE["n"]
    a.n_iter = SMOKE["n_iter"] if a.smoke else 100
    a.n_queries = SMOKE["n_queries"] if a.smoke else 5000
    if not 1 <= a.n <= 1000:
        raise ValueError(f"--n: expected 1..1000 (the lossless test images), got {a.n}")
    if a.threads < 1 or a.batch_size < 1:
        raise ValueError("--threads, --batch-size: expected >= 1")
    if a.sides != "jax":
        a.reference_path = _check_checkout(a.reference_path, "--reference-path",
                                           "autoattack/autoattack.py",
                                           "github.com/fra31/auto-attack")
        a.resnet_path = _check_checkout(a.resnet_path, "--resnet-path", "resnet.py",
                                        "github.com/akamaster/pytorch_resnet_cifar10")
    return a


# ----------------------------------------------------------------------------------- jaxrob
class _CompileClock:
    """Sums the tracing / lowering / compile durations JAX reports while active."""

    def __init__(self):
        import jax.monitoring

        self.total = 0.0
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_):
        if self.active and event in _COMPILE_EVENTS:
            self.total += float(duration)
            self.count += event == _COMPILE_EVENTS[0]


def run_jax(args, x, y, clock) -> dict:
    import jax
    import jax.random as jr

    from jaxrob.attacks import autoattack
    from jaxrob.models import Classifier, load_akamaster_resnet

    module, variables = load_akamaster_resnet(_data_dir(args.data_dir) / f"{WEIGHTS}.npz")
    model = Classifier(module, variables).with_fast_vjp(True)
    logits = np.asarray(jax.jit(model)(x))
    load0 = _load()
    clock.total, clock.count, clock.active = 0.0, 0, True
    t0, c0 = time.perf_counter(), time.process_time()
    r = autoattack(model, x, y, jr.key(args.seed), eps=args.eps, norm="linf",
                   version="standard", n_iter=args.n_iter, n_queries=args.n_queries,
                   batch_size=args.batch_size, verbose=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    clock.active = False
    stages = r.stages
    robust_after = {}
    for j, st in enumerate(stages):  # flags after each stage, from broken_by
        robust_after[st] = (r.robust | (r.broken_by > j)).tolist()
    return {
        "wall_s": wall, "cpu_s": cpu, "compile_s": clock.total, "compiles": clock.count,
        "wall_s_excl_compile": wall - clock.total, "load_before": load0, "load_after": _load(),
        "accuracy": r.accuracy, "robust_accuracy": float(r.robust.mean()),
        "final_accuracy": r.final_accuracy, "consistent": r.consistent,
        "max_perturbation": r.max_perturbation, "square_unreliable": r.square_unreliable,
        "looks_randomised": r.looks_randomised, "stages": list(stages),
        "robust_after": robust_after, "clean_logits": logits,
        "x_adv_max_linf": float(np.abs(r.x_adv - x).max()),
        "x_adv_range": [float(r.x_adv.min()), float(r.x_adv.max())],
    }


# ----------------------------------------------------------------------------------- torch
def run_torch(args, x, y) -> dict:
    import torch

    sys.path.insert(0, str(args.reference_path))
    sys.path.insert(0, str(args.resnet_path))
    import resnet as aka_resnet
    from autoattack import AutoAttack
    from autoattack import state as aa_state

    torch.set_num_threads(int(args.threads))
    sd = torch.load(_data_dir(args.data_dir) / f"{WEIGHTS}.th", map_location="cpu",
                    weights_only=True)["state_dict"]
    net = aka_resnet.resnet20()
    net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})

    class Normalized(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, v):
            return self.inner((v - self.mean) / self.std)

    model = Normalized(net).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))
    with torch.no_grad():
        logits = model(xt).numpy()

    snapshots = {}
    original = aa_state.EvaluationState.add_run_attack

    def recording(self, attack):  # called once after each component, flags already updated
        snapshots[attack] = self.robust_flags.clone().numpy().tolist()
        return original(self, attack)

    adversary = AutoAttack(model, norm="Linf", eps=args.eps, version="standard",
                           seed=args.seed, device="cpu")
    if args.smoke:  # fewer iterations; APGD derives its schedule from n_iter in __init__
        for a in (adversary.apgd, adversary.apgd_targeted):
            k = args.n_iter
            a.n_iter, a.n_iter_2 = k, max(int(0.22 * k), 1)
            a.n_iter_min, a.size_decr = max(int(0.06 * k), 1), max(int(0.03 * k), 1)
        adversary.fab.n_iter = args.n_iter
        adversary.square.n_queries = args.n_queries
    load0 = _load()
    aa_state.EvaluationState.add_run_attack = recording
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        x_adv, y_adv = adversary.run_standard_evaluation(xt, yt, bs=args.batch_size,
                                                         return_labels=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        aa_state.EvaluationState.add_run_attack = original
    x_adv = x_adv.numpy().transpose(0, 2, 3, 1)
    clean = logits.argmax(1) == y
    robust = (y_adv.numpy() == y)
    robust_after = {"clean": clean.tolist()}
    last = clean
    for st in COMPONENTS:  # a component skipped (nothing left robust) keeps the flags
        last = np.asarray(snapshots.get(st, last), bool)
        robust_after[st] = last.tolist()
    return {
        "wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": _load(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "accuracy": {st: float(np.mean(v)) for st, v in robust_after.items()},
        "robust_accuracy": float(robust.mean()), "stages": ["clean", *COMPONENTS],
        "robust_after": robust_after, "clean_logits": logits,
        "x_adv_max_linf": float(np.abs(x_adv - x).max()),
        "x_adv_range": [float(x_adv.min()), float(x_adv.max())],
        "robust_final": robust.tolist(),
    }


# ----------------------------------------------------------------------------------- compare
def _broken_by(robust_after: dict, stages) -> np.ndarray:
    """Index into stages of the stage that broke each example, -1 where robust at the end."""
    flags = np.stack([np.asarray(robust_after[s], bool) for s in stages])  # (S, N)
    out = np.full(flags.shape[1], -1)
    for j in range(len(stages) - 1, -1, -1):
        out[~flags[j]] = j
    return out


def compare(jx: dict, tc: dict, y: np.ndarray) -> dict:
    stages = ["clean", *COMPONENTS]
    bj, bt = _broken_by(jx["robust_after"], stages), _broken_by(tc["robust_after"], stages)
    rj, rt = bj == -1, bt == -1
    pj, pt = jx["clean_logits"].argmax(1), tc["clean_logits"].argmax(1)
    diff_ids = np.flatnonzero(rj != rt)
    return {
        "ratio_torch_over_jax": tc["wall_s"] / jx["wall_s"],
        "cpu_ratio_torch_over_jax": (tc["cpu_s"] / jx["cpu_s"]
                                     if jx.get("cpu_s") and tc.get("cpu_s") else None),
        "ratio_torch_over_jax_excl_compile": tc["wall_s"] / jx["wall_s_excl_compile"],
        "robust_accuracy_diff_points": 100 * (jx["robust_accuracy"] - tc["robust_accuracy"]),
        "clean_logits_max_abs_diff": float(np.abs(jx["clean_logits"] - tc["clean_logits"]).max()),
        "clean_prediction_agree": int(np.sum(pj == pt)),
        "robust_agree": int(np.sum(rj == rt)),
        "broken_by_agree": int(np.sum(bj == bt)),
        "robust_disagree_ids": diff_ids.tolist(),
        "robust_disagree_broken_by": {"jax": [stages[b] if b >= 0 else "robust" for b in
                                              bj[diff_ids]],
                                      "torch": [stages[b] if b >= 0 else "robust" for b in
                                                bt[diff_ids]]},
        "broken_by_counts": {
            side: {st: int(np.sum(b == j)) for j, st in enumerate(stages)} | {
                "robust": int(np.sum(b == -1))}
            for side, b in (("jax", bj), ("torch", bt))},
        "n": int(y.size),
    }


def table(res: dict) -> str:
    j, t, c = res["jax"], res["torch"], res.get("compare")
    rows = [f"AutoAttack standard, Linf eps {res['eps']:.5f}, ResNet-20, n={res['n']}"
            f"{' (SMOKE)' if res['smoke'] else ''}", "",
            "| | jaxrob | original (PyTorch) |", "|---|---|---|"]

    def cell(side, f):
        return f(side) if side else "-"

    rows.append("| wall s | " + cell(j, lambda s: f"{s['wall_s']:.1f} (excl. compile "
                                                     f"{s['wall_s_excl_compile']:.1f}, compile "
                                                     f"{s['compile_s']:.1f})")
                + " | " + cell(t, lambda s: f"{s['wall_s']:.1f}") + " |")
    rows.append("| process CPU s | " + cell(j, lambda s: f"{s['cpu_s']:.1f}") + " | "
                + cell(t, lambda s: f"{s['cpu_s']:.1f}") + " |")
    for st in ["clean", *COMPONENTS]:
        rows.append(f"| acc after {st} | "
                    + cell(j, lambda s: f"{100 * s['accuracy'].get(st, float('nan')):.1f}%")
                    + " | " + cell(t, lambda s: f"{100 * s['accuracy'][st]:.1f}%") + " |")
    for k in ("clean", "robust"):
        rows.append(f"| {k} 95% interval | "
                    + cell(j, lambda s: "[{:.1f}, {:.1f}]%".format(
                        *(100 * v for v in s[f"{k}_interval95"])))
                    + " | " + cell(t, lambda s: "[{:.1f}, {:.1f}]%".format(
                        *(100 * v for v in s[f"{k}_interval95"]))) + " |")
    rows.append("| load avg before / after | " + cell(j, lambda s: f"{s['load_before'][0]} / "
                                                     f"{s['load_after'][0]}")
                + " | " + cell(t, lambda s: f"{s['load_before'][0]} / {s['load_after'][0]}")
                + " |")
    if c:
        rows += ["", f"ratio torch_wall / jax_wall: {c['ratio_torch_over_jax']:.2f} "
                     f"(compile excluded: {c['ratio_torch_over_jax_excl_compile']:.2f})",
                 f"robust accuracy jax - torch: {c['robust_accuracy_diff_points']:+.1f} points",
                 f"per-example agreement: clean prediction {c['clean_prediction_agree']}/{c['n']}"
                 f", robust flag {c['robust_agree']}/{c['n']}, breaking component "
                 f"{c['broken_by_agree']}/{c['n']}; clean logits max |diff| "
                 f"{c['clean_logits_max_abs_diff']:.2e}",
                 f"broken by (jax): {c['broken_by_counts']['jax']}",
                 f"broken by (torch): {c['broken_by_counts']['torch']}"]
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    import jaxrob
    from jaxrob.data import load_dataset
    from jaxrob.parallel import configure_cpu

    configure_cpu(1)
    clock = _CompileClock()
    ds = load_dataset("cifar10", f"test[:{args.n}]", data_dir=_data_dir(args.data_dir))
    x, y = np.asarray(ds.images, np.float32), np.asarray(ds.labels)
    res = {"benchmark": "bench_autoattack", "n": int(args.n), "smoke": bool(args.smoke),
           "eps": args.eps, "norm": "linf", "version": "standard", "n_iter": args.n_iter,
           "n_queries": args.n_queries, "batch_size": args.batch_size, "seed": args.seed,
           "order": args.order, "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "env": {"jax": jax.__version__, "jaxrob": jaxrob.__file__,
                   "devices": [str(d) for d in jax.devices()],
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
                   "platform": platform.platform(), "python": platform.python_version()},
           "jax": None, "torch": None}
    sides = args.order.split(",") if args.sides == "both" else [args.sides]
    for side in sides:
        log(f"--- {side} (load {_load()})")
        if side == "jax":
            res["jax"] = run_jax(args, x, y, clock)
        else:
            res["torch"] = run_torch(args, x, y)
            import torch

            res["env"]["torch"] = torch.__version__
            res["env"]["reference_path"] = str(args.reference_path)
            res["env"]["resnet_path"] = str(args.resnet_path)
    from jaxrob.evaluation import wilson_interval

    for side in ("jax", "torch"):
        if res[side]:  # 95 % Wilson intervals of the clean and the robust accuracy
            for k, v in (("clean", res[side]["accuracy"]["clean"]),
                         ("robust", res[side]["robust_accuracy"])):
                res[side][f"{k}_interval95"] = list(wilson_interval(round(v * args.n), args.n))
    if res["jax"] and res["torch"]:
        res["compare"] = compare(res["jax"], res["torch"], y)
    for side in ("jax", "torch"):
        if res[side]:
            res[side]["clean_logits"] = None  # compared above; not worth the JSON's size
    out = pathlib.Path(args.out) if args.out else (
        HERE / "results" / f"bench_autoattack_{'smoke' if args.smoke else args.n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    txt = table(res)
    out.with_suffix(".txt").write_text(txt + "\n")
    print(txt, flush=True)
    return res


if __name__ == "__main__":
    main()
