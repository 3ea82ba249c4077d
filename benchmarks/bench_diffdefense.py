"""DiffDefense reconstruction on CPU: jaxrob next to a PyTorch twin of the reference's loop.

Setting: the committed MNIST DDPM (``checkpoints/mnist_ddpm``), the first ``--batch`` MNIST
test images (16), the reference's defaults: 5 restarts, 4 Adam iterations (lr 0.02, betas
(0.5, 0.999)), a 15-step reverse process (DDIM, eta = 0, over the model's respaced chain).

What it measures, in this order:

1. Numerics: jaxrob's ``z_T`` initialisations (per-example keys; restart ``r`` of example
   ``i`` starts from ``normal(fold_in(fold_in(k_i, RECON_INIT), r))``, checked against
   ``reconstruct(...).z`` with no iterations) are handed to PyTorch; per image, the
   reconstruction error, the kept restart and the reconstruction of both frameworks are
   compared, for ``z_gradient="reference"`` and ``"exact"``.
2. Seconds per reconstructed image (one call on the whole batch, divided by the batch size),
   interleaved in rotating order: ``jaxrob.purify.diffdefense(..., z_gradient=...)`` jitted
   (``fast_vjp=True`` UNet; on 2 host devices the batch is split with ``shard_map``), under
   each XLA:CPU setting, and the PyTorch twin (``torch_diffdefense.py``): ``torch_ref`` is the
   reference's loop (one image at a time, its 5 restarts as the batch, eps-network under
   ``no_grad``), ``torch_ref_batched`` the same on all images' restarts at once,
   ``torch_exact_batched`` differentiates through the eps-network too. Ratios: PyTorch time /
   jaxrob time (> 1: jaxrob faster) for the like-for-like gradient.

PyTorch: eager, channels_last, the glibc malloc settings, 3 warm-up calls, 1 or 2 threads
(``--torch-threads auto``).

Run (from the repository root)::

    python benchmarks/bench_diffdefense.py --smoke     # 2 images, 2 restarts, 3 steps: a check
    python benchmarks/bench_diffdefense.py --quick --out /tmp/bench_diffdefense_quick.json
    python benchmarks/bench_diffdefense.py --out benchmarks/results/bench_diffdefense_full.json

Worker processes are this file with ``--jax-setting`` or ``--torch-worker``.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker processes, timers, result files)
from bench_addt import SETTINGS, _data, _unet_cfg  # noqa: E402  (same settings and data)

Z_GRADIENTS = ("reference", "exact")
# PyTorch run -> (exact gradient, batched), and the jaxrob z_gradient it is compared with
TORCH_RUNS = {"torch_ref": (False, False, "reference"),
              "torch_ref_batched": (False, True, "reference"),
              "torch_exact_batched": (True, True, "exact")}
ERR_RTOL = 1e-3     # max |err_torch - err_jax| / err_jax per image
SMOKE = dict(batch=2, restarts=2, iterations=1, num_steps=3, reps=1, settings="2dev")
CKPT = os.path.join(h.REPO, "checkpoints")


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, ynn = SETTINGS[setting]
        super().__init__(setting, n_dev, ynn)

    def prepare(self, dir, batch, opts, write):
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import jaxrob.diffusion as jd
        from jaxrob.models import load
        from jaxrob.purify import example_keys

        x, _, source = _data(batch)
        self.x = jnp.asarray(x)
        self.keys = example_keys(jr.key(0), np.arange(batch))
        self.ddpm = load(os.path.join(CKPT, "mnist_ddpm"), kind="ddpm", fast_vjp=True)
        self.opts = opts
        if write:
            h.save_tree(os.path.join(dir, "unet.npz"), self.ddpm.variables["params"])
            np.savez(os.path.join(dir, "setup.npz"), x=x)
            h.save_fields(os.path.join(dir, "chain.npz"),
                          jd.respace(self.ddpm.schedule, opts["num_steps"]))
            with open(os.path.join(dir, "setup.json"), "w") as f:
                json.dump({"unet_cfg": _unet_cfg(self.ddpm.module), "data": source,
                           "unet_params": h.count_params(self.ddpm.variables["params"])}, f)
        return {"data": source}

    def _fn(self, z_gradient):
        """(jitted reconstruct(defence, x, keys), defence, placed x, placed keys)."""
        import jax
        from jax.sharding import PartitionSpec as P

        from jaxrob.purify import diffdefense

        # the fast path (inner_remat=False: no recomputation in the optimiser's gradient)
        d = diffdefense(self.ddpm, z_gradient=z_gradient, inner_remat=False, **self.opts)
        rec = lambda dd, x, k: dd.reconstruct(x, k)
        if self.mesh is None:
            return jax.jit(rec), d, self.x, self.keys
        # per-example keys: each device reconstructs its share, the same function
        data, rep = P(self.parallel.DATA_AXIS), P()
        fn = jax.jit(jax.shard_map(rec, mesh=self.mesh, in_specs=(rep, data, data),
                                   out_specs=data, check_vma=False))
        put_d = lambda a: jax.device_put(a, self.parallel.data_sharding(self.mesh))
        d = jax.device_put(d, self.parallel.replicated(self.mesh))
        return fn, d, put_d(self.x), put_d(self.keys)

    def numerics(self, dir):
        """The z_T initialisations and jaxrob's reconstructions, for the PyTorch worker."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        from jaxrob import _keys as tags
        from jaxrob.purify import diffdefense

        t0 = time.perf_counter()
        shape = (1, *self.x.shape[1:])
        z = jax.vmap(lambda k: jnp.stack([
            jr.normal(jr.fold_in(jr.fold_in(k, tags.RECON_INIT), r), shape)[0]
            for r in range(self.opts["restarts"])]))(self.keys)
        # the first restart's start, as the defence itself draws it (no iterations)
        d0 = diffdefense(self.ddpm, **{**self.opts, "restarts": 1, "iterations": 0})
        z0 = jax.jit(lambda x, k: d0.reconstruct(x, k).z)(self.x, self.keys)
        out = {"z_init": np.asarray(z)}
        for zg in Z_GRADIENTS:
            fn, d, x, k = self._fn(zg)
            r = fn(d, x, k)
            out.update({f"{zg}_x": np.asarray(r.x), f"{zg}_error": np.asarray(r.error),
                        f"{zg}_restart": np.asarray(r.restart)})
        np.savez(os.path.join(dir, "check.npz"), **out)
        return {"seconds": time.perf_counter() - t0,
                "z_init_matches_defence": bool(np.array_equal(np.asarray(z0), out["z_init"][:, 0]))}

    def setup(self, z_gradient):
        import jax

        fn, d, x, k = self._fn(z_gradient)
        info = h.compile_timed(fn, (d, x, k))
        compiled = info.pop("compiled")
        call = lambda: jax.block_until_ready(compiled(d, x, k))
        warm = h.timed_calls(call, 2)
        self.fns[z_gradient] = call
        info.update(first_call_s=warm[0][0], second_call_s=warm[1][0])
        return info


# ----------------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------------
class TorchWorker(h.TorchWorker):
    SEED = 0
    WARMUP = 3

    def prepare(self, dir, opts, threads):
        import numpy as np
        import torch
        from torch_purify import Chain
        from torch_unet import TorchUNet, load_jax_params

        with open(os.path.join(dir, "setup.json")) as f:
            meta = json.load(f)
        self.unet = load_jax_params(TorchUNet(**meta["unet_cfg"]),
                                    h.load_tree(os.path.join(dir, "unet.npz")))
        self.unet = self.unet.to(memory_format=torch.channels_last).eval()
        for p in self.unet.parameters():   # gradients w.r.t. z only
            p.requires_grad_(False)
        self.chain = Chain(dict(np.load(os.path.join(dir, "chain.npz"))))
        self.x = h.nchw(np.load(os.path.join(dir, "setup.npz"))["x"])
        self.opts = opts
        z = torch.randn(self.x.shape)
        t = torch.full((self.x.shape[0],), 500, dtype=torch.long)

        def grad():
            zz = z.detach().requires_grad_(True)
            (self.unet(zz, t) ** 2).sum().backward()

        return self.pick_threads(grad, threads)

    def _z(self, z_nhwc):
        import torch

        return torch.from_numpy(z_nhwc).permute(0, 1, 4, 2, 3).contiguous()

    def _call(self, run, z_init):
        from torch_diffdefense import reconstruct

        exact, batched, _ = TORCH_RUNS[run]
        return reconstruct(self.unet, self.x, z_init, self.chain,
                           iterations=self.opts["iterations"], lr=self.opts["learning_rate"],
                           betas=tuple(self.opts["betas"]), exact=exact, batched=batched)

    def numerics(self, dir):
        import numpy as np

        c = np.load(os.path.join(dir, "check.npz"))
        z = self._z(c["z_init"])
        res = {}
        for run, (_, _, zg) in TORCH_RUNS.items():
            x, err, best = self._call(run, z)
            ej, e = c[f"{zg}_error"], err.numpy()
            res[run] = {"vs": zg, "err_max_rel_diff": float(np.max(np.abs(e - ej) / ej)),
                        "err_torch_mean": float(e.mean()), "err_jax_mean": float(ej.mean()),
                        "restart_agree": float(np.mean(best.numpy() == c[f"{zg}_restart"])),
                        "x_max_abs_diff": float(np.abs(h.nhwc(x) - c[f"{zg}_x"]).max())}
        return res

    def setup(self, run):
        import torch

        b = self.x.shape[0]
        z = torch.randn(b, self.opts["restarts"], *self.x.shape[1:])
        call = lambda: self._call(run, z)
        warm = h.timed_calls(call, self.WARMUP)
        self.fns[run] = call
        return {"first_call_s": warm[0][0], "warmup_s": [w[0] for w in warm],
                "threads": self.threads}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _stats(reps, batch):
    st = h.call_stats([c for r in reps for c in r], "call")
    return {**st, "s_per_image": st["s_per_call"] / batch,
            "rep_s": [statistics.median(c[0] for c in r) for r in reps]}


def drive(args):
    t_start = time.time()
    log = h.log
    if args.quick:
        args.reps = args.reps or 3
        args.settings = args.settings or "1dev,2dev"
    args.reps = args.reps or 5
    settings = [s for s in (args.settings or ",".join(SETTINGS)).split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; expected {list(SETTINGS)}")
    opts = dict(num_steps=args.num_steps, restarts=args.restarts, iterations=args.iterations,
                learning_rate=0.02, betas=[0.5, 0.999])
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_dd_")
    procs = h.start_workers(__file__, settings, tmp, prefix="jax_")
    out = {"meta": h.run_meta(quick=args.quick, smoke=args.smoke, batch=args.batch, opts=opts,
                              reps=args.reps, settings=settings, tmp=tmp),
           "numerics": {}, "setup": {}, "rows": {}, "ratios": {}, "errors": []}
    meta = out["meta"]
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        first = f"jax_{settings[0]}"
        for n in procs:
            if n.startswith("jax"):
                meta["data"] = procs[n].call("prepare", dir=tmp, batch=args.batch, opts=opts,
                                             write=n == first)["data"]
        with open(os.path.join(tmp, "setup.json")) as f:
            meta["models"] = json.load(f)
        meta["torch_threads"] = procs["torch"].call("prepare", dir=tmp, opts=opts,
                                                    threads=args.torch_threads)
        log(f"workers ready ({time.time() - t_start:.0f}s); torch {meta['torch_threads']}")
        if not args.no_numerics:
            t0 = time.time()
            try:
                out["numerics"]["jax"] = procs[first].call("numerics", dir=tmp)
                out["numerics"].update(procs["torch"].call("numerics", dir=tmp))
            except h.WorkerFailed as e:   # recorded; the timings still run
                out["errors"].append(f"numerics: {e}")
            log(f"numerics ({time.time() - t0:.0f}s): {out['numerics']}")
            procs[first].call("release")
        runs = {}
        todo = [(f"jax_{s}_{zg}", f"jax_{s}", {"z_gradient": zg}) for zg in Z_GRADIENTS
                for s in settings]
        todo += [(r, "torch", {"run": r}) for r in TORCH_RUNS]
        for row, proc, kw in todo:
            try:
                t0 = time.time()
                out["setup"][row] = procs[proc].call("setup", **kw)
                log(f"  setup {row}: {time.time() - t0:.1f}s")
                runs[row] = (proc, {"name": kw.get("z_gradient", kw.get("run"))})
            except h.WorkerFailed as e:
                out["errors"].append(f"setup/{row}: {e}")
                log(f"  ! {e}")
        res = collections.defaultdict(list)
        for rep in range(args.reps):
            for n, calls in h.timed_round(procs, runs, rep, out["errors"], "run/").items():
                res[n].append(calls)
            log(f"  rep {rep + 1}/{args.reps} done ({time.time() - t_start:.0f}s)")
        for n, reps in res.items():
            out["rows"][n] = _stats(reps, args.batch)
        for t, (_, _, zg) in TORCH_RUNS.items():
            for j in out["rows"]:
                if j.startswith("jax") and j.endswith(f"_{zg}") and t in out["rows"]:
                    a, b = out["rows"][t], out["rows"][j]
                    per = [x / y for x, y in zip(a["rep_s"], b["rep_s"], strict=False)]
                    out["ratios"][f"{t}/{j}"] = {
                        "ratio": a["s_per_call"] / b["s_per_call"], "rep_min": min(per),
                        "rep_max": max(per), "cpu_ratio": a["cpu_s_per_call"] / b["cpu_s_per_call"]}
    finally:
        h.close_all(procs)
    return h.finish(out, render, args.out, t_start)


def render(out):
    m = out["meta"]
    o = m["opts"]
    lines = h.header("bench_diffdefense", m) + [
        f"MNIST DDPM UNet ({m.get('models', {}).get('unet_params', '?')} params), batch "
        f"{m['batch']} ({m.get('data', '?')}); {o['restarts']} restarts x {o['iterations']} Adam "
        f"iterations (lr {o['learning_rate']}, betas {tuple(o['betas'])}), {o['num_steps']}-step "
        f"DDIM reverse process; torch threads {h.torch_threads_text(m.get('torch_threads', {}))}"]
    if m.get("smoke"):
        lines[0] += "  (--smoke)"
    num = out["numerics"]
    if num:
        lines.append("numerics on the same z_T initialisations (z_T drawn as the defence draws "
                     f"it: {h.ok(num.get('jax', {}).get('z_init_matches_defence'))}):")
        for run, r in num.items():
            if run == "jax":
                continue
            lines.append(f"  {run:<21} vs jaxrob {r['vs']:<10} error max rel diff "
                         f"{r['err_max_rel_diff']:.1e} (mean {r['err_torch_mean']:.5f} vs "
                         f"{r['err_jax_mean']:.5f}), kept restart agrees "
                         f"{100 * r['restart_agree']:.0f}%, x max|diff| {r['x_max_abs_diff']:.1e}"
                         f" {h.ok(r['err_max_rel_diff'] < ERR_RTOL)}")
    lines.append(f"\nseconds per reconstructed image (one call on {m['batch']} images / "
                 f"{m['batch']}), median [min-max] over interleaved reps; fgn = cores other "
                 "processes used")
    lines.append(f"{'impl':<24}{'s/image':>9} {'[min-max]':<17}{'s/call':>8}{'n':>3}{'CPU-s':>8}"
                 f"{'util':>6}{'fgn':>6}{'compile':>9}{'first':>8}")
    b = m["batch"]
    for n, r in out["rows"].items():
        su = out["setup"].get(n, {})
        comp = f"{su['lower_s'] + su['compile_s']:.1f}s" if "compile_s" in su else "-"
        rng = f"[{r['min_s'] / b:.3f}-{r['max_s'] / b:.3f}]"
        lines.append(f"{n:<24}{r['s_per_image']:>9.3f} {rng:<17}{r['s_per_call']:>8.2f}"
                     f"{r['n']:>3}{r['cpu_s_per_call']:>8.2f}{r['util']:>6.2f}"
                     f"{r['foreign_load']:>6.2f}{comp:>9}"
                     f"{su.get('first_call_s', float('nan')):>8.1f}")
    lines.append("\nratios PyTorch time / jaxrob time (> 1: jaxrob faster), median [per-rep range]"
                 " CPU-time ratio")
    for k, r in out["ratios"].items():
        lines.append(f"  {k:<46}{r['ratio']:6.2f} [{r['rep_min']:.2f}-{r['rep_max']:.2f}]  "
                     f"cpu {r['cpu_ratio']:.2f}")
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--num-steps", type=int, default=15)
    ap.add_argument("--reps", type=int, default=0, help="timed calls per run (default 5; "
                    "--quick 3)")
    ap.add_argument("--settings", default=None,
                    help=f"JAX settings of {list(SETTINGS)} (default all; --quick 1dev,2dev)")
    ap.add_argument("--torch-threads", default="auto", choices=("auto", "1", "2"))
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 reps, settings 1dev,2dev")
    h.add_worker_args(ap, smoke=SMOKE)
    args = h.parse_args(ap, argv, SMOKE)
    if not h.serve_if_worker(args, JaxWorker, TorchWorker):
        drive(args)


if __name__ == "__main__":
    main()
