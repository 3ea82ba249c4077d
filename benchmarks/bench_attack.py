"""PGD-EoT through a DiffPure purifier on CPU: jaxrob next to the published PyTorch way of doing it.

Setting (CLI options): MNIST-shaped 28x28x1 inputs, batch 8, a DDPM purifier with t* = 0.1 of a
linear 1000-step schedule run as the full 100-step reverse chain and as a 10-step respaced
chain, EoT = 10, the ``mnist`` UNet config with ch=16 / 4 GroupNorm groups and a ``SmallCNN``
classifier, both randomly initialised (this is a speed benchmark; PyTorch gets the same weights).

What it measures, in this order:

1. Numerics. The PyTorch UNet (``benchmarks/torch_unet.py``, weights copied with
   ``load_jax_params``) must match jaxrob's eps output to 1e-4 (else the run stops). With a
   deterministic DDIM purifier (eta = 0) and the same forward-noise tensor, the purified images
   must agree to 1e-3. The gradients of ``sum CE(classifier(purify(x)))`` are compared too, for
   DDIM and for DDPM with jaxrob's reverse noise handed to PyTorch, and the 2-device jaxrob
   step against the 1-device one (per-example keys make them the same computation).
2. Throughput of one attack iteration (the EoT-averaged input gradient of the purify+classify CE
   loss, a sign step and the projection) in seconds, at both chain lengths. jaxrob: one jitted
   function (``jaxrob.attacks.eot_value_and_grad`` of the CE loss of a
   ``jaxrob.purify.DefendedModel``: a ``jaxrob.models.Classifier`` behind ``diffpure`` of a
   ``jaxrob.models.DiffusionModel``, with per-example keys, the EoT samples vmapped) with
   ``fast_vjp=True`` models, on 1 XLA device and on 2 host devices (``jax.shard_map`` over a
   ``data`` mesh: batch split, params replicated);
   at the short chain also with ``fast_vjp=False`` models (the slow conv VJP in loops). The
   faster JAX setting at the short chain is the one run at the long chain (``--long-settings``).
   PyTorch (``benchmarks/torch_purify.py``): eager, ``torch.utils.checkpoint`` around every UNet
   call, EoT samples one after another, gradient summed over EoT, sign step, projection;
   channels_last, glibc malloc tuning, one warm-up iteration. The calls are interleaved
   (every repetition times one iteration of every implementation, in rotating order) and the
   ratio reported is torch time / jaxrob time (>= 1: jaxrob at least as fast).
3. Memory of one exact-gradient step (EoT 1, batch 8) at the short and the long chain, each in
   a fresh subprocess: jaxrob ``remat=True`` (the default), ``remat=False``, PyTorch without and
   with checkpointing. JAX: ``compiled.memory_analysis().temp_size_in_bytes``; all: peak RSS of
   the process (``ru_maxrss``) and the step's own peak (``VmHWM`` reset just before the step,
   minus the RSS then).

PyTorch threads: ``torch.set_num_threads(2)`` is right on an idle 2-core machine, but when
other processes keep a core busy, OpenMP's spinning threads stall for seconds per UNet call. So
by default (``--torch-threads auto``) the PyTorch worker times a UNet input-gradient with 1 and
with 2 threads and keeps the faster one (both timings are reported).

Run (from the repository root)::

    python benchmarks/bench_attack.py --smoke      # 2/4 steps, EoT 2, tiny UNet: a check
    python benchmarks/bench_attack.py --quick      # 5/20 steps, EoT 4, 2 reps: ~3.5 min
    python benchmarks/bench_attack.py --out /tmp/bench_attack_full.json   # 10/100: ~10 min

(Measured on the 2-core box while another job kept one core busy: --quick 3.3 min, the default
9.7 min, of which the 100-step rows take ~4.5 min and the memory runs ~2 min.)

Timings in ``--out`` JSON (every call, CPU time, the load other processes put on the machine)
and a ``.txt`` copy of the table. Worker processes are this file with ``--jax-setting``,
``--torch-worker`` or ``--mem-worker``; they are not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker processes, timers, result files)

# name -> (XLA host devices, disable YNN fusions)
SETTINGS = {"1dev": (1, False), "2dev": (2, False), "1dev_noynn": (1, True),
            "2dev_noynn": (2, True)}
UNET_TOL = 1e-4      # max |eps_torch - eps_jax|
PURIFY_TOL = 1e-3    # max |purified_torch - purified_jax| (DDIM, same noise)
GRAD_RTOL = 1e-3     # max |g_torch - g_jax| / max |g_jax|
REMAT_TARGET = 1.5   # long/short growth of the remat step's memory
MEM_IMPLS = ("jax_remat", "jax_noremat", "torch_nockpt", "torch_ckpt")
# --smoke: the smallest run of every code path (tiny UNet, 2/4 steps, one JAX setting)
SMOKE = dict(steps="2,4", eot=2, reps=1, slow_reps=1, batch=2, unet_ch=8, settings="2dev",
             mem_steps="2", mem_impls="jax_remat,torch_ckpt")


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
def _jax_modules(cfg, fast_vjp):
    """The Flax UNet and SmallCNN of the benchmark."""
    from jaxrob.models import SmallCNN, unet_from_config

    unet = unet_from_config(cfg, fast_vjp=fast_vjp)
    clf = SmallCNN(features=(32, 64), hidden=128, fast_vjp=fast_vjp)
    return unet, clf


def _jax_load(dir):
    import jax.numpy as jnp
    import numpy as np

    load = lambda n: h.load_tree(os.path.join(dir, n), jnp.asarray)
    with open(os.path.join(dir, "setup.json")) as f:
        meta = json.load(f)
    inp = np.load(os.path.join(dir, "inputs.npz"))
    return meta, load("unet.npz"), load("clf.npz"), inp


def _make_attack_step(unet, clf, *, t_star, steps, eot, eot_chunk, remat, eps, step_size):
    """``step(uvars, cvars, x, x_adv, y, idx, key) -> (x_adv_next, loss_B)``: one iteration."""
    import jax.numpy as jnp

    import jaxrob.diffusion as jd
    from jaxrob.attacks import eot_value_and_grad, loss_from_logits, project
    from jaxrob.models import Classifier, DiffusionModel
    from jaxrob.purify import DefendedModel, diffpure, example_keys

    sched = jd.linear_schedule()

    def step(uvars, cvars, x, x_adv, y, idx, key):
        # the models over this call's variables (jit arguments); the schedule is a constant
        pur = diffpure(DiffusionModel(unet, uvars, sched), t_star=t_star, num_steps=steps,
                       remat=remat)
        defended = DefendedModel(Classifier(clf, cvars), pur)
        # per-example keys (global example index): the result does not depend on the devices
        logits_fn = lambda z, k: defended(z, example_keys(k, idx))
        loss_B, g = eot_value_and_grad(loss_from_logits(logits_fn), x_adv, y, key,
                                       samples=eot, chunk=eot_chunk)
        return project(x_adv + step_size * jnp.sign(g), x, eps, "linf"), loss_B

    return step


class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, no_ynn = SETTINGS[setting]
        super().__init__(setting, n_dev, "off" if no_ynn else "all")

    def prepare(self, dir, cfg, batch, t_star, chain_steps, write):
        """The first worker draws weights/inputs and saves them (and the chains); all load."""
        import flax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import jaxrob.diffusion as jd

        if write:
            unet, clf = _jax_modules(cfg, True)
            size, ch = cfg["image_size"], cfg["in_ch"]
            x = jr.uniform(jr.key(0), (batch, size, size, ch))
            uv = unet.init(jr.key(1), x, jnp.zeros((batch,), jnp.int32))["params"]
            cv = clf.init(jr.key(2), x)
            # non-trivial BatchNorm statistics and affine parameters, so the check means more
            ks = iter(jr.split(jr.key(3), 8))
            cv = flax.core.unfreeze(cv)
            for i in range(2):
                bs, bp = cv["batch_stats"][f"bn{i}"], cv["params"][f"bn{i}"]
                bs["mean"] = 0.1 * jr.normal(next(ks), bs["mean"].shape)
                bs["var"] = jr.uniform(next(ks), bs["var"].shape, minval=0.5, maxval=1.5)
                bp["scale"] = 1.0 + 0.1 * jr.normal(next(ks), bp["scale"].shape)
                bp["bias"] = 0.1 * jr.normal(next(ks), bp["bias"].shape)
            h.save_tree(os.path.join(dir, "unet.npz"), uv)
            h.save_tree(os.path.join(dir, "clf.npz"), cv)
            np.savez(os.path.join(dir, "inputs.npz"), x=np.asarray(x),
                     y=np.arange(batch, dtype=np.int32) % 10)
            sched = jd.linear_schedule()
            for s in chain_steps:
                h.save_fields(os.path.join(dir, f"chain_{s}.npz"), jd.truncated(sched, t_star, s))
            with open(os.path.join(dir, "setup.json"), "w") as f:
                json.dump({"cfg": cfg, "batch": batch, "t_star": t_star,
                           "unet_params": h.count_params(uv),
                           "clf_params": h.count_params(cv["params"])}, f)
        self.meta, self.uv, self.cv, inp = _jax_load(dir)
        self.x, self.y = jnp.asarray(inp["x"]), jnp.asarray(inp["y"])
        return {"unet_params": self.meta["unet_params"], "clf_params": self.meta["clf_params"]}

    def numerics(self, dir, steps_list, grad_steps):
        """Write the JAX side of the checks (compared by the PyTorch worker)."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import jaxrob.diffusion as jd
        from jaxrob.attacks import ce_loss
        from jaxrob.models import Classifier, DiffusionModel
        from jaxrob.purify import diffpure

        t0 = time.perf_counter()
        cfg, t_star = self.meta["cfg"], self.meta["t_star"]
        unet, clf = _jax_modules(cfg, True)
        ddpm = DiffusionModel(unet, {"params": self.uv}, jd.linear_schedule())
        clf = Classifier(clf, self.cv)
        x, y = self.x, self.y
        out = {}
        # 1. UNet eps on a random diffusion-space input and random steps
        xt = jr.normal(jr.key(10), x.shape)
        st = jr.randint(jr.key(11), (x.shape[0],), 0, 1000)
        eps = jax.jit(lambda z, s: ddpm(z, s))(xt, st)
        out["eps"] = dict(xt=xt, steps=st, eps=eps)
        # 2. DDIM eta=0 purification and 3. gradients, one key for the batch: the forward
        # noise is normal(fold_in(key, 0), x.shape), step n's is normal(fold_in(fold_in(key, 1),
        # n)) (jaxrob.purify module docstring) -- handed to PyTorch explicitly.
        key = jr.key(12)
        noise = jr.normal(jr.fold_in(key, 0), x.shape)
        for s in steps_list:
            pur = diffpure(ddpm, t_star=t_star, num_steps=s, sampler="ddim")
            out[f"ddim_{s}"] = dict(noise=noise, out=jax.jit(pur)(x, key))
        for sampler in ("ddim", "ddpm"):
            pur = diffpure(ddpm, t_star=t_star, num_steps=grad_steps, sampler=sampler)
            loss = lambda xx: jnp.sum(ce_loss(clf(pur(xx, key)), y))
            val, g = jax.jit(jax.value_and_grad(loss))(x)
            k_rev = jr.fold_in(key, 1)
            step_noise = jnp.stack([jr.normal(jr.fold_in(k_rev, n), x.shape)
                                    for n in range(grad_steps)])
            out[f"grad_{sampler}_{grad_steps}"] = dict(noise=noise, step_noise=step_noise,
                                                       loss=val, grad=g)
        for name, d in out.items():
            np.savez(os.path.join(dir, f"check_{name}.npz"),
                     **{k: np.asarray(v) for k, v in d.items()})
        return {"files": sorted(out), "seconds": time.perf_counter() - t0}

    def setup(self, name, steps, eot, eot_chunk, fast_vjp, remat, eps, step_size, dir):
        """Compile one attack iteration (timed), run it once (timed), save its output."""
        import jax
        import jax.random as jr
        import numpy as np
        from jax.sharding import PartitionSpec as P

        unet, clf = _jax_modules(self.meta["cfg"], fast_vjp)
        step = _make_attack_step(unet, clf, t_star=self.meta["t_star"], steps=steps, eot=eot,
                                 eot_chunk=eot_chunk, remat=remat, eps=eps, step_size=step_size)
        idx = np.arange(self.x.shape[0], dtype=np.uint32)
        if self.mesh is None:
            fn = jax.jit(step)
            place_d = place_r = jax.device_put
        else:
            # shard_map: each device runs the step on its part of the batch. (A plain jit with
            # NamedSharding replicated the work: the EoT vmap puts the sample axis before the
            # batch axis and XLA all-gathers the batch.)
            d, r = P(self.parallel.DATA_AXIS), P()
            fn = jax.jit(jax.shard_map(step, mesh=self.mesh,
                                       in_specs=(r, r, d, d, d, d, r), out_specs=(d, d),
                                       check_vma=False))
            place_d = lambda a: jax.device_put(a, self.parallel.data_sharding(self.mesh))
            place_r = lambda a: jax.device_put(a, self.parallel.replicated(self.mesh))
        args = (place_r({"params": self.uv}), place_r(self.cv), place_d(self.x), place_d(self.x),
                place_d(self.y), place_d(idx), place_r(jr.key(7)))
        info = h.compile_timed(fn, args)
        compiled = info.pop("compiled")
        call = lambda: jax.block_until_ready(compiled(*args))
        t3 = time.perf_counter()
        x_next, loss = call()
        info["first_call_s"] = time.perf_counter() - t3
        np.savez(os.path.join(dir, f"first_{name}.npz"), x_next=np.asarray(x_next),
                 loss=np.asarray(loss))
        self.fns[name] = call
        return info


# ----------------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------------
def _torch_models(dir, threads=None):
    import numpy as np
    import torch
    from torch_purify import TorchSmallCNN, load_jax_classifier
    from torch_unet import TorchUNet, load_jax_params

    if threads:
        torch.set_num_threads(int(threads))
    with open(os.path.join(dir, "setup.json")) as f:
        meta = json.load(f)
    cl = torch.channels_last
    uparams = h.load_tree(os.path.join(dir, "unet.npz"))
    cvars = h.load_tree(os.path.join(dir, "clf.npz"))
    unet = load_jax_params(TorchUNet(**meta["cfg"]), uparams).to(memory_format=cl).eval()
    clf = load_jax_classifier(TorchSmallCNN(), cvars).to(memory_format=cl).eval()
    for p in [*unet.parameters(), *clf.parameters()]:   # input gradients only, as in JAX
        p.requires_grad_(False)
    inp = np.load(os.path.join(dir, "inputs.npz"))
    x = h.nchw(inp["x"])
    y = torch.from_numpy(np.array(inp["y"])).long()
    return meta, unet, clf, x, y


def _chain(dir, steps):
    import numpy as np
    from torch_purify import Chain

    return Chain(dict(np.load(os.path.join(dir, f"chain_{steps}.npz"))))


class TorchWorker(h.TorchWorker):
    SEED = 0

    def prepare(self, dir, threads):
        """Load the JAX weights; pick the thread count ('auto': time 1 and 2 threads)."""
        torch = self.torch
        self.meta, self.unet, self.clf, self.x, self.y = _torch_models(dir)
        t = torch.full((self.x.shape[0],), 50, dtype=torch.long)

        def grad():
            xx = self.x.detach().requires_grad_(True)
            (self.unet(xx, t) ** 2).sum().backward()

        return self.pick_threads(grad, threads)

    def numerics(self, dir, steps_list, grad_steps):
        """Compare with the JAX files: UNet eps, DDIM purification, purify+classify gradients."""
        import numpy as np
        import torch
        from torch_purify import purify, purify_classify_grad

        ld = lambda n: np.load(os.path.join(dir, f"check_{n}.npz"))
        res = {}
        e = ld("eps")
        with torch.no_grad():
            eps = self.unet(h.nchw(e["xt"]), torch.from_numpy(np.array(e["steps"])).long())
        res["unet_eps"] = h.diff(h.nhwc(eps), e["eps"])
        for s in steps_list:
            d = ld(f"ddim_{s}")
            with torch.no_grad():
                out = purify(self.unet, self.x, _chain(dir, s), sampler="ddim",
                             use_checkpoint=False, noise=h.nchw(d["noise"]))
            res[f"purify_ddim_{s}"] = h.diff(h.nhwc(out), d["out"])
        for sampler in ("ddim", "ddpm"):
            d = ld(f"grad_{sampler}_{grad_steps}")
            loss, g = purify_classify_grad(
                self.unet, self.clf, _chain(dir, grad_steps), self.x, self.y, sampler=sampler,
                noise=h.nchw(d["noise"]), step_noises=[h.nchw(a) for a in d["step_noise"]])
            r = h.diff(h.nhwc(g), d["grad"])
            r["loss_torch"], r["loss_jax"] = float(loss), float(d["loss"])
            res[f"grad_{sampler}_{grad_steps}"] = r
        return res

    def setup(self, name, steps, eot, use_checkpoint, eps, step_size, dir, warmup_steps):
        """One warm-up iteration on the ``warmup_steps`` chain (same shapes), then register."""
        from torch_purify import attack_iteration

        it = lambda chain: (lambda: attack_iteration(
            self.unet, self.clf, chain, self.x, self.x, self.y, eot=eot, eps=eps,
            step_size=step_size, use_checkpoint=use_checkpoint))
        t0 = time.perf_counter()
        it(_chain(dir, warmup_steps))()
        warm = time.perf_counter() - t0
        self.fns[name] = it(_chain(dir, steps))
        return {"warmup_s": warm, "warmup_steps": warmup_steps, "threads": self.threads}


# ----------------------------------------------------------------------------------------------
# memory: one exact-gradient step in a fresh process
# ----------------------------------------------------------------------------------------------
def mem_worker(spec):
    import resource

    impl, steps, dir = spec["impl"], spec["steps"], spec["dir"]
    out = {"impl": impl, "steps": steps}
    if impl.startswith("jax"):
        from jaxrob import parallel

        parallel.configure_cpu(device_count=1, ynn="all")
        import jax
        import jax.random as jr
        import numpy as np

        meta, uv, cv, inp = _jax_load(dir)
        unet, clf = _jax_modules(meta["cfg"], True)
        step = _make_attack_step(unet, clf, t_star=meta["t_star"], steps=steps, eot=1,
                                 eot_chunk=None, remat=impl == "jax_remat", eps=spec["eps"],
                                 step_size=spec["step_size"])
        x, y = jax.numpy.asarray(inp["x"]), jax.numpy.asarray(inp["y"])
        args = ({"params": uv}, cv, x, x, y, np.arange(x.shape[0], dtype=np.uint32), jr.key(7))
        c = h.compile_timed(jax.jit(step), args)
        out["xla_temp_bytes"] = c["xla_temp_bytes"]
        call = lambda: jax.block_until_ready(c["compiled"](*args))
    else:
        from torch_purify import attack_iteration

        meta, unet, clf, x, y = _torch_models(dir, spec["threads"])
        chain = _chain(dir, steps)
        call = lambda: attack_iteration(unet, clf, chain, x, x, y, eot=1, eps=spec["eps"],
                                        step_size=spec["step_size"],
                                        use_checkpoint=impl == "torch_ckpt")
    first = h.first_call(call)
    out.update(rss_before_kb=first["rss_before_kb"], hwm_reset=first["hwm_reset"],
               step_s=first["first_call_s"], step_peak_kb=first["peak_kb"],
               ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _stats(reps):
    """reps: per-repetition lists of [wall, own_cpu, foreign_cpu] (one call each here)."""
    return {**h.call_stats([c for r in reps for c in r], "iter"),
            "rep_s": [statistics.median(c[0] for c in r) for r in reps],
            "calls": [[[round(v, 5) for v in c] for c in r] for r in reps]}


def _ratio(torch_row, jax_row):
    """torch time / jax time: medians, and the range over repetitions both took part in."""
    per = [t / j for t, j in zip(torch_row["rep_s"], jax_row["rep_s"], strict=False)]
    return {"torch_over_jax": torch_row["s_per_iter"] / jax_row["s_per_iter"],
            "rep_min": min(per), "rep_max": max(per),
            "cpu_torch_over_jax": torch_row["cpu_s_per_iter"] / jax_row["cpu_s_per_iter"]}


def _first_diff(tmp, a, b):
    import numpy as np

    fa, fb = (np.load(os.path.join(tmp, f"first_{n}.npz")) for n in (a, b))
    return {"loss_max_abs_diff": float(np.abs(fa["loss"] - fb["loss"]).max()),
            "x_next_frac_equal": float(np.mean(np.isclose(fa["x_next"], fb["x_next"],
                                                          atol=1e-6)))}


def _phase(procs, tmp, args, steps, runs, warmup_steps, out):
    """Set up ``runs`` ({name: (proc, kwargs, reps)}), interleave the timed calls."""
    ph = {"steps": steps, "setup": {}, "rows": {}, "ratios": {}, "cross_checks": {}}
    for name, (proc, kw, _) in runs.items():
        t0 = time.time()
        try:
            if proc == "torch":
                ph["setup"][name] = procs[proc].call(
                    "setup", name=name, steps=steps, eot=args.eot, use_checkpoint=True,
                    eps=args.eps, step_size=args.step_size, dir=tmp, warmup_steps=warmup_steps)
            else:
                ph["setup"][name] = procs[proc].call(
                    "setup", name=name, steps=steps, eot=args.eot, eot_chunk=args.eot_chunk,
                    remat=True, eps=args.eps, step_size=args.step_size, dir=tmp, **kw)
        except h.WorkerFailed as e:
            out["errors"].append(f"{steps} steps/setup/{name}: {e}")
            h.log(f"  ! {e}")
            continue
        h.log(f"  setup {name}: {time.time() - t0:.1f}s")
    ok = [n for n in runs if n in ph["setup"]]
    jax_ok = [n for n in ok if n != "torch"]
    for n in jax_ok[1:]:
        ph["cross_checks"][n] = {"vs": jax_ok[0], **_first_diff(tmp, jax_ok[0], n)}
    res = {}
    for rep in range(max(runs[n][2] for n in ok) if ok else 0):
        live = {n: (runs[n][0], {"name": n}) for n in ok if rep < runs[n][2]}
        got = h.timed_round(procs, dict(live), rep, out["errors"], f"{steps} steps/run/")
        ok = [n for n in ok if n in got or n not in live]     # drop the runs that failed
        for n, calls in got.items():
            res.setdefault(n, [None] * rep).append(calls)
        h.log(f"  {steps} steps: rep {rep + 1} done")
    for n, reps in res.items():
        got = [r for r in reps if r is not None]
        ph["rows"][n] = _stats(got)
        ph["rows"][n]["rep_s"] = [statistics.median(c[0] for c in r) if r else None
                                  for r in reps]
    t = ph["rows"].get("torch")
    for n, row in ph["rows"].items():
        if n != "torch" and t:
            pairs = [(a, b) for a, b in zip(t["rep_s"], row["rep_s"], strict=False)
                     if a is not None and b is not None]
            ph["ratios"][n] = _ratio({**t, "rep_s": [a for a, _ in pairs]},
                                     {**row, "rep_s": [b for _, b in pairs]})
    for p in {runs[n][0] for n in runs}:
        try:
            procs[p].call("release")
        except h.WorkerFailed as e:
            out["errors"].append(f"release {p}: {e}")
    return ph


def _memory(args, tmp, threads):
    rows = []
    me = [sys.executable, os.path.abspath(__file__)]
    impls = [i for i in args.mem_impls.split(",") if i]
    for impl in impls:
        for steps in args.mem_steps:
            spec = {"impl": impl, "steps": steps, "dir": tmp, "eps": args.eps,
                    "step_size": args.step_size, "threads": threads}
            env = h.worker_env(torch=impl.startswith("torch"))
            t0 = time.time()
            p = subprocess.run([*me, "--mem-worker", json.dumps(spec)], env=env, cwd=h.REPO,
                               capture_output=True, text=True, timeout=900)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode or not lines:
                rows.append({"impl": impl, "steps": steps, "error": p.stderr[-800:]})
                h.log(f"  ! memory {impl} {steps}: rc={p.returncode}")
                continue
            rows.append(json.loads(lines[-1]))
            h.log(f"  memory {impl} {steps} steps: {time.time() - t0:.1f}s")
    return rows


def drive(args):
    t_start = time.time()
    log = h.log
    if args.quick:
        args.steps = args.steps or "5,20"
        args.eot = args.eot or 4
        args.reps = args.reps or 2
        args.slow_reps = args.slow_reps or 1
        args.mem_steps = args.mem_steps or "5,20"
        args.mem_impls = args.mem_impls or "jax_remat,jax_noremat,torch_nockpt"
    steps_list = [int(s) for s in (args.steps or "10,100").split(",")]
    args.eot = args.eot or 10
    args.reps = args.reps or 3
    args.slow_reps = args.slow_reps or 2
    args.mem_steps = [int(s) for s in (args.mem_steps or "10,100").split(",")]
    args.mem_impls = args.mem_impls or ",".join(MEM_IMPLS)
    settings = [s for s in args.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; expected {list(SETTINGS)}")
    from jaxrob.models import UNET_CONFIGS  # the driver only reads the config dict

    cfg = dict(UNET_CONFIGS["mnist"], ch=args.unet_ch, num_groups=args.unet_groups, dropout=0.0)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_attack_")
    procs = h.start_workers(__file__, settings, tmp, prefix="jax_")
    out = {"meta": h.run_meta(quick=args.quick, smoke=args.smoke, batch=args.batch,
                              eot=args.eot, eot_chunk=args.eot_chunk, t_star=args.t_star,
                              steps=steps_list, reps=args.reps, slow_reps=args.slow_reps,
                              eps=args.eps, step_size=args.step_size, unet_cfg=cfg, tmp=tmp),
           "numerics": {}, "phases": [], "memory": [], "errors": []}
    meta = out["meta"]
    threads = None
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        first = f"jax_{settings[0]}"
        chain_steps = sorted(set(steps_list) | set(args.mem_steps))
        meta["models"] = procs[first].call("prepare", dir=tmp, cfg=cfg, batch=args.batch,
                                           t_star=args.t_star, chain_steps=chain_steps,
                                           write=True)
        for n in procs:
            if n.startswith("jax") and n != first:
                procs[n].call("prepare", dir=tmp, cfg=cfg, batch=args.batch,
                              t_star=args.t_star, chain_steps=chain_steps, write=False)
        tp = procs["torch"].call("prepare", dir=tmp, threads=args.torch_threads)
        meta["torch_threads"] = tp
        threads = tp["threads"]
        log(f"workers ready ({time.time() - t_start:.0f}s); torch threads {tp}")

        # ---- 1. numerics ----
        grad_steps = steps_list[0]
        procs[first].call("numerics", dir=tmp, steps_list=steps_list, grad_steps=grad_steps)
        num = procs["torch"].call("numerics", dir=tmp, steps_list=steps_list,
                                  grad_steps=grad_steps)
        out["numerics"] = num
        log(f"numerics ({time.time() - t_start:.0f}s): unet {num['unet_eps']}")
        if not num["unet_eps"]["max_abs_diff"] < UNET_TOL:
            raise SystemExit(f"PyTorch UNet differs from jaxrob: {num['unet_eps']}")

        # ---- 2. attack-iteration throughput ----
        short = steps_list[0]
        best = settings
        for i, steps in enumerate(steps_list):
            use = settings if i == 0 or args.long_settings == "all" else best
            runs = {f"jax_{s}": (f"jax_{s}", {"fast_vjp": True}, args.reps) for s in use}
            if i == 0 and not args.no_slow:
                runs[f"jax_{settings[0]}_slowvjp"] = (first, {"fast_vjp": False},
                                                      args.slow_reps)
            runs["torch"] = ("torch", {}, args.reps)
            log(f"== {steps} steps: {list(runs)}")
            ph = _phase(procs, tmp, args, steps, runs, short, out)
            out["phases"].append(ph)
            if i == 0:
                timed = {s: ph["rows"][f"jax_{s}"]["s_per_iter"] for s in settings
                         if f"jax_{s}" in ph["rows"]}
                best = [min(timed, key=timed.get)] if timed else settings[:1]
                meta["long_settings"] = best if args.long_settings == "best" else settings
    finally:
        h.close_all(procs)

    # ---- 3. memory, fresh processes (after the workers have exited) ----
    if not args.no_mem:
        log("== memory")
        out["memory"] = _memory(args, tmp, threads)
    return h.finish(out, render, args.out, t_start)


def _growth(a, b, key):
    """b[key] / a[key] (NaN when missing); increases are floored at 1 MB."""
    if a.get(key) is None or b.get(key) is None:
        return float("nan")
    floor = 1024 if key.endswith("_kb") else 1
    return max(b[key], floor) / max(a[key], floor)


def render(out):
    m = out["meta"]
    c = m["unet_cfg"]
    lines = h.header("bench_attack", m) + [
        f"MNIST 28x28x1, batch {m['batch']}, EoT {m['eot']}, DDPM t*={m['t_star']}, UNet ch "
        f"{c['ch']} groups {c['num_groups']} ({m.get('models', {}).get('unet_params', '?')} "
        f"params), SmallCNN; Linf eps {m['eps']:.3g} step {m['step_size']:.3g}; torch threads "
        f"{h.torch_threads_text(m.get('torch_threads', {}))}",
    ]
    if m.get("smoke"):
        lines[0] += "  (--smoke)"
    num = out["numerics"]
    if num:
        u = num["unet_eps"]
        ok = h.ok(u["max_abs_diff"] < UNET_TOL)
        lines.append(f"numerics: UNet eps max|diff| {u['max_abs_diff']:.1e} (|eps| "
                     f"{u['max_abs_ref']:.2g}, tol {UNET_TOL:g}) {ok}")
        pur = [(k.rsplit("_", 1)[1], v) for k, v in num.items() if k.startswith("purify_ddim")]
        lines.append("  DDIM eta=0 purify, same forward noise: " + ", ".join(
            f"{s} steps {v['max_abs_diff']:.1e}" for s, v in pur)
            + f" (tol {PURIFY_TOL:g}) "
            + h.ok(all(v["max_abs_diff"] < PURIFY_TOL for _, v in pur)))
        gr = [(k, v) for k, v in num.items() if k.startswith("grad_")]
        lines.append("  grad sum CE(clf(purify(x))), same noise, rel max|diff|: " + ", ".join(
            f"{k[5:]} {v['max_abs_diff'] / v['max_abs_ref']:.1e} (loss {v['loss_torch']:.4f}"
            f" vs {v['loss_jax']:.4f})" for k, v in gr) + " " + h.ok(all(
                v["max_abs_diff"] <= GRAD_RTOL * v["max_abs_ref"] for _, v in gr)))
    for ph in out["phases"]:
        for n, cc in ph["cross_checks"].items():
            lines.append(f"  {ph['steps']} steps {n} vs {cc['vs']}: loss max|diff| "
                         f"{cc['loss_max_abs_diff']:.1e}, x_next equal "
                         f"{cc['x_next_frac_equal']:.4f}")
    lines.append("\nattack iteration = EoT-averaged input gradient + sign step + projection; "
                 "s/iter median [min-max] over timed iterations")
    lines.append(f"{'steps':>5} {'impl':<20}{'s/iter':>8} {'[min-max]':<15}{'n':>2}{'CPU-s':>7}"
                 f"{'util':>5}{'fgn':>5}{'compile':>8}{'first':>7}  torch/jax [reps]  CPU")
    for ph in out["phases"]:
        fast = {}
        for n, r in ph["rows"].items():
            su = ph["setup"].get(n, {})
            comp = f"{su['lower_s'] + su['compile_s']:.1f}" if "compile_s" in su else "-"
            first = su.get("first_call_s", su.get("warmup_s"))
            first = "-" if first is None else f"{first:.1f}"
            rt = ph["ratios"].get(n)
            rcell = (f"{rt['torch_over_jax']:5.2f} [{rt['rep_min']:.2f}-{rt['rep_max']:.2f}]"
                     f" {rt['cpu_torch_over_jax']:.2f}" if rt else "")
            rng = f"[{r['min_s']:.2f}-{r['max_s']:.2f}]"
            label = n.replace("_slowvjp", " no fast_vjp") if n != "torch" else "torch ckpt"
            lines.append(f"{ph['steps']:>5} {label:<20}{r['s_per_iter']:>8.2f} "
                         f"{rng:<15}{r['n']:>2}"
                         f"{r['cpu_s_per_iter']:>7.2f}{r['util']:>5.2f}{r['foreign_load']:>5.2f}"
                         f"{comp:>8}{first:>7}  {rcell}")
            if n != "torch" and not n.endswith("_slowvjp"):
                fast[n] = r["s_per_iter"]
        for n, r in ph["rows"].items():
            base = n.replace("_slowvjp", "")
            if n.endswith("_slowvjp") and base in fast:
                lines.append(f"      fast_vjp=False is {r['s_per_iter'] / fast[base]:.1f}x "
                             f"slower than fast_vjp=True ({base})")
    lines.append("(torch 'first' = one warm-up iteration of the shortest chain; fgn = cores "
                 "used by other processes meanwhile)")
    if out["memory"]:
        lines.append(f"\nmemory of one exact-gradient step (EoT 1, batch {m['batch']}), fresh "
                     f"process each (MB; step + = step peak - RSS before; cold s = that one "
                     f"first call)")
        lines.append(f"{'impl':<14}{'steps':>6}{'XLA temp':>10}{'peak RSS':>10}{'RSS before':>11}"
                     f"{'step peak':>10}{'step +':>8}{'cold s':>8}")
        by = {}
        for r in out["memory"]:
            if "error" in r:
                lines.append(f"{r['impl']:<14}{r['steps']:>6}  ERROR {r['error'][-200:]!r}")
                continue
            r["step_increase_kb"] = r["step_peak_kb"] - r["rss_before_kb"]
            temp = r.get("xla_temp_bytes")
            lines.append(f"{r['impl']:<14}{r['steps']:>6}"
                         f"{'-' if temp is None else f'{temp / 1e6:.0f}':>10}"
                         f"{r['ru_maxrss_kb'] / 1024:>10.0f}{r['rss_before_kb'] / 1024:>11.0f}"
                         f"{r['step_peak_kb'] / 1024:>10.0f}{r['step_increase_kb'] / 1024:>8.0f}"
                         f"{r['step_s']:>8.2f}")
            by.setdefault(r["impl"], {})[r["steps"]] = r
        for impl, d in by.items():
            if len(d) < 2:
                continue
            lo, hi = min(d), max(d)
            a, b = d[lo], d[hi]
            grow = {"XLA temp": _growth(a, b, "xla_temp_bytes"),
                    "step peak": _growth(a, b, "step_peak_kb"),
                    "step increase": _growth(a, b, "step_increase_kb"),
                    "process peak": _growth(a, b, "ru_maxrss_kb")}
            verdict = ""
            if impl == "jax_remat":
                good = all(grow[k] <= REMAT_TARGET for k in ("XLA temp", "step peak"))
                verdict = f" (target <= {REMAT_TARGET}: {h.ok(good)})"
            lines.append(f"growth {hi}/{lo} steps {impl:<13}" + ", ".join(
                f"{k} x{v:.2f}" for k, v in grow.items() if v == v) + verdict)
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--steps", default=None,
                    help="reverse-step counts, short first (default 10,100; --quick 5,20)")
    ap.add_argument("--eot", type=int, default=0, help="EoT samples (default 10; --quick 4)")
    ap.add_argument("--eot-chunk", type=int, default=None,
                    help="jaxrob EoT samples per vmap (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.3, help="Linf radius")
    ap.add_argument("--step-size", type=float, default=0.01)
    ap.add_argument("--unet-ch", type=int, default=16)
    ap.add_argument("--unet-groups", type=int, default=4)
    ap.add_argument("--reps", type=int, default=0,
                    help="timed iterations per implementation (default 3; --quick 2)")
    ap.add_argument("--slow-reps", type=int, default=0,
                    help="timed iterations of the fast_vjp=False run (default 2; --quick 1)")
    ap.add_argument("--settings", default="1dev,2dev",
                    help=f"JAX settings at the short chain (of {list(SETTINGS)})")
    ap.add_argument("--long-settings", choices=("best", "all"), default="best",
                    help="JAX settings at longer chains: the fastest at the short chain, or all")
    ap.add_argument("--no-slow", action="store_true", help="skip the fast_vjp=False run")
    ap.add_argument("--torch-threads", default="auto", choices=("auto", "1", "2"))
    ap.add_argument("--mem-steps", default=None,
                    help="chain lengths of the memory runs (default 10,100; --quick 5,20)")
    ap.add_argument("--mem-impls", default=None, help=f"of {list(MEM_IMPLS)} (default all; "
                    "--quick without torch_ckpt)")
    ap.add_argument("--no-mem", action="store_true", help="skip the memory runs")
    ap.add_argument("--quick", action="store_true", help="5/20 steps, EoT 4, 2 reps: ~3 min")
    h.add_worker_args(ap, smoke=SMOKE)
    ap.add_argument("--mem-worker", default=None, help=argparse.SUPPRESS)
    args = h.parse_args(ap, argv, SMOKE)
    if args.mem_worker:
        mem_worker(json.loads(args.mem_worker))
    elif not h.serve_if_worker(args, JaxWorker, TorchWorker):
        drive(args)


if __name__ == "__main__":
    main()
