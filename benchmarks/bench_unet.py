"""UNet speed on CPU: jaxrob (four XLA:CPU settings) next to the same network in PyTorch.

Workloads per UNet config (``jaxrob.models.UNET_CONFIGS``), all on the same weights and inputs:

* ``fwd``     -- ``model.apply(variables, x_t, step)`` (eval mode);
* ``grad_x``  -- gradient of ``0.5 * sum(out**2)`` w.r.t. the input only;
* ``train``   -- one DDPM train step, ``jaxrob.training.make_ddpm_train_step`` (eps-MSE, AdamW
  2e-4 with global-norm clipping 1.0, EMA 0.999, dropout 0.1; one jitted step incl. the update);
* ``sampler`` -- ``jaxrob.diffusion.ddpm_sample`` over ``respace(linear_schedule(), S)``
  (S = 100 by default; fewer for cifar10 / --quick, reported scaled to 100 steps as well);
* ``matmul``  -- float32 ``a @ b`` (N x N), the machine's reference throughput.

JAX settings (each its own long-lived subprocess, because XLA flags must be set before JAX starts):
``default`` (1 device), ``noynn`` (``jaxrob.parallel.NO_YNN_FLAG``), ``2dev`` (2 host devices,
batch sharded over a ``data`` mesh, params replicated, jit with NamedSharding) and
``2dev_noynn``. PyTorch runs in one more subprocess started with the glibc malloc settings below,
``torch.set_num_threads(2)``, channels_last and 3 warm-up calls.

The driver first checks numerics (every JAX setting's fwd/grad_x output against ``default``, and
PyTorch's; the PyTorch mnist fwd must agree to < 1e-4), then interleaves the timed calls: for
each repetition and workload it asks every process in turn (rotating the order) for one timed
batch of calls, so slow phases of a shared machine hit all settings alike. Ratios are JAX time
over PyTorch time, medians over all calls; their spread is the range of per-repetition ratios.

Run (from the repository root)::

    python benchmarks/bench_unet.py --smoke --out /tmp/bench_unet_smoke.json       # a check
    python benchmarks/bench_unet.py --quick --out benchmarks/results/quick.json      # ~3 min
    python benchmarks/bench_unet.py --out benchmarks/results/full.json               # ~12 min

Worker processes are this file with ``--jax-setting NAME`` or ``--torch-worker``; they speak
JSON lines on stdin/stdout and are not meant to be run by hand.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker processes, timers, result files)

# name -> (XLA host devices, disable YNN fusions, shard the batch over all devices)
SETTINGS = {"default": (1, False, False), "noynn": (1, True, False), "2dev": (2, False, True),
            "2dev_noynn": (2, True, True)}
# Not run unless named in --settings: a 2-device process running code that does not shard
# (plain jit, everything on device 0), i.e. what the 2-device default costs unsharded code.
EXTRA_SETTINGS = {"2dev_plain": (2, False, False), "2dev_noynn_plain": (2, True, False)}
ALL_SETTINGS = {**SETTINGS, **EXTRA_SETTINGS}
WORKLOADS = ("fwd", "grad_x", "train", "sampler")
TORCH_TOL = 1e-4          # max |fwd_torch - fwd_jax| on the mnist config
SHARD_TOL = 1e-4          # max |fwd_2dev - fwd_1dev|
REF_STEPS = 100           # sampler rows are also reported per REF_STEPS steps
SCHED_KEYS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_coef_x0",
              "posterior_coef_xt", "posterior_variance", "model_steps")


# ----------------------------------------------------------------------------------------------
# JAX worker
# ----------------------------------------------------------------------------------------------
class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, no_ynn, shard = ALL_SETTINGS[setting]
        super().__init__(setting, n_dev, "off" if no_ynn else "all", shard=shard)
        self.compiled = {}

    def hello(self):
        return super().hello(extra=("optax",))

    def _jit(self, fn, in_specs, out_spec):
        """jax.jit; on a mesh with explicit shardings ('d' = batch over data, 'r' = replicated)."""
        import jax

        if self.mesh is None:
            return jax.jit(fn)
        sh = {"d": self.parallel.data_sharding(self.mesh),
              "r": self.parallel.replicated(self.mesh)}
        return jax.jit(fn, in_shardings=tuple(sh[s] for s in in_specs),
                       out_shardings=sh[out_spec])

    def _place(self, arr, spec):
        import jax

        if self.mesh is None:
            return jax.device_put(arr)
        sh = (self.parallel.data_sharding(self.mesh) if spec == "d"
              else self.parallel.replicated(self.mesh))
        return jax.device_put(arr, sh)

    @staticmethod
    def _flops(compiled):
        ca = compiled.cost_analysis()
        if isinstance(ca, list | tuple):
            ca = ca[0]
        return float(ca.get("flops", float("nan"))) if ca else float("nan")

    def _add(self, name, jitted, args, run, *, warmup, inner_target, flops_mult=1):
        """Lower + compile (timed), then warm up; registers ``run(compiled)`` as the workload."""
        c = h.compile_timed(jitted, args)
        compiled = c.pop("compiled")
        flops = self._flops(compiled)
        call = run(compiled)
        warm = h.timed_calls(call, warmup)
        self.fns[name] = call
        self.compiled[name] = compiled
        return {"lower_s": c["lower_s"], "compile_s": c["compile_s"], "first_call_s": warm[0][0],
                "flops_reported": flops, "flops": flops * flops_mult, "flops_mult": flops_mult,
                "xla_temp_bytes": c["xla_temp_bytes"],
                "inner": h.inner_for(warm[-1][0], inner_target)}

    def setup(self, config, batch, workloads, sampler_steps, dir, inner_target,
              config_kwargs=None):
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import jaxrob.diffusion as jd
        from jaxrob import training
        from jaxrob.models import UNET_CONFIGS, DiffusionModel, unet_from_config

        self.release()
        # The first worker reads UNET_CONFIGS; the driver hands its reading to the others, so
        # every process builds the same network even if the registry is edited meanwhile.
        cfg = dict(config_kwargs) if config_kwargs else UNET_CONFIGS[config]
        model = unet_from_config(cfg)        # dropout 0.1 from the config; off unless train=True
        size, ch = cfg["image_size"], cfg["in_ch"]
        pfile = os.path.join(dir, f"params_{config}.npz")
        ifile = os.path.join(dir, f"inputs_{config}_{batch}.npz")
        sfile = os.path.join(dir, f"sched_{config}_{sampler_steps}.npz")
        sched_train = jd.linear_schedule()
        sched = jd.respace(sched_train, sampler_steps)
        if not os.path.exists(pfile):       # the first worker writes weights, inputs, schedules
            v = model.init(jr.key(0), jnp.zeros((1, size, size, ch)), jnp.zeros((1,), jnp.int32))
            h.save_tree(pfile, v["params"])
        if not os.path.exists(ifile):
            rng = np.random.default_rng(0)
            np.savez(ifile, x=rng.standard_normal((batch, size, size, ch), np.float32),
                     t=rng.integers(0, 1000, batch).astype(np.int32),
                     x01=rng.uniform(0, 1, (batch, size, size, ch)).astype(np.float32))
        if not os.path.exists(sfile):
            h.save_fields(sfile, sched, SCHED_KEYS,
                          train_sqrt_ab=sched_train.sqrt_alphas_cumprod,
                          train_sqrt_1m_ab=sched_train.sqrt_one_minus_alphas_cumprod)
        params = h.load_tree(pfile, jnp.asarray)
        inp = np.load(ifile)
        v = self._place({"params": params}, "r")
        x, t = self._place(inp["x"], "d"), self._place(inp["t"], "d")
        block = jax.block_until_ready
        info = {"config_kwargs": {k: list(a) if isinstance(a, tuple) else a
                                  for k, a in cfg.items()},
                "num_params": h.count_params(params)}
        # the eps-model with the variables of the call (a jit argument, not a constant)
        ddpm = lambda v: DiffusionModel(model, v, sched_train)

        fwd = self._jit(lambda v, x, t: ddpm(v)(x, t), "rdd", "d")
        loss_x = lambda x, v, t: 0.5 * jnp.sum(jnp.square(ddpm(v)(x, t)))
        grad_x = self._jit(jax.grad(loss_x), "drd", "d")
        warm = 2
        info["fwd"] = self._add("fwd", fwd, (v, x, t), lambda c: lambda: block(c(v, x, t)),
                                warmup=warm, inner_target=inner_target)
        info["grad_x"] = self._add("grad_x", grad_x, (x, v, t),
                                   lambda c: lambda: block(c(x, v, t)),
                                   warmup=warm, inner_target=inner_target)
        # Numerics: fwd and grad_x outputs go to files the driver compares across processes.
        for name, args in (("fwd", (v, x, t)), ("grad_x", (x, v, t))):
            np.save(os.path.join(dir, f"out_{name}_{config}_{self.setting}.npy"),
                    np.asarray(self.compiled[name](*args)))
        for name in ("fwd", "grad_x"):
            if name not in workloads:
                del self.fns[name], info[name]
        if "sampler" in workloads:
            key = self._place(jr.key(0), "r")
            sample = lambda v, x, key: jd.ddpm_sample(ddpm(v), x, key, sched)
            # cost_analysis counts the scan body once: multiply by the trip count.
            info["sampler"] = self._add("sampler", self._jit(sample, "rdr", "d"), (v, x, key),
                                        lambda c: lambda: block(c(v, x, key)), warmup=1,
                                        inner_target=inner_target, flops_mult=sampler_steps)
        if "train" in workloads:
            mesh = self.mesh if self.mesh is not None else self.parallel.make_mesh(1)
            tx, _ = training.make_optimizer(name="adamw", learning_rate=2e-4)
            step = training.make_ddpm_train_step(model.apply, tx, sched_train, mesh=mesh)
            # a copy: the jitted step donates (deletes) its input state's buffers
            own = jax.tree.map(jnp.copy, params)
            state = training.create_train_state({"params": own}, tx, jr.key(1))
            state = jax.device_put(state, self.parallel.replicated(mesh))
            batch_d = {"image": jax.device_put(inp["x01"], self.parallel.data_sharding(mesh))}
            holder = {"state": state}

            def run_train(c):
                def call():
                    holder["state"], metrics = c(holder["state"], batch_d)
                    block((holder["state"], metrics))
                return call

            # the jitted step donates its state argument: the holder keeps the live state.
            info["train"] = self._add("train", step, (state, batch_d), run_train, warmup=warm,
                                      inner_target=inner_target)
        return info

    def setup_matmul(self, n, inner_target):
        import jax
        import jax.numpy as jnp
        import jax.random as jr

        a = self._place(jr.normal(jr.key(0), (n, n), jnp.float32), "d")
        b = self._place(jr.normal(jr.key(1), (n, n), jnp.float32), "r")
        mm = self._jit(lambda a, b: a @ b, "dr", "d")
        info = self._add("matmul", mm, (a, b), lambda c: lambda: jax.block_until_ready(c(a, b)),
                         warmup=2, inner_target=inner_target)
        info["flops_formula"] = 2.0 * n ** 3
        return info

    def release(self):
        self.compiled.clear()
        return super().release()


# ----------------------------------------------------------------------------------------------
# PyTorch worker
# ----------------------------------------------------------------------------------------------
class TorchWorker(h.TorchWorker):
    WARMUP = 3   # oneDNN builds kernels per shape; fewer warm-up calls gave 10x-off medians

    def hello(self):
        return {**super().hello(), "threads": self.torch.get_num_threads()}

    def _add(self, name, call, warmup, inner_target):
        warm = h.timed_calls(call, warmup)
        self.fns[name] = call
        return {"first_call_s": warm[0][0], "inner": h.inner_for(warm[-1][0], inner_target),
                "warmup_calls": warmup}

    def setup(self, config, config_kwargs, batch, workloads, sampler_steps, dir, inner_target):
        import copy

        import numpy as np
        import torch
        import torch.nn.functional as F
        from torch_unet import TorchUNet, load_jax_params

        self.release()
        params = h.load_tree(os.path.join(dir, f"params_{config}.npz"))
        inp = np.load(os.path.join(dir, f"inputs_{config}_{batch}.npz"))
        sch = np.load(os.path.join(dir, f"sched_{config}_{sampler_steps}.npz"))
        cl = torch.channels_last
        x, x01 = h.nchw(inp["x"]), h.nchw(inp["x01"])
        t = torch.from_numpy(np.array(inp["t"])).long()

        model = load_jax_params(TorchUNet(**config_kwargs), params).to(memory_format=cl).eval()
        tmodel = copy.deepcopy(model).train()           # the train step updates its own copy
        for p in model.parameters():                    # fwd / grad_x: input gradient only
            p.requires_grad_(False)

        def fwd():
            with torch.no_grad():
                return model(x, t)

        def grad_x():
            xx = x.detach().requires_grad_(True)
            y = model(xx, t)
            (0.5 * (y * y).sum()).backward()
            return xx.grad

        np.save(os.path.join(dir, f"out_fwd_{config}_torch.npy"), h.nhwc(fwd()))
        np.save(os.path.join(dir, f"out_grad_x_{config}_torch.npy"), h.nhwc(grad_x()))
        info = {"num_params": int(sum(p.numel() for p in model.parameters()))}
        if "fwd" in workloads:
            info["fwd"] = self._add("fwd", fwd, self.WARMUP, inner_target)
        if "grad_x" in workloads:
            info["grad_x"] = self._add("grad_x", grad_x, self.WARMUP, inner_target)
        if "sampler" in workloads:
            s1m = sch["sqrt_one_minus_alphas_cumprod"].tolist()
            sab = sch["sqrt_alphas_cumprod"].tolist()
            c0, ct = sch["posterior_coef_x0"].tolist(), sch["posterior_coef_xt"].tolist()
            sd = np.sqrt(sch["posterior_variance"]).tolist()
            msteps = torch.from_numpy(np.array(sch["model_steps"])).long()

            def sample():
                xx = x.clone()
                with torch.no_grad():
                    for n in range(sampler_steps - 1, -1, -1):
                        eps = model(xx, msteps[n].expand(batch))
                        mean = c0[n] * ((xx - s1m[n] * eps) / sab[n]) + ct[n] * xx
                        xx = mean + sd[n] * torch.randn_like(xx) if n > 0 else mean
                return xx

            # one sampler call is S UNet calls of one shape: a single warm-up call suffices
            info["sampler"] = self._add("sampler", sample, 1, inner_target)
        if "train" in workloads:
            tparams = list(tmodel.parameters())
            opt = torch.optim.AdamW(tparams, lr=2e-4, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0, foreach=True)
            ema = [p.detach().clone() for p in tparams]
            sab_t = torch.from_numpy(np.array(sch["train_sqrt_ab"]))
            s1m_t = torch.from_numpy(np.array(sch["train_sqrt_1m_ab"]))
            counter = {"step": 0}

            def train():
                n = torch.randint(0, sab_t.shape[0], (batch,))
                noise = torch.randn_like(x01)
                x_t = (sab_t[n].view(-1, 1, 1, 1) * (2.0 * x01 - 1.0)
                       + s1m_t[n].view(-1, 1, 1, 1) * noise)
                loss = F.mse_loss(tmodel(x_t, n), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(tparams, 1.0)
                opt.step()
                s = counter["step"]
                with torch.no_grad():
                    torch._foreach_lerp_(ema, tparams, 1.0 - min(0.999, (1 + s) / (10 + s)))
                counter["step"] = s + 1
                return loss

            info["train"] = self._add("train", train, self.WARMUP, inner_target)
        return info

    def setup_matmul(self, n, inner_target):
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        info = self._add("matmul", lambda: a @ b, self.WARMUP, inner_target)
        info["flops_formula"] = 2.0 * n ** 3
        return info


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
QUIET = 0.25   # a repetition is "quiet" when other processes used < this many cores meanwhile


def _summary(reps, ref_flops, images, steps_scale):
    """reps: list of per-repetition lists of [wall, own_cpu, foreign_cpu] per call."""
    walls = [c[0] for r in reps for c in r]
    med = statistics.median(walls)
    rep_load = [sum(c[2] for c in r) / sum(c[0] for c in r) for r in reps]
    quiet = [c[0] for r, ld in zip(reps, rep_load, strict=True) if ld < QUIET for c in r]
    q = statistics.quantiles(walls, n=4) if len(walls) > 1 else [med, med, med]
    out = {"s_per_call": med, "min_s": min(walls), "max_s": max(walls), "p25_s": q[0],
           "p75_s": q[2], "n_calls": len(walls),
           "util": sum(c[1] for r in reps for c in r) / sum(walls),
           "cpu_s_per_call": statistics.median(c[1] for r in reps for c in r),
           "foreign_load": sum(c[2] for r in reps for c in r) / sum(walls),
           "rep_medians_s": [statistics.median(c[0] for c in r) for r in reps],
           "rep_foreign_load": rep_load,
           "quiet_s_per_call": statistics.median(quiet) if quiet else None,
           "n_quiet_calls": len(quiet),
           "calls": [[[round(v, 6) for v in c] for c in r] for r in reps]}
    if ref_flops == ref_flops:   # not NaN
        out["gflops_per_s"] = ref_flops / med / 1e9
    if images:
        out["images_per_s"] = images / (med * steps_scale)
    if steps_scale != 1:
        out[f"s_per_{REF_STEPS}_steps"] = med * steps_scale
    return out


def _ratios(r, t):
    """JAX row ``r`` over PyTorch row ``t``: medians, per-repetition range, quiet repetitions."""
    pr = [a / b for a, b in zip(r["rep_medians_s"], t["rep_medians_s"], strict=False)]
    quiet = [x for x, la, lb in zip(pr, r["rep_foreign_load"], t["rep_foreign_load"],
                                    strict=False) if la < QUIET and lb < QUIET]
    return {"ratio_vs_torch": r["s_per_call"] / t["s_per_call"],
            "cpu_ratio_vs_torch": r["cpu_s_per_call"] / t["cpu_s_per_call"],
            "ratio_rep_min": min(pr),
            "ratio_rep_max": max(pr),
            "ratio_quiet": statistics.median(quiet) if quiet else None,
            "n_quiet_reps": len(quiet)}


def _max_diff(dir, name, config, a, b):
    """max |out_b - out_a| and max |out_a| of one workload's saved outputs (None if absent)."""
    import numpy as np

    fa = os.path.join(dir, f"out_{name}_{config}_{a}.npy")
    fb = os.path.join(dir, f"out_{name}_{config}_{b}.npy")
    if not (os.path.exists(fa) and os.path.exists(fb)):
        return None
    return h.diff(np.load(fb), np.load(fa))


class QuietWaiter:
    """Before each block of timed calls, wait (within a total budget) for other processes on
    the machine to use less than ``QUIET`` cores, measured over 1 s windows."""

    def __init__(self, budget_s):
        self.budget = budget_s
        self.waited = 0.0

    def __call__(self):
        while self.waited < self.budget:
            b0, t0 = h.machine_busy_s(), time.perf_counter()
            time.sleep(1.0)
            dt = time.perf_counter() - t0
            self.waited += dt
            if (h.machine_busy_s() - b0) / dt < QUIET:
                return


def _interleave(procs, group, names, workloads, reps_for, inner, results, wait):
    """For each repetition and workload, one timed batch of calls in every process in turn."""
    max_reps = max(reps_for(w) for w in workloads)
    for rep in range(max_reps):
        for wi, wl in enumerate(workloads):
            if rep >= reps_for(wl):
                continue
            wait()
            runs = {n: (n, {"name": wl, "inner": inner[(wl, n)]}) for n in names
                    if (wl, n) in inner}
            got = h.timed_round(procs, runs, rep + wi, results.setdefault("errors", []),
                                f"{group}/{wl}/")
            for n in names:
                if (wl, n) in inner and n not in runs:     # its worker failed
                    inner.pop((wl, n))
            for n, calls in got.items():
                results.setdefault((wl, n), []).append(calls)
        h.log(f"  rep {rep + 1}/{max_reps} done")


def _fmt_s(s):
    return f"{s * 1e3:.1f}ms" if s < 1 else f"{s:.2f}s"


# --smoke: the smallest run of every code path (the "digits" UNet, one sharded JAX setting)
SMOKE = dict(configs="digits", settings="2dev", batch=4, reps=1, sampler_reps=1,
             sampler_steps=2, matmul_n=256, setup_jobs=2, max_wait=0)


def drive(args):
    t_start = time.time()
    quick = args.quick or args.smoke
    configs = [c for c in (args.configs or ("mnist" if quick else "mnist,cifar10")).split(",")
               if c]
    settings = [s for s in args.settings.split(",") if s]
    for s in settings:
        if s not in ALL_SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; expected {list(ALL_SETTINGS)}")
    workloads = [w for w in args.workloads.split(",") if w]
    reps = args.reps if args.reps else (3 if quick else 5)
    args.setup_jobs = args.setup_jobs or (2 if quick else 1)
    sampler_reps = args.sampler_reps if args.sampler_reps else max(2, min(reps, 3))
    inner_target = 0.05 if args.smoke else 0.3 if quick else 0.5
    mm_n = args.matmul_n or (2048 if quick else 4096)
    log = h.log

    wait = QuietWaiter(args.max_wait if args.max_wait >= 0 else (30 if quick else 120))
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_unet_")
    procs = h.start_workers(__file__, settings, tmp, torch=not args.no_torch,
                            compile_cache=args.compile_cache)
    names = list(procs)
    meta = h.run_meta(quick=quick, smoke=args.smoke, reps=reps, sampler_reps=sampler_reps,
                      inner_target_s=inner_target, compile_cache=args.compile_cache,
                      setup_jobs=args.setup_jobs)
    out = {"meta": meta, "matmul": {}, "configs": {}, "errors": []}
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        log(f"workers up: {names} ({time.time() - t_start:.0f}s); tmp dir {tmp}")

        # ---- matmul reference ----
        inner, res = {}, {}
        info = {}
        for n in names:
            info[n] = procs[n].call("setup_matmul", n=mm_n, inner_target=inner_target)
            inner[("matmul", n)] = info[n]["inner"]
        _interleave(procs, "matmul", names, ["matmul"], lambda w: reps, inner, res, wait)
        out["errors"] += res.pop("errors", [])
        for n in names:
            if ("matmul", n) in res:
                out["matmul"][n] = {**info[n], **_summary(res[("matmul", n)],
                                                          info[n]["flops_formula"], 0, 1)}
        if "torch" in out["matmul"]:
            for n in names:
                if n != "torch" and n in out["matmul"]:
                    out["matmul"][n].update(_ratios(out["matmul"][n], out["matmul"]["torch"]))
        out["matmul"]["n"] = mm_n

        for config in configs:
            batch = args.batch if config != "cifar10" else args.cifar_batch
            steps = args.sampler_steps or (20 if quick else (10 if config == "cifar10"
                                                             else REF_STEPS))
            log(f"== {config}: batch {batch}, sampler {steps} steps ==")
            cres = {"batch": batch, "sampler_steps": steps, "setup": {}, "checks": {},
                    "rows": {}}
            out["configs"][config] = cres
            inner = {}
            ok = []
            # The first JAX worker writes weights/inputs/schedules; then the others, in groups of
            # --setup-jobs (1 keeps compile times clean; XLA compiles mostly on one core).
            order = [n for n in names if n != "torch"]
            groups = [order[:1]] + [order[i:i + args.setup_jobs]
                                    for i in range(1, len(order), args.setup_jobs)]
            if "torch" in procs:
                if len(groups) > 1 and len(groups[-1]) < args.setup_jobs:
                    groups[-1].append("torch")
                else:
                    groups.append(["torch"])
            cfg_kwargs = None
            for group in groups:
                t0 = time.time()
                sent = []
                for n in group:
                    kw = dict(config=config, batch=batch, workloads=workloads,
                              sampler_steps=steps, dir=tmp, inner_target=inner_target)
                    if cfg_kwargs is not None:
                        kw["config_kwargs"] = cfg_kwargs
                    elif n == "torch":
                        continue
                    try:
                        procs[n].send("setup", **kw)
                        sent.append(n)
                    except h.WorkerFailed as e:
                        out["errors"].append(f"{config}/setup/{n}: {e}")
                for n in sent:
                    try:
                        si = procs[n].recv()
                    except h.WorkerFailed as e:
                        log(f"  ! {e}")
                        out["errors"].append(f"{config}/setup/{n}: {e}")
                        continue
                    cfg_kwargs = cfg_kwargs or si.get("config_kwargs")
                    si["setup_wall_s"] = time.time() - t0
                    si["setup_group"] = group
                    cres["setup"][n] = si
                    ok.append(n)
                    for wl in workloads:
                        if wl in si:
                            inner[(wl, n)] = si[wl]["inner"]
                    log(f"  setup {n}: {si['setup_wall_s']:.1f}s")

            # ---- numerics before timing ----
            ref = "default" if "default" in ok else (ok[0] if ok else None)
            for n in ok:
                if n == ref:
                    continue
                cres["checks"][n] = {w: _max_diff(tmp, w, config, ref, n)
                                     for w in ("fwd", "grad_x")}
            tchk = cres["checks"].get("torch", {}).get("fwd")
            if tchk is not None:
                log(f"  torch vs {ref} fwd max|diff| = {tchk['max_abs_diff']:.3g}")
                if config == "mnist" and not tchk["max_abs_diff"] < TORCH_TOL:
                    raise SystemExit(f"PyTorch UNet differs from jaxrob on mnist: "
                                     f"{tchk['max_abs_diff']} >= {TORCH_TOL}")
            for n, c in cres["checks"].items():
                if n != "torch" and c["fwd"] and not c["fwd"]["max_abs_diff"] < SHARD_TOL:
                    out["errors"].append(f"{config}: {n} fwd differs from {ref}: {c['fwd']}")

            # ---- timing ----
            res = {}
            _interleave(procs, config, ok, workloads,
                        lambda w: sampler_reps if w == "sampler" else reps, inner, res, wait)
            out["errors"] += res.pop("errors", [])
            for wl in workloads:
                ref_flops = cres["setup"].get(ref, {}).get(wl, {}).get("flops", float("nan"))
                scale = REF_STEPS / steps if wl == "sampler" else 1
                row = {"ref_flops": ref_flops}
                for n in ok:
                    if (wl, n) in res:
                        row[n] = _summary(res[(wl, n)], ref_flops, batch, scale)
                if "torch" in row:
                    for n in ok:
                        if n != "torch" and n in row:
                            row[n].update(_ratios(row[n], row["torch"]))
                cres["rows"][wl] = row
            for n in ok:
                try:
                    procs[n].call("release")
                except h.WorkerFailed as e:
                    out["errors"].append(f"{config}/release/{n}: {e}")
    finally:
        h.close_all(procs)
    meta["quiet_wait_s"] = wait.waited
    meta["worker_logs"] = tmp
    return h.finish(out, render, args.out, t_start)


def _ratio_cell(r):
    if "ratio_vs_torch" not in r:
        return "-"
    q = f"{r['ratio_quiet']:.2f}" if r.get("ratio_quiet") is not None else "-"
    return (f"{r['ratio_vs_torch']:.2f} [{r['ratio_rep_min']:.2f}-{r['ratio_rep_max']:.2f}]"
            f" q{q}")


def render(out):
    """The tables printed at the end (and saved next to the JSON as .txt)."""
    m = out["meta"]
    lines = h.header("bench_unet", m)
    lines[0] += (f"  reps {m['reps']} (sampler {m['sampler_reps']})  waited "
                 f"{m.get('quiet_wait_s', 0):.0f}s for quiet" + ("  (--smoke)" if m.get("smoke")
                                                                  else ""))
    lines.append("util = own CPU-s per wall-s; fgn = cores used by other processes meanwhile; "
                 f"q = ratio over repetitions where both sides had fgn < {QUIET}")
    if m.get("compile_cache"):
        lines.append("compile column: JAX persistent compilation cache on (loads, not compiles, "
                     "where an entry existed)")
    if m.get("setup_jobs", 1) > 1:
        lines.append(f"compile column: {m['setup_jobs']} workers compiled at once (inflated)")
    mm = out["matmul"]
    lines.append(f"\nfloat32 matmul N={mm.get('n')} (GFLOP/s median [min-max], util, fgn; "
                 "JAX/torch time ratio):")
    for n, r in mm.items():
        if isinstance(r, dict):
            f = r["flops_formula"] / 1e9
            lines.append(f"  {n:<12}{r['gflops_per_s']:>6.0f} [{f / r['max_s']:.0f}-"
                         f"{f / r['min_s']:.0f}]  util {r['util']:.2f}  fgn "
                         f"{r['foreign_load']:.2f}  {_ratio_cell(r)}")
    for config, c in out["configs"].items():
        lines.append(f"\n== {config}: batch {c['batch']}, sampler {c['sampler_steps']} steps "
                     f"(sampler img/s = images per second at {REF_STEPS} steps, scaled) ==")
        lines.append(f"{'workload':<9}{'impl':<12}{'s/call':>9} {'[min-max]':<19}{'CPU-s':>8}"
                     f"{'img/s':>8}{'GFLOP/s':>8}{'util':>6}{'fgn':>6}{'compile':>9}{'GFLOP':>8}"
                     f"  JAX/torch [rep range] quiet")
        for wl, row in c["rows"].items():
            for n, r in row.items():
                if not isinstance(r, dict):
                    continue
                su = c["setup"].get(n, {}).get(wl, {})
                comp = (f"{su['compile_s'] + su['lower_s']:.1f}s" if "compile_s" in su
                        else "-")
                rng = f"[{_fmt_s(r['min_s'])}-{_fmt_s(r['max_s'])}]"
                lines.append(
                    f"{wl:<9}{n:<12}{_fmt_s(r['s_per_call']):>9} {rng:<19}"
                    f"{r['cpu_s_per_call']:>8.3f}{r.get('images_per_s', float('nan')):>8.1f}"
                    f"{r.get('gflops_per_s', float('nan')):>8.0f}{r['util']:>6.2f}"
                    f"{r['foreign_load']:>6.2f}{comp:>9}{row['ref_flops'] / 1e9:>8.2f}  "
                    f"{_ratio_cell(r) if n != 'torch' else ''}")
        lines.append(f"\n-- {config}: JAX / PyTorch time ratio: median [per-rep range] "
                     f"q<quiet-rep median>; >1 means JAX is slower --")
        settings = [n for n in ALL_SETTINGS if any(n in r for r in c["rows"].values())]
        lines.append(f"{'workload':<9}" + "".join(f"{s:>26}" for s in settings))
        for wl, row in c["rows"].items():
            lines.append(f"{wl:<9}" + "".join(f"{_ratio_cell(row.get(s, {})):>26}"
                                              for s in settings))
        lines.append(f"\n-- {config}: JAX / PyTorch ratio of CPU-seconds per call (own "
                     f"process, all threads; less sensitive to a busy machine) --")
        lines.append(f"{'workload':<9}" + "".join(f"{s:>12}" for s in settings))
        for wl, row in c["rows"].items():
            lines.append(f"{wl:<9}" + "".join(
                f"{row[s]['cpu_ratio_vs_torch']:>12.2f}" if "cpu_ratio_vs_torch" in row.get(s, {})
                else f"{'-':>12}" for s in settings))
        lines.append(f"\n-- {config}: numerics vs jax:default (max |diff| (max |ref|)) --")
        for n, chk in c["checks"].items():
            lines.append(f"{n:<12}" + "  ".join(
                f"{w}: {d['max_abs_diff']:.2e} ({d['max_abs_ref']:.2g})"
                for w, d in chk.items() if d))
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--configs", default=None,
                    help="comma-separated UNET_CONFIGS names (default: mnist,cifar10; "
                         "--quick: mnist)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (all but cifar10)")
    ap.add_argument("--cifar-batch", type=int, default=8, help="batch size for cifar10")
    ap.add_argument("--reps", type=int, default=0,
                    help="interleaved repetitions (default 5; --quick 3)")
    ap.add_argument("--sampler-reps", type=int, default=0,
                    help="repetitions of the sampler row (default min(reps, 3))")
    ap.add_argument("--sampler-steps", type=int, default=0,
                    help="sampler steps (default 100; cifar10 10; --quick 20)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"JAX settings to run (of {list(ALL_SETTINGS)})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size (default 4096; "
                    "--quick 2048)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--setup-jobs", type=int, default=0,
                    help="workers compiling at once after the first (default 1; --quick 2; "
                         ">1 inflates the reported compile times)")
    ap.add_argument("--quick", action="store_true", help="mnist only, 3 reps, 20 sampler "
                    "steps, N=2048 matmul: about 3 minutes")
    ap.add_argument("--max-wait", type=float, default=-1,
                    help="total seconds to spend waiting for a quiet machine before timed "
                         "blocks (default 120; --quick 30)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX persistent compilation cache for the workers (reruns skip XLA "
                         "compiles; the compile column then shows cache loads)")
    h.add_worker_args(ap, smoke=SMOKE)
    args = h.parse_args(ap, argv, SMOKE)
    if not h.serve_if_worker(args, JaxWorker, TorchWorker):
        drive(args)


if __name__ == "__main__":
    main()
