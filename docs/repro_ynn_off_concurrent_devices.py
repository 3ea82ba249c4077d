"""Reproduce the XLA:CPU fault of docs/known_faults.md: with YNNPACK fusions off, two host
devices executing at the same time return wrong values.

    python docs/repro_ynn_off_concurrent_devices.py              # YNN off: wrong values
    python docs/repro_ynn_off_concurrent_devices.py --ynn no_conv   # jaxrob's setting: none

No sharding and no collective is involved: one ``jax.jit`` of jaxrob's per-chunk computation
(``robust_scores``: EoT-PGD on DDPM purification with BPDA gradients, then worst-of-10 scoring,
the ``ddpm_bpda`` row of configs/digits_robust.py) on 8 test digits, placed on device 0 for
examples 48..55 and on device 1 for 56..63. The two calls are run one after the other (the
reference), then dispatched together so that they execute concurrently. About 2.5 minutes on
the 2-core CPU (compilation for each device), jaxlib 0.10.2. ``EXTRA_XLA_FLAGS`` is appended to
the script's XLA_FLAGS (checked 2026-12-01: the test suite's compile flags,
``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``, with
``--ynn no_conv``: 0 of 6 concurrent executions differ).
"""

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = {"off": "--xla_cpu_experimental_ynn_fusion_type=",
         "no_conv": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce", "all": ""}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ynn", choices=list(FLAGS), default="off")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    # set before JAX starts; deliberately not through jaxrob.parallel.configure_cpu, which
    # refuses "off" on several devices
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {FLAGS[args.ynn]} " + os.environ.get("EXTRA_XLA_FLAGS", "")
    sys.path.insert(0, str(REPO))

    import jax
    import jax.random as jr
    import numpy as np

    import jaxrob.diffusion as jd
    from jaxrob.attacks import pgd
    from jaxrob.checkpoint import load_params
    from jaxrob.data import load_dataset
    from jaxrob.evaluation import robust_scores
    from jaxrob.models import MODELS, unet_from_config
    from jaxrob.purify import diffpure, purified_logits

    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}", flush=True)
    ddpm_vars, meta = load_params(REPO / "checkpoints" / "digits_ddpm")
    unet = unet_from_config(meta["model"]["config"], fast_vjp=True,
                            **{k: v for k, v in meta["model"]["overrides"].items()
                               if v is not None})
    d = meta["diffusion"]
    schedule = jd.linear_schedule(d["num_steps"], beta_start=d["beta_start"],
                                  beta_end=d["beta_end"])
    clf_vars, cmeta = load_params(REPO / "checkpoints" / "digits_classifier")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cmeta["model"]["kwargs"].items()}
    clf = MODELS[cmeta["model"]["name"]](num_classes=cmeta["num_classes"], fast_vjp=True, **kw)
    purifier = diffpure(lambda x, s: unet.apply(ddpm_vars, x, s, train=False), schedule,
                        t_star=0.1, num_steps=10, gradient="bpda")
    defended = purified_logits(lambda x, _key: clf.apply(clf_vars, x, train=False), purifier)

    def attack(model, x, y, key):
        return pgd(model, x, y, key, eps=0.2, num_steps=10, loss="ce", eot_samples=4)

    def chunk(x, y, idx, key):
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(idx)
        return robust_scores(defended, attack, x, y, keys, protocols=("one_shot", "worst_of@10"))

    f = jax.jit(chunk)
    ds = load_dataset("digits", "test[:64]")
    images, labels = np.asarray(ds.images, np.float32), np.asarray(ds.labels, np.int32)
    devices = jax.devices()

    def inputs(start, device):
        s = slice(start, start + 8)
        return [jax.device_put(a, device) for a in
                (images[s], labels[s], np.arange(start, start + 8, dtype=np.uint32), jr.key(0))]

    calls = [(48, inputs(48, devices[0])), (56, inputs(56, devices[1]))]
    ref = [jax.tree.map(np.asarray, jax.block_until_ready(f(*a))) for _, a in calls]  # one by one
    wrong_runs = 0
    for rep in range(args.reps):
        outs = [f(*a) for _, a in calls]  # dispatched together: the devices run concurrently
        for (start, _), out, r in zip(calls, outs, ref, strict=True):
            out = jax.tree.map(np.asarray, out)
            bad = {k: (np.nonzero((out[k] != r[k]).reshape(8, -1).any(1))[0] + start).tolist()
                   for k in ("x_adv", "pred_clean", "pred_adv")}
            if any(bad.values()):
                wrong_runs += 1
                dx = float(np.abs(out["x_adv"] - r["x_adv"]).max())
                print(f"concurrent run {rep}, examples {start}..{start + 7}: differ from the "
                      f"sequential run at {bad} (max |x_adv diff| {dx:.3f})", flush=True)
    print(f"{wrong_runs} of {2 * args.reps} concurrent executions differ from sequential ones "
          f"(YNN {args.ynn})")
    return 1 if wrong_runs else 0


if __name__ == "__main__":
    sys.exit(main())
