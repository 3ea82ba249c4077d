"""The AdvDM protective-perturbation loop on CPU: jaxrob next to a PyTorch twin of Diff-Protect's.

Setting: the committed MNIST latent diffusion model (``checkpoints/mnist_ldm``: the KL
autoencoder of ``checkpoints/mnist_vae`` and a latent DDPM on its 7x7x4 codes), the first
``--batch`` MNIST test images (16), AdvDM(+) with the reference's defaults: eps 16/255,
``--num-steps`` sign steps (100) of 1/255, one Monte-Carlo draw of ``(t, eps)`` per step, no
random start.

What it measures, in this order:

1. Weights: the VAE's parameters are written out in diffusers' layout by inverting jaxrob's
   own importer (``autoencoder_from_diffusers_state_dict`` of that state dict must give back
   jaxrob's parameters exactly), loaded strictly into a diffusers ``AutoencoderKL``; the
   UNet's go into ``torch_unet.TorchUNet``.
2. Numerics, before any timing (the run stops if they fail): the draws of the attack's first
   iteration (each example's ``t`` and noise from its own key, as ``jaxrob.attacks.advdm``
   draws them; checked by rebuilding jaxrob's first iterate from them) are handed to
   PyTorch, which must give the same per-example loss (rel. ``LOSS_RTOL``) and input gradient
   (``max|dg| / max|g| < GRAD_RTOL``), and its first sign step the same iterate (pixels
   agreeing >= ``STEP_AGREE``; a sign can flip where a gradient entry is ~0).
3. Seconds per attack (one call on the batch; printed per iteration = / num_steps),
   interleaved in rotating order: ``jaxrob.attacks.advdm(ldm, x, keys, encode_fn=
   ldm.encode_latent)`` jitted (``fast_vjp=True`` networks; on 2 host devices the batch is
   split with ``shard_map``, per-example keys make that the same function), under each XLA:CPU
   setting, and the PyTorch twin (``torch_protect.py``): ``torch_lean`` (frozen parameters,
   gradient w.r.t. the image only; the fair comparison) and ``torch_ref`` (the reference's
   work as written: UNet parameter gradients every step, posterior samples, the unused target
   branch). Ratio: PyTorch time / jaxrob time (> 1: jaxrob faster).

PyTorch: eager, channels_last, the glibc malloc settings, 3 warm-up calls, 1 or 2 threads
(``--torch-threads auto``: whichever runs a loss gradient faster).

Run (from the repository root)::

    python benchmarks/bench_protect.py --smoke     # 2 images, 2 steps: a check
    python benchmarks/bench_protect.py --quick --out /tmp/bench_protect_quick.json
    python benchmarks/bench_protect.py --out benchmarks/results/bench_protect_full.json

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

TORCH_RUNS = {"torch_lean": False, "torch_ref": True}   # run -> the reference's overheads
LOSS_RTOL = 1e-4     # per-example |loss_torch - loss_jax| / loss_jax
GRAD_RTOL = 1e-3     # max |g_torch - g_jax| / max |g_jax|
STEP_AGREE = 0.99    # fraction of pixels of the first iterate that must agree
SMOKE = dict(batch=2, num_steps=2, reps=1, settings="2dev")
CKPT = os.path.join(h.REPO, "checkpoints")
AE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "num_groups", "in_ch",
             "out_ch", "norm_eps", "use_quant_conv", "use_post_quant_conv", "mid_attention",
             "image_size")


def diffusers_state_dict(module, variables):
    """jaxrob ``AutoencoderKL`` variables -> diffusers state dict (numpy, torch layout).

    Each Flax leaf goes to the first (current) diffusers name jaxrob's importer accepts for it,
    laid out by inverting the importer's own transpose (an index permutation), so importing the
    result gives ``variables`` back exactly (checked by the caller).
    """
    import jax
    import numpy as np

    from jaxrob.models._autoencoder import _diffusers_module_keys
    from jaxrob.models._torch_import import (
        _LEAF_TO_TORCH,
        flax_to_torch_shape,
        torch_to_flax_layout,
    )

    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = tuple(getattr(p, "key", str(p)) for p in path)
        collection, module_path, name = names[0], names[1:-1], names[-1]
        key = f"{_diffusers_module_keys(module_path)[0]}.{_LEAF_TO_TORCH[(collection, name)]}"
        shape = flax_to_torch_shape(leaf.shape, name)
        idx = torch_to_flax_layout(np.arange(int(np.prod(shape))).reshape(shape), name)
        flat = np.empty(idx.size, np.float32)
        flat[idx.ravel()] = np.asarray(leaf, np.float32).ravel()
        sd[key] = flat.reshape(shape)
    return sd


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, ynn = SETTINGS[setting]
        super().__init__(setting, n_dev, ynn)

    def prepare(self, dir, batch, opts, write):
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        from jaxrob.models import autoencoder_from_diffusers_state_dict, load
        from jaxrob.purify import example_keys

        x, _, source = _data(batch)
        self.x = jnp.asarray(x)
        self.keys = example_keys(jr.key(0), np.arange(batch))
        self.ldm = load(os.path.join(CKPT, "mnist_ldm"), kind="ldm", fast_vjp=True)
        self.opts = opts
        info = {"data": source}
        if write:
            ae = self.ldm.autoencoder
            sd = diffusers_state_dict(ae.module, ae.variables)
            back = autoencoder_from_diffusers_state_dict(sd, ae.module)
            same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)),
                                ae.variables, back)
            info["vae_roundtrip_exact"] = all(jax.tree.leaves(same))
            np.savez(os.path.join(dir, "vae.npz"), **sd)
            h.save_tree(os.path.join(dir, "unet.npz"), self.ldm.diffusion.variables["params"])
            sch = self.ldm.schedule
            np.savez(os.path.join(dir, "setup.npz"), x=x,
                     sqrt_alphas_cumprod=np.asarray(sch.sqrt_alphas_cumprod),
                     sqrt_one_minus_alphas_cumprod=np.asarray(sch.sqrt_one_minus_alphas_cumprod),
                     model_steps=np.asarray(sch.model_steps))
            vae_cfg = {k: getattr(ae.module, k) for k in AE_FIELDS}
            vae_cfg["block_out_channels"] = list(vae_cfg["block_out_channels"])
            with open(os.path.join(dir, "setup.json"), "w") as f:
                json.dump({"unet_cfg": _unet_cfg(self.ldm.diffusion.module), "vae_cfg": vae_cfg,
                           "scaling_factor": float(ae.scaling_factor),
                           "shift_factor": float(ae.shift_factor), "data": source,
                           "vae_params": ae.num_params,
                           "unet_params": self.ldm.diffusion.num_params}, f)
        return info

    def _attack(self, num_steps):
        """``f(ldm, x, keys) -> x_adv``: the public attack as a user calls it."""
        from jaxrob.attacks import advdm

        o = self.opts

        def f(ldm, x, keys):
            return advdm(ldm, x, keys, encode_fn=ldm.encode_latent, eps=o["eps"],
                         step_size=o["step_size"], num_steps=num_steps).x_adv

        return f

    def _fn(self, num_steps):
        """(jitted attack, ldm, placed x, placed keys)."""
        import jax
        from jax.sharding import PartitionSpec as P

        f = self._attack(num_steps)
        if self.mesh is None:
            return jax.jit(f), self.ldm, self.x, self.keys
        data, rep = P(self.parallel.DATA_AXIS), P()
        fn = jax.jit(jax.shard_map(f, mesh=self.mesh, in_specs=(rep, data, data),
                                   out_specs=data, check_vma=False))
        put_d = lambda a: jax.device_put(a, self.parallel.data_sharding(self.mesh))
        ldm = jax.device_put(self.ldm, self.parallel.replicated(self.mesh))
        return fn, ldm, put_d(self.x), put_d(self.keys)

    def numerics(self, dir):
        """The first iteration's draws, loss and input gradient, and jaxrob's first iterate."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        from jaxrob.attacks import advdm_loss, project
        from jaxrob.attacks._protect import _draw

        t0 = time.perf_counter()
        ldm, o = self.ldm, self.opts

        def first_key(k_i):   # the attack's key convention (jaxrob.attacks._protect docstring)
            k_steps = jr.split(jr.fold_in(k_i, 0))[1]
            return jr.fold_in(jr.fold_in(k_steps, 0), 0)

        def one(x_i, k_i):
            k = first_key(k_i)
            loss_fn = lambda v: advdm_loss(ldm, v[None], k, encode_fn=ldm.encode_latent)[0]
            loss, g = jax.value_and_grad(loss_fn)(x_i)
            n, noise = _draw(k, ldm.encode_latent(x_i[None]), ldm.schedule)
            return loss, g, n[0], noise[0]

        loss, g, n, noise = jax.jit(jax.vmap(one))(self.x, self.keys)
        x1_from_draws = project(self.x + o["step_size"] * jnp.sign(g), self.x, o["eps"], "linf")
        x1 = jax.jit(self._attack(1))(ldm, self.x, self.keys)
        np.savez(os.path.join(dir, "check.npz"), loss=np.asarray(loss), grad=np.asarray(g),
                 n=np.asarray(n), noise=np.asarray(noise), x1=np.asarray(x1))
        agree = float(jnp.mean(x1_from_draws == x1))
        return {"seconds": time.perf_counter() - t0, "draws_rebuild_first_iterate": agree,
                "loss_mean": float(loss.mean())}

    def setup(self, num_steps):
        import jax

        fn, ldm, x, k = self._fn(num_steps)
        info = h.compile_timed(fn, (ldm, x, k))
        compiled = info.pop("compiled")
        call = lambda: jax.block_until_ready(compiled(ldm, x, k))
        warm = h.timed_calls(call, 2)
        self.fns["advdm"] = call
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
        from torch_protect import AdvDMSetup, advdm_loss, build_vae
        from torch_unet import TorchUNet, load_jax_params

        with open(os.path.join(dir, "setup.json")) as f:
            meta = json.load(f)
        unet = load_jax_params(TorchUNet(**meta["unet_cfg"]),
                               h.load_tree(os.path.join(dir, "unet.npz")))
        unet = unet.to(memory_format=torch.channels_last).eval()
        for p in unet.parameters():   # torch_ref switches them on for its own calls
            p.requires_grad_(False)
        vae = build_vae(meta["vae_cfg"], dict(np.load(os.path.join(dir, "vae.npz"))))
        setup = dict(np.load(os.path.join(dir, "setup.npz")))
        self.s = AdvDMSetup(vae, unet, setup, meta["scaling_factor"], meta["shift_factor"])
        self.x = h.nchw(setup["x"])
        self.x_target = self.x.flip(0).contiguous(memory_format=torch.channels_last)
        self.opts = opts
        self.gen = torch.Generator().manual_seed(0)
        n, noise = self.s.draw((self.x.shape[0], *self.s.latent_shape(self.x)), self.gen)

        def grad():
            xx = self.x.detach().requires_grad_(True)
            torch.autograd.grad(advdm_loss(self.s, xx, n, noise).sum(), xx)

        return self.pick_threads(grad, threads)

    def _call(self, run, num_steps, draws=None):
        from torch_protect import advdm

        ref = TORCH_RUNS[run]
        params = list(self.s.unet.parameters())
        for p in params:
            p.requires_grad_(ref)
        try:
            return advdm(self.s, self.x, eps=self.opts["eps"], step_size=self.opts["step_size"],
                         num_steps=num_steps, generator=self.gen, draws=draws,
                         reference_overheads=ref, x_target=self.x_target)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def numerics(self, dir):
        import numpy as np
        import torch
        from torch_protect import advdm_loss

        c = np.load(os.path.join(dir, "check.npz"))
        n = torch.from_numpy(c["n"].astype(np.int64))
        noise = torch.from_numpy(c["noise"]).permute(0, 3, 1, 2).contiguous()
        xx = self.x.detach().clone().requires_grad_(True)
        loss = advdm_loss(self.s, xx, n, noise)
        (g,) = torch.autograd.grad(loss.sum(), xx)
        gj, lj = c["grad"], c["loss"]
        x1 = self._call("torch_lean", 1, draws=[(n, noise)])
        return {"loss_max_rel_diff": float(np.max(np.abs(loss.detach().numpy() - lj) / lj)),
                "grad_max_abs_diff_rel": float(np.abs(h.nhwc(g) - gj).max() / np.abs(gj).max()),
                "grad_sign_agree": float(np.mean(np.sign(h.nhwc(g)) == np.sign(gj))),
                "first_iterate_agree": float(np.mean(h.nhwc(x1) == c["x1"])),
                "loss_mean": float(loss.mean())}

    def setup(self, run, num_steps):
        call = lambda: self._call(run, num_steps)
        warm = h.timed_calls(call, self.WARMUP)
        self.fns[run] = call
        return {"first_call_s": warm[0][0], "warmup_s": [w[0] for w in warm],
                "threads": self.threads}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _stats(reps, num_steps):
    st = h.call_stats([c for r in reps for c in r], "call")
    return {**st, "s_per_iter": st["s_per_call"] / num_steps,
            "rep_s": [statistics.median(c[0] for c in r) for r in reps]}


def _numerics_ok(num):
    t = num.get("torch_lean", {})
    return (num.get("jax", {}).get("draws_rebuild_first_iterate", 0.0) >= STEP_AGREE
            and t.get("loss_max_rel_diff", 1.0) < LOSS_RTOL
            and t.get("grad_max_abs_diff_rel", 1.0) < GRAD_RTOL
            and t.get("first_iterate_agree", 0.0) >= STEP_AGREE)


def drive(args):
    t_start = time.time()
    log = h.log
    if args.quick:
        args.reps = args.reps or 3
        args.settings = args.settings or "1dev,2dev"
        args.num_steps = args.num_steps or 20
    args.reps = args.reps or 5
    args.num_steps = args.num_steps or 100
    settings = [s for s in (args.settings or ",".join(SETTINGS)).split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; expected {list(SETTINGS)}")
    torch_runs = [r for r in args.torch_runs.split(",") if r]
    for r in torch_runs:
        if r not in TORCH_RUNS:
            raise SystemExit(f"--torch-runs: unknown {r!r}; expected {list(TORCH_RUNS)}")
    opts = dict(eps=16 / 255, step_size=1 / 255)
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_protect_")
    procs = h.start_workers(__file__, settings, tmp, prefix="jax_")
    out = {"meta": h.run_meta(quick=args.quick, smoke=args.smoke, batch=args.batch, opts=opts,
                              num_steps=args.num_steps, reps=args.reps, settings=settings,
                              tmp=tmp),
           "numerics": {}, "setup": {}, "rows": {}, "ratios": {}, "errors": []}
    meta = out["meta"]
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        first = f"jax_{settings[0]}"
        for n in procs:
            if n.startswith("jax"):
                info = procs[n].call("prepare", dir=tmp, batch=args.batch, opts=opts,
                                     write=n == first)
                meta["data"] = info["data"]
                if n == first:
                    meta["vae_roundtrip_exact"] = info["vae_roundtrip_exact"]
        with open(os.path.join(tmp, "setup.json")) as f:
            meta["models"] = {k: v for k, v in json.load(f).items() if k.endswith("params")}
        meta["torch_threads"] = procs["torch"].call("prepare", dir=tmp, opts=opts,
                                                    threads=args.torch_threads)
        log(f"workers ready ({time.time() - t_start:.0f}s); torch {meta['torch_threads']}")
        if not args.no_numerics:
            t0 = time.time()
            out["numerics"]["jax"] = procs[first].call("numerics", dir=tmp)
            out["numerics"]["torch_lean"] = procs["torch"].call("numerics", dir=tmp)
            log(f"numerics ({time.time() - t0:.0f}s): {out['numerics']}")
            procs[first].call("release")
            if not (_numerics_ok(out["numerics"]) and meta["vae_roundtrip_exact"]):
                out["errors"].append("numerics failed: not timed")
                return h.finish(out, render, args.out, t_start)
        runs = {}
        todo = [(f"jax_{s}", f"jax_{s}", {}) for s in settings]
        todo += [(r, "torch", {"run": r}) for r in torch_runs]
        for row, proc, kw in todo:
            try:
                t0 = time.time()
                out["setup"][row] = procs[proc].call("setup", num_steps=args.num_steps, **kw)
                log(f"  setup {row}: {time.time() - t0:.1f}s")
                runs[row] = (proc, {"name": kw.get("run", "advdm")})
            except h.WorkerFailed as e:
                out["errors"].append(f"setup/{row}: {e}")
                log(f"  ! {e}")
        res = collections.defaultdict(list)
        for rep in range(args.reps):
            for n, calls in h.timed_round(procs, runs, rep, out["errors"], "run/").items():
                res[n].append(calls)
            log(f"  rep {rep + 1}/{args.reps} done ({time.time() - t_start:.0f}s)")
        for n, reps in res.items():
            out["rows"][n] = _stats(reps, args.num_steps)
        for t in torch_runs:
            for j in out["rows"]:
                if j.startswith("jax") and t in out["rows"]:
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
    mod = m.get("models", {})
    lines = h.header("bench_protect", m) + [
        f"MNIST LDM (VAE {mod.get('vae_params', '?')} + UNet {mod.get('unet_params', '?')} "
        f"params), batch {m['batch']} ({m.get('data', '?')}); AdvDM(+) {m['num_steps']} steps, "
        f"eps {o['eps'] * 255:.0f}/255, step {o['step_size'] * 255:.0f}/255; torch threads "
        f"{h.torch_threads_text(m.get('torch_threads', {}))}"]
    if m.get("smoke"):
        lines[0] += "  (--smoke)"
    num = out["numerics"]
    if num:
        j, t = num.get("jax", {}), num.get("torch_lean", {})
        lines += [
            f"numerics (first iteration, jaxrob's draws handed to PyTorch): VAE weights "
            f"round-trip through jaxrob's importer exactly {h.ok(m.get('vae_roundtrip_exact'))}; "
            f"draws rebuild jaxrob's first iterate "
            f"{100 * j.get('draws_rebuild_first_iterate', 0):.2f}%",
            f"  loss max rel diff {t.get('loss_max_rel_diff', float('nan')):.1e} (mean "
            f"{t.get('loss_mean', float('nan')):.5f} vs {j.get('loss_mean', float('nan')):.5f}) "
            f"{h.ok(t.get('loss_max_rel_diff', 1) < LOSS_RTOL)}; input gradient max|diff|/max|g| "
            f"{t.get('grad_max_abs_diff_rel', float('nan')):.1e} "
            f"{h.ok(t.get('grad_max_abs_diff_rel', 1) < GRAD_RTOL)} (signs agree "
            f"{100 * t.get('grad_sign_agree', 0):.2f}%); first iterate agrees "
            f"{100 * t.get('first_iterate_agree', 0):.2f}% of pixels "
            f"{h.ok(t.get('first_iterate_agree', 0) >= STEP_AGREE)}"]
    steps = m["num_steps"]
    lines.append(f"\nseconds per AdvDM iteration (one {steps}-step attack on {m['batch']} images "
                 f"/ {steps}), median [min-max] over interleaved reps; fgn = cores other "
                 "processes used")
    lines.append(f"{'impl':<14}{'s/iter':>9} {'[min-max]':<17}{'s/attack':>9}{'n':>3}"
                 f"{'CPU-s':>8}{'util':>6}{'fgn':>6}{'compile':>9}{'first':>8}")
    for n, r in out["rows"].items():
        su = out["setup"].get(n, {})
        comp = f"{su['lower_s'] + su['compile_s']:.1f}s" if "compile_s" in su else "-"
        rng = f"[{r['min_s'] / steps:.4f}-{r['max_s'] / steps:.4f}]"
        lines.append(f"{n:<14}{r['s_per_iter']:>9.4f} {rng:<17}{r['s_per_call']:>9.2f}"
                     f"{r['n']:>3}{r['cpu_s_per_call']:>8.2f}{r['util']:>6.2f}"
                     f"{r['foreign_load']:>6.2f}{comp:>9}"
                     f"{su.get('first_call_s', float('nan')):>8.1f}")
    lines.append("\nratios PyTorch time / jaxrob time (> 1: jaxrob faster), median [per-rep range]"
                 " CPU-time ratio")
    for k, r in out["ratios"].items():
        lines.append(f"  {k:<30}{r['ratio']:6.2f} [{r['rep_min']:.2f}-{r['rep_max']:.2f}]  "
                     f"cpu {r['cpu_ratio']:.2f}")
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-steps", type=int, default=0, help="AdvDM steps (default 100; "
                    "--quick 20)")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per run (default 5; "
                    "--quick 3)")
    ap.add_argument("--settings", default=None,
                    help=f"JAX settings of {list(SETTINGS)} (default all; --quick 1dev,2dev)")
    ap.add_argument("--torch-runs", default=",".join(TORCH_RUNS),
                    help=f"PyTorch runs of {list(TORCH_RUNS)}")
    ap.add_argument("--torch-threads", default="auto", choices=("auto", "1", "2"))
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--quick", action="store_true", help="20 steps, 3 reps, settings 1dev,2dev")
    h.add_worker_args(ap, smoke=SMOKE)
    args = h.parse_args(ap, argv, SMOKE)
    if not h.serve_if_worker(args, JaxWorker, TorchWorker):
        drive(args)


if __name__ == "__main__":
    main()
