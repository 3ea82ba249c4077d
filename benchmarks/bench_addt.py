"""One ADDT fine-tuning step on CPU: jaxrob next to a PyTorch twin of the reference's loop.

Setting: the committed MNIST DDPM (``checkpoints/mnist_ddpm``, 280,177-parameter UNet) and
MNIST classifier (``checkpoints/mnist_classifier``, SmallCNN), the first ``--batch`` MNIST test
images (64), CGPO with K = 5 iterations + RBGM, AdamW lr 2e-4 betas (0.95, 0.999) weight decay
1e-6 (every parameter), global-norm clipping at 1.0, EMA 0.9999 with the power-3/4 warm-up.

What it measures, in this order:

1. Numerics, on fresh copies of the models. jaxrob's draws of step 0 (positions, the training
   noise, CGPO's starting delta, every iteration's forward noise and RBGM sample) are
   recomputed from the key chain ``jaxrob.training.make_addt_train_step`` documents and handed
   to PyTorch. (a) With jaxrob's final CGPO delta fed in, PyTorch's loss, gradient norm and
   updated parameters must equal jaxrob's step (loss to 1e-5 relative: float32). (b) PyTorch's
   own CGPO with the same draws: the fraction of delta's entries equal to jaxrob's after the
   first iteration and after K (RBGM ranks agree where the entries agree; a disagreement is a
   near-tie of the accumulated gradient, swapped by float rounding).
2. Time per step, interleaved in rotating order: jaxrob's jitted ``make_addt_train_step``
   (``fast_vjp=True`` models) under each XLA:CPU setting, and PyTorch's twin
   (``torch_addt.py``: ``torch_ref`` differentiates CGPO's loss with ``loss.backward()`` as the
   reference does, parameter gradients included; ``torch_lean`` asks for delta's gradient
   only). Compile time (lowering + XLA) is reported apart. Ratio = PyTorch time / jaxrob time
   (> 1: jaxrob faster).
3. The plain DDPM train step (``make_ddpm_train_step``, same optimizer, EMA 0.9999) in both,
   with the plain UNet (``fast_vjp=False``, what the trainers build) and its ``fast_vjp=True``
   twin. ``--profile``: one JAX setting's DDPM and ADDT steps under ``jax.profiler.trace``, op
   time by layer kind and by direction (forward / backward / optimizer), joined with the
   optimised HLO, and the slowest ops.

PyTorch: eager, channels_last, the glibc malloc settings, 3 warm-up steps, 1 or 2 threads
(``--torch-threads auto`` times a UNet gradient with both; PERF_NOTES.md section 3).

Run (from the repository root)::

    python benchmarks/bench_addt.py --smoke            # batch 4, K 2, 1 rep: a check
    python benchmarks/bench_addt.py --quick --out benchmarks/results/bench_addt_quick.json
    python benchmarks/bench_addt.py --out benchmarks/results/bench_addt_full.json

Worker processes are this file with ``--jax-setting`` or ``--torch-worker``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker processes, timers, result files)

# name -> (XLA host devices, jaxrob.parallel.YNN_MODES key)
SETTINGS = {"1dev": (1, "all"), "2dev": (2, "all"), "2dev_noconv": (2, "no_conv")}
WORKLOADS = ("addt", "ddpm")
TORCH_RUNS = {"addt": ("torch_ref", "torch_lean"), "ddpm": ("torch",)}
LOSS_RTOL = 1e-5       # |loss_torch - loss_jax| / loss_jax, same inputs and delta
PARAM_TOL = 1e-2       # |p_torch - p_jax| / lr after one AdamW step...
GRAD_TINY = 1e-6       # ... allowed above it only where |g| < this (Adam's eps is 1e-8)
SMOKE = dict(batch=4, num_iters=2, reps=1, settings="2dev", workloads="addt,ddpm")
CKPT = os.path.join(h.REPO, "checkpoints")


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
def _models(fast_vjp):
    from jaxrob.models import load

    ddpm = load(os.path.join(CKPT, "mnist_ddpm"), kind="ddpm", fast_vjp=fast_vjp)
    clf = load(os.path.join(CKPT, "mnist_classifier"), kind="classifier", fast_vjp=fast_vjp)
    return ddpm, clf


def _data(batch):
    """The first ``batch`` MNIST test images and labels (random ones without MNIST)."""
    import numpy as np

    try:
        from jaxrob.data import load_dataset

        ddir = os.environ.get("JAXROB_DATA_DIR") or os.path.join(h.REPO, "..", "shared",
                                                                 "datasets")
        ds = load_dataset("mnist", f"test[:{batch}]", data_dir=ddir)
        return np.array(ds.images, np.float32), np.array(ds.labels, np.int32), "mnist test"
    except (OSError, ValueError) as e:
        rng = np.random.default_rng(0)
        return (rng.uniform(0, 1, (batch, 28, 28, 1)).astype(np.float32),
                (np.arange(batch) % 10).astype(np.int32), f"random ({type(e).__name__})")


def _unet_cfg(module):
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_groups",
            "in_ch", "image_size")
    cfg = {k: getattr(module, k) for k in keys}
    cfg["in_ch"] = cfg["in_ch"] or 1
    cfg["image_size"] = cfg["image_size"] or 28
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, ynn = SETTINGS[setting]
        super().__init__(setting, n_dev, ynn)
        self.compiled = {}

    def prepare(self, dir, batch, write):
        import jax.numpy as jnp
        import numpy as np

        x, y, source = _data(batch)
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        if write:
            ddpm, clf = _models(False)
            h.save_tree(os.path.join(dir, "unet.npz"), ddpm.variables["params"])
            h.save_tree(os.path.join(dir, "clf.npz"), clf.variables)
            s = ddpm.schedule
            np.savez(os.path.join(dir, "setup.npz"), x=x, y=y,
                     sqrt_ab=np.asarray(s.sqrt_alphas_cumprod),
                     sqrt_1m_ab=np.asarray(s.sqrt_one_minus_alphas_cumprod),
                     model_steps=np.asarray(s.model_steps))
            with open(os.path.join(dir, "setup.json"), "w") as f:
                json.dump({"unet_cfg": _unet_cfg(ddpm.module), "data": source,
                           "unet_params": h.count_params(ddpm.variables["params"]),
                           "clf_params": h.count_params(clf.variables["params"])}, f)
        return {"data": source}

    def _mesh(self):
        return self.mesh if self.mesh is not None else self.parallel.make_mesh(1)

    def _state(self, ddpm, tx):
        import jax
        import jax.numpy as jnp
        import jax.random as jr

        from jaxrob import training

        own = jax.tree.map(jnp.copy, dict(ddpm.variables))   # the step donates its state
        state = training.create_train_state(own, tx, jr.key(1))
        return jax.device_put(state, self.parallel.replicated(self._mesh()))

    def _step(self, workload, num_iters):
        """(train step, state, batch, frozen or None) of ``workload``."""
        import jax

        from jaxrob import training
        from jaxrob._jit import partition

        ddpm, clf = _models(workload != "ddpm")
        tx, _ = training.make_addt_optimizer()
        mesh = self._mesh()
        if workload == "addt":
            step = training.make_addt_train_step(ddpm.module.apply, tx, ddpm.schedule, clf,
                                                 num_iters=num_iters, mesh=mesh)
            frozen = jax.device_put(partition(clf)[0], self.parallel.replicated(mesh))
        else:
            step = training.make_ddpm_train_step(ddpm.module.apply, tx, ddpm.schedule,
                                                 ema_decay=0.9999, mesh=mesh)
            frozen = None
        batch = jax.device_put({"image": self.x, "label": self.y},
                               self.parallel.data_sharding(mesh))
        return step, self._state(ddpm, tx), batch, frozen

    def numerics(self, dir, num_iters):
        """jaxrob's step 0 and its draws, written for the PyTorch worker to compare."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        from jaxrob import _keys as tags
        from jaxrob.training import cgpo_delta
        from jaxrob.training._addt import _normal  # the draw the step makes (flat, reshaped)

        t0 = time.perf_counter()
        step, state, batch, _ = self._step("addt", num_iters)
        ddpm, clf = _models(True)
        sched, shape = ddpm.schedule, self.x.shape
        # the randomness of step 0, as make_addt_train_step's docstring describes it
        k_ex, _ = jr.split(jr.fold_in(jr.wrap_key_data(state.key), 0))
        keys = tags.example_keys(k_ex, jnp.arange(shape[0]))
        n = jax.vmap(lambda k: jr.randint(jr.fold_in(k, tags.ADDT_POSITION), (), 0,
                                          sched.num_steps))(keys)
        kc = tags.fold(keys, tags.ADDT_CGPO)
        per_iter = lambda tag: jnp.stack([_normal(tags.fold(tags.fold(kc, tag), k), shape)
                                          for k in range(num_iters)])
        draws = dict(n=n, noise=_normal(tags.fold(keys, tags.ADDT_NOISE), shape),
                     delta0=_normal(tags.fold(kc, tags.ADDT_DELTA), shape),
                     cgpo_noise=per_iter(tags.ADDT_NOISE), fresh=per_iter(tags.ADDT_MAP))
        cg = jax.jit(lambda x, y, n: [cgpo_delta(ddpm, clf, x, n, None, y, kc, schedule=sched,
                                                 num_iters=k) for k in (1, num_iters)])
        delta_1, delta_k = cg(self.x, self.y, n)
        params0 = jax.tree.map(np.asarray, state.params)
        state1, metrics = step(state, batch)
        np.savez(os.path.join(dir, "check_addt.npz"), delta_1=np.asarray(delta_1),
                 delta_k=np.asarray(delta_k), loss=np.asarray(metrics["loss"]),
                 grad_norm=np.asarray(metrics["grad_norm"]),
                 **{k: np.asarray(v) for k, v in draws.items()})
        h.save_tree(os.path.join(dir, "check_params0.npz"), params0)
        h.save_tree(os.path.join(dir, "check_params1.npz"), jax.tree.map(np.asarray,
                                                                          state1.params))
        h.save_tree(os.path.join(dir, "check_ema1.npz"), jax.tree.map(np.asarray,
                                                                      state1.ema_params))
        return {"seconds": time.perf_counter() - t0, "loss": float(metrics["loss"])}

    def setup(self, workload, num_iters):
        """Compile ``workload``'s step (timed), run it twice, register the timed call."""
        import jax

        step, state, batch, frozen = self._step(workload, num_iters)
        extra = () if frozen is None else (frozen,)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch, *extra)
            jax.block_until_ready((holder["state"], metrics))

        warm = h.timed_calls(call, 2)
        self.fns[workload] = call
        self.compiled[workload] = compiled
        try:
            temp = int(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:   # not every backend reports it
            temp = None
        return {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": warm[0][0],
                "second_call_s": warm[1][0], "xla_temp_bytes": temp}

    def profile(self, workload, trace_dir, top):
        """One call of a registered workload under ``jax.profiler.trace``: op time by kind."""
        import jax

        with jax.profiler.trace(os.path.join(trace_dir, workload)):
            self.fns[workload]()
        return _attribute(self.compiled[workload].as_text(), os.path.join(trace_dir, workload),
                          top)

    def release(self):
        self.compiled.clear()
        return super().release()


_KINDS = (("conv", r"conv_general_dilated|conv\d|/conv_in|/conv_out|shortcut"),
          ("groupnorm", r"norm\w*/|GroupNorm"), ("attention", r"attn"), ("silu", r"silu"),
          ("upsample", r"upsample"), ("downsample", r"downsample"),
          ("classifier", r"SmallCNN|/bn\d|/fc/|/out/"), ("rng", r"random|threefry|normal"),
          ("rbgm/sort", r"sort|take_along_axis|gather"),
          ("optimizer/EMA", r"adam|clip|global_norm|ema|optax|apply_updates|scale"))


def _kind(op_name):
    for kind, pat in _KINDS:
        if re.search(pat, op_name):
            return kind
    return "other"


def _direction(op_name):
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "outside AD"


def _conv_windows(text):
    """HLO instruction name -> window sizes of the convolutions it runs (itself, or inside the
    computation a fusion / custom call of it calls)."""
    comps, own, cur = collections.defaultdict(list), {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        m = re.search(r"%?([\w.\-]+) = \S+ convolution\(.*?window=\{size=(\d+)x(\d+)", line)
        if m and cur:
            comps[cur].append(int(m.group(2)))
            own[m.group(1)] = [int(m.group(2))]
    out = dict(own)
    for inst, comp in re.findall(r"%?([\w.\-]+) = .*?(?:calls=|called_computations=\{)"
                                 r"%?([\w.\-]+)", text):
        if comps.get(comp):
            out[inst] = comps[comp]
    return out


def _attribute(text, trace_dir, top):
    """Join the trace's ops with the optimised HLO ``text`` of the executable that ran (each
    instruction's ``op_name`` metadata names the JAX operation and Flax module it came from)."""
    name = re.search(r"HloModule (\S+?),", text).group(1)
    meta = dict(re.findall(r"%?([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", text))
    windows = _conv_windows(text)
    shapes = dict(re.findall(r"%?([\w.\-]+) = (\S+) ", text))
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(max(trace, key=os.path.getmtime)))["traceEvents"]
    by_kind, by_dir, by_op, count = (collections.Counter() for _ in range(4))
    unnamed = 0.0
    for ev in events:
        op = ev.get("args", {}).get("hlo_op") if ev.get("ph") == "X" else None
        if op is None:
            continue
        dur = ev["dur"] / 1e6
        win = windows.get(op)
        if op not in meta and not win:
            unnamed += dur
            continue
        # XLA gives the weight-gradient convolutions' fusions no op_name
        on = meta.get(op, "transpose(jvp(weight-gradient convolution))")
        # a 3x3 UNet kernel's weight gradient is a convolution whose window is the activation
        kind = ("conv weight-grad" if win and max(win) > 4 else "conv" if win else _kind(on))
        by_kind[kind] += dur
        by_dir[_direction(on)] += dur
        by_op[op] += dur
        count[op] += 1
    total = sum(by_kind.values())
    return {"module": name, "op_time_s": total, "unattributed_s": unnamed,
            "by_kind": dict(by_kind.most_common()), "by_direction": dict(by_dir.most_common()),
            "top_ops": [{"op": op, "s": t, "calls": count[op], "shape": shapes.get(op, "?"),
                         "op_name": meta.get(op, "weight-gradient convolution (no op_name)")[-160:]}
                        for op, t in by_op.most_common(top)]}


# ----------------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------------
class TorchWorker(h.TorchWorker):
    SEED = 0
    WARMUP = 3   # oneDNN builds kernels per shape (PERF_NOTES.md section 3)

    def _load(self, dir):
        import numpy as np
        import torch
        from torch_purify import TorchSmallCNN, load_jax_classifier
        from torch_unet import TorchUNet, load_jax_params

        with open(os.path.join(dir, "setup.json")) as f:
            meta = json.load(f)
        cl = torch.channels_last
        unet = load_jax_params(TorchUNet(**meta["unet_cfg"]),
                               h.load_tree(os.path.join(dir, "unet.npz"))).to(memory_format=cl)
        clf = load_jax_classifier(TorchSmallCNN(), h.load_tree(os.path.join(dir, "clf.npz")))
        clf = clf.to(memory_format=cl).eval()
        s = np.load(os.path.join(dir, "setup.npz"))
        return unet, clf, s

    def _trainer(self, dir, num_iters, mode):
        from torch_addt import TorchTrainer

        unet, clf, s = self._load(dir)
        return TorchTrainer(unet, clf, s["sqrt_ab"], s["sqrt_1m_ab"], s["model_steps"],
                            num_iters=num_iters, mode=mode), s

    def prepare(self, dir, threads):
        torch = self.torch
        unet, _, s = self._load(dir)
        x = h.nchw(s["x"])
        t = torch.full((x.shape[0],), 500, dtype=torch.long)

        def grad():   # a UNet training-like backward: parameter gradients
            unet.zero_grad(set_to_none=True)
            (unet(x, t) ** 2).mean().backward()

        return self.pick_threads(grad, threads)

    def numerics(self, dir, num_iters):
        import numpy as np
        import torch

        c = np.load(os.path.join(dir, "check_addt.npz"))
        res = {}
        tr, s = self._trainer(dir, num_iters, "reference")
        x01, y = h.nchw(s["x"]), torch.from_numpy(np.array(s["y"])).long()
        n = torch.from_numpy(np.array(c["n"])).long()
        t = lambda a: h.nchw(a)
        # (a) the step with jaxrob's final delta, noise and positions
        loss, gnorm = tr.addt_step(x01, y, {"n": n, "noise": t(c["noise"]),
                                            "delta": t(c["delta_k"])})
        lj = float(c["loss"])
        res["loss"] = {"torch": float(loss), "jax": lj, "rel": abs(float(loss) - lj) / lj}
        gj = float(c["grad_norm"])
        res["grad_norm"] = {"torch": float(gnorm), "jax": gj, "rel": abs(float(gnorm) - gj) / gj}
        p1 = h.flatten(h.load_tree(os.path.join(dir, "check_params1.npz")))
        p0 = h.flatten(h.load_tree(os.path.join(dir, "check_params0.npz")))
        e1 = h.flatten(h.load_tree(os.path.join(dir, "check_ema1.npz")))
        tp, te = _torch_tree(tr.unet, tr.params), _torch_tree(tr.unet, tr.ema)
        lr = tr.opt.param_groups[0]["lr"]
        dp = np.concatenate([np.abs(tp[k] - p1[k]).ravel() for k in p1]) / lr
        # Adam's first step is lr g / (|g| + eps): where |g| is near eps (1e-8), float rounding
        # of g moves the update by up to 2 lr. PyTorch's gradient of the entries that differ:
        tg = _torch_tree(tr.unet, [p.grad for p in tr.params])
        g = np.concatenate([np.abs(tg[k]).ravel() for k in p1])
        bad = dp >= PARAM_TOL
        res["params"] = {"max_abs_diff_over_lr": float(dp.max()),
                         "frac_within_tol": float(np.mean(~bad)),
                         "grad_abs_max_where_differ": float(g[bad].max()) if bad.any() else 0.0,
                         "grad_abs_median": float(np.median(g)),
                         "max_update_over_lr": max(float(np.abs(p1[k] - p0[k]).max())
                                                   for k in p1) / lr,
                         "ema_max_abs_diff": max(float(np.abs(te[k] - e1[k]).max())
                                                 for k in e1)}
        # (b) CGPO with jaxrob's draws: do the RBGM ranks (hence delta) agree?
        tr, _ = self._trainer(dir, num_iters, "lean")
        rec, acc = [], []
        tr.cgpo(2.0 * x01 - 1.0, y, n, {"delta0": t(c["delta0"]),
                                         "noise": [t(a) for a in c["cgpo_noise"]],
                                         "fresh": [t(a) for a in c["fresh"]]}, record=rec,
                record_acc=acc)
        # the same in float64: how far float32 rounding alone moves the ranks
        tr64, _ = self._trainer(dir, num_iters, "lean")
        tr64.unet.double()
        tr64.clf.double()
        rec64 = []
        d64 = lambda a: h.nchw(a).double()
        tr64.cgpo(2.0 * x01.double() - 1.0, y, n, {"delta0": d64(c["delta0"]),
                                                   "noise": [d64(a) for a in c["cgpo_noise"]],
                                                   "fresh": [d64(a) for a in c["fresh"]]},
                  record=rec64)
        for name, i in (("delta_1", 0), ("delta_k", num_iters - 1)):
            d, dj = h.nhwc(rec[i]), c[name]
            e64 = h.nhwc(rec64[i]).astype(np.float32)
            g = np.abs(h.nhwc(acc[i])).reshape(d.shape[0], -1, d.shape[-1])
            g = (g / g.max(axis=1, keepdims=True)).reshape(d.shape)   # |G| / its row's max
            bad = d != dj
            rows = lambda a: a.reshape(d.shape[0], -1, d.shape[-1])
            corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(
                rows(d).transpose(0, 2, 1).reshape(-1, rows(d).shape[1]),
                rows(dj).transpose(0, 2, 1).reshape(-1, rows(d).shape[1]), strict=True)])
            res[name] = {"frac_equal": float(np.mean(~bad)), "iteration": i + 1,
                         "frac_equal_f64_torch": float(np.mean(d == e64)),
                         "frac_equal_f64_jax": float(np.mean(dj == e64)),
                         "max_abs_diff": float(np.abs(d - dj).max()), "row_corr": float(corr),
                         "mismatch_g_rel_max": float(g[bad].max()) if bad.any() else 0.0,
                         "mismatch_g_rel_median": float(np.median(g[bad])) if bad.any()
                         else 0.0, "g_rel_median": float(np.median(g))}
        return res

    def setup(self, workload, num_iters, run):
        import numpy as np
        import torch

        mode = "lean" if run == "torch_lean" else "reference"
        tr, s = self._trainer(dir=self.dir, num_iters=num_iters, mode=mode)
        x01, y = h.nchw(s["x"]), torch.from_numpy(np.array(s["y"])).long()
        if workload == "addt":
            call = lambda: tr.addt_step(x01, y)
        else:
            call = lambda: tr.ddpm_step(x01)
        warm = h.timed_calls(call, self.WARMUP)
        self.fns[run] = call
        return {"first_call_s": warm[0][0], "warmup_s": [w[0] for w in warm],
                "threads": self.threads}

    def set_dir(self, dir):
        self.dir = dir
        return {}


def _torch_tree(unet, tensors):
    """Flax-named arrays (``m.`` prefix off, torch layout back to Flax's) of ``tensors`` listed
    in ``unet.parameters()`` order."""
    import numpy as np
    from torch import nn

    out = {}
    modules = dict(unet.named_modules())
    for (name, _), v in zip(unet.named_parameters(), tensors, strict=True):
        mod_path, leaf = name.rsplit(".", 1)
        mod = modules[mod_path]
        a = v.detach().numpy()
        path = mod_path[2:]
        if path.endswith(".conv") and ("downsample" in path or "upsample" in path):
            path = path[: -len(".conv")]
        path = path.replace(".", "/")
        if isinstance(mod, nn.Conv2d):
            key, a = ("kernel", a.transpose(2, 3, 1, 0)) if leaf == "weight" else ("bias", a)
        elif isinstance(mod, nn.Linear):
            key, a = ("kernel", a.T) if leaf == "weight" else ("bias", a)
        else:
            key = {"weight": "scale", "bias": "bias"}[leaf]
        out[f"{path}/{key}"] = np.asarray(a)
    return out


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _stats(reps):
    return {**h.call_stats([c for r in reps for c in r], "step"),
            "rep_s": [statistics.median(c[0] for c in r) for r in reps]}


def _ratio(num, den):
    per = [a / b for a, b in zip(num["rep_s"], den["rep_s"], strict=False)]
    return {"ratio": num["s_per_step"] / den["s_per_step"], "rep_min": min(per),
            "rep_max": max(per), "cpu_ratio": num["cpu_s_per_step"] / den["cpu_s_per_step"]}


def _phase(procs, workload, settings, args, out):
    """Set up and time ``workload`` in every JAX setting and its PyTorch runs, interleaved
    (the ``ddpm`` phase also times the ``fast_vjp=True`` UNet's DDPM step, ``*_fastvjp``)."""
    ph = {"workload": workload, "setup": {}, "rows": {}, "ratios": {}}
    todo = [(f"jax_{s}", f"jax_{s}", workload) for s in settings]
    if workload == "ddpm" and not args.no_fastvjp_ddpm:
        todo += [(f"jax_{s}_fastvjp", f"jax_{s}", "ddpm_fastvjp") for s in settings]
    todo += [(run, "torch", workload) for run in TORCH_RUNS[workload]]
    runs = {}
    for row, proc, wl in todo:
        kw = {"run": row} if proc == "torch" else {}
        try:
            t0 = time.time()
            ph["setup"][row] = procs[proc].call("setup", workload=wl,
                                                num_iters=args.num_iters, **kw)
            h.log(f"  setup {row}: {time.time() - t0:.1f}s")
            runs[row] = (proc, {"name": row if proc == "torch" else wl})
        except h.WorkerFailed as e:
            out["errors"].append(f"{workload}/setup/{row}: {e}")
            h.log(f"  ! {e}")
    res = collections.defaultdict(list)
    for rep in range(args.reps):
        got = h.timed_round(procs, runs, rep, out["errors"], f"{workload}/run/")
        for n, calls in got.items():
            res[n].append(calls)
        h.log(f"  {workload}: rep {rep + 1}/{args.reps} done")
    for n, reps in res.items():
        ph["rows"][n] = _stats(reps)
    for t in TORCH_RUNS[workload]:
        for j in ph["rows"]:
            if j.startswith("jax") and t in ph["rows"]:
                ph["ratios"][f"{t}/{j}"] = _ratio(ph["rows"][t], ph["rows"][j])
    return ph


def drive(args):
    t_start = time.time()
    log = h.log
    if args.quick:
        args.reps = args.reps or 3
        args.settings = args.settings or "2dev,2dev_noconv"
    args.reps = args.reps or 5
    settings = [s for s in (args.settings or ",".join(SETTINGS)).split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r}; expected {list(SETTINGS)}")
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown {w!r}; expected {list(WORKLOADS)}")
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_addt_")
    procs = h.start_workers(__file__, settings, tmp, prefix="jax_")
    out = {"meta": h.run_meta(quick=args.quick, smoke=args.smoke, batch=args.batch,
                              num_iters=args.num_iters, reps=args.reps, settings=settings,
                              workloads=workloads, tmp=tmp),
           "numerics": {}, "phases": [], "profile": {}, "errors": []}
    meta = out["meta"]
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        first = f"jax_{settings[0]}"
        meta["data"] = procs[first].call("prepare", dir=tmp, batch=args.batch,
                                         write=True)["data"]
        for n in procs:
            if n.startswith("jax") and n != first:
                procs[n].call("prepare", dir=tmp, batch=args.batch, write=False)
        procs["torch"].call("set_dir", dir=tmp)
        with open(os.path.join(tmp, "setup.json")) as f:
            meta["models"] = json.load(f)
        meta["torch_threads"] = procs["torch"].call("prepare", dir=tmp,
                                                    threads=args.torch_threads)
        log(f"workers ready ({time.time() - t_start:.0f}s); torch {meta['torch_threads']}")
        if not args.no_numerics:
            t0 = time.time()
            try:
                out["numerics"]["jax"] = procs[first].call("numerics", dir=tmp,
                                                           num_iters=args.num_iters)
                out["numerics"].update(procs["torch"].call("numerics", dir=tmp,
                                                           num_iters=args.num_iters))
            except h.WorkerFailed as e:   # recorded; the timings still run
                out["errors"].append(f"numerics: {e}")
            log(f"numerics ({time.time() - t0:.0f}s): {out['numerics']}")
            procs[first].call("release")
        for w in workloads:
            log(f"== {w}")
            out["phases"].append(_phase(procs, w, settings, args, out))
            for pw in ((w, "ddpm_fastvjp") if w == "ddpm" and not args.no_fastvjp_ddpm
                       else (w,)) if args.profile else ():
                try:
                    out["profile"][pw] = procs[first].call(
                        "profile", workload=pw, trace_dir=os.path.join(tmp, "trace"),
                        top=args.profile_top)
                    out["profile"][pw]["setting"] = settings[0]
                except h.WorkerFailed as e:
                    out["errors"].append(f"profile {pw}: {e}")
            for p in procs.values():
                p.call("release")
    finally:
        h.close_all(procs)
    return h.finish(out, render, args.out, t_start)


def _ms(s):
    return f"{s * 1e3:.0f}ms" if s < 10 else f"{s:.1f}s"


def render(out):
    m = out["meta"]
    md = m.get("models", {})
    lines = h.header("bench_addt", m) + [
        f"MNIST DDPM UNet ({md.get('unet_params', '?')} params) + SmallCNN classifier, batch "
        f"{m['batch']} ({m.get('data', '?')}), CGPO K={m['num_iters']} + RBGM, AdamW 2e-4 "
        f"(0.95, 0.999) wd 1e-6, clip 1.0, EMA; torch threads "
        f"{h.torch_threads_text(m.get('torch_threads', {}))}"]
    if m.get("smoke"):
        lines[0] += "  (--smoke)"
    num = out["numerics"]
    if num.get("loss"):
        ok_loss = num["loss"]["rel"] < LOSS_RTOL
        # the updates may differ only where the gradient is of the order of Adam's eps
        ok_p = num["params"].get("grad_abs_max_where_differ", 1.0) < GRAD_TINY
        lines += [
            f"numerics, step 0 with jaxrob's delta, noise and positions fed to PyTorch: loss "
            f"{num['loss']['jax']:.6f} vs {num['loss']['torch']:.6f} (rel {num['loss']['rel']:.1e}"
            f", tol {LOSS_RTOL:g}) {h.ok(ok_loss)}; grad norm rel {num['grad_norm']['rel']:.1e}; "
            f"params after the AdamW step: {100 * num['params']['frac_within_tol']:.3f}% within "
            f"{PARAM_TOL:g} lr, max|diff| {num['params']['max_abs_diff_over_lr']:.2f} lr, where "
            f"they differ |g| <= {num['params'].get('grad_abs_max_where_differ', float('nan')):.1e}"
            f" (median |g| {num['params'].get('grad_abs_median', float('nan')):.1e}; Adam's first "
            f"step is lr g / (|g| + 1e-8)) {h.ok(ok_p)}; EMA "
            f"max|diff| {num['params']['ema_max_abs_diff']:.1e}",
            "  PyTorch's own CGPO on jaxrob's draws: delta entries equal to jaxrob's (RBGM ranks "
            "agree), correlation of the two deltas per row, and where they differ |G| / its "
            "row's max (median over all entries in brackets):"]
        for k in ("delta_1", "delta_k"):
            r = num[k]
            lines.append(f"    after iteration {r['iteration']}: {100 * r['frac_equal']:.2f}% "
                         f"equal, corr {r['row_corr']:.5f}, mismatches at |G|/max <= "
                         f"{r['mismatch_g_rel_max']:.1e} (median {r['mismatch_g_rel_median']:.1e};"
                         f" all entries {r['g_rel_median']:.1e}); equal to a float64 PyTorch run:"
                         f" PyTorch {100 * r['frac_equal_f64_torch']:.2f}%, jaxrob "
                         f"{100 * r['frac_equal_f64_jax']:.2f}%")
    lines.append("\ntime per train step, median [min-max] over interleaved reps; fgn = cores "
                 "other processes used meanwhile")
    lines.append(f"{'workload':<13}{'impl':<17}{'s/step':>9} {'[min-max]':<17}{'n':>3}"
                 f"{'CPU-s':>7}{'util':>6}{'fgn':>6}{'compile':>9}{'first':>8}")
    for ph in out["phases"]:
        for n, r in ph["rows"].items():
            su = ph["setup"].get(n, {})
            comp = f"{su['lower_s'] + su['compile_s']:.1f}s" if "compile_s" in su else "-"
            label = ph["workload"]
            rng = f"[{_ms(r['min_s'])}-{_ms(r['max_s'])}]"
            lines.append(f"{label:<13}{n:<17}{_ms(r['s_per_step']):>9} {rng:<17}{r['n']:>3}"
                         f"{r['cpu_s_per_step']:>7.2f}{r['util']:>6.2f}"
                         f"{r['foreign_load']:>6.2f}{comp:>9}"
                         f"{_ms(su.get('first_call_s', float('nan'))):>8}")
    lines.append("\nratios PyTorch time / jaxrob time (> 1: jaxrob faster), median [per-rep range]"
                 " CPU-time ratio")
    for ph in out["phases"]:
        for k, r in ph["ratios"].items():
            lines.append(f"  {ph['workload']:<13}{k:<30}{r['ratio']:6.2f} "
                         f"[{r['rep_min']:.2f}-{r['rep_max']:.2f}]  cpu {r['cpu_ratio']:.2f}")
    for w, p in out.get("profile", {}).items():
        lines.append(f"\nprofile of one {w} step ({p['setting']}, module {p['module']}): op time "
                     f"{p['op_time_s']:.2f}s (ops run concurrently on XLA's threads; "
                     f"unattributed {p['unattributed_s']:.2f}s)")
        lines.append("  by direction: " + ", ".join(
            f"{k} {100 * v / p['op_time_s']:.0f}%" for k, v in p["by_direction"].items()))
        lines.append("  by kind: " + ", ".join(
            f"{k} {100 * v / p['op_time_s']:.0f}%" for k, v in p["by_kind"].items()))
        for o in p["top_ops"]:
            lines.append(f"  {o['s'] * 1e3:7.1f} ms x{o['calls']:<3} {o['op']:<22} "
                         f"{o['shape'][:40]:<40} {o['op_name'][-90:]}")
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num-iters", type=int, default=5, help="CGPO iterations K")
    ap.add_argument("--reps", type=int, default=0, help="timed steps per run (default 5; "
                    "--quick 3)")
    ap.add_argument("--settings", default=None,
                    help=f"JAX settings of {list(SETTINGS)} (default all; --quick "
                         "2dev,2dev_noconv)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {list(WORKLOADS)}")
    ap.add_argument("--torch-threads", default="auto", choices=("auto", "1", "2"))
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--no-fastvjp-ddpm", action="store_true",
                    help="skip the DDPM step of the fast_vjp=True UNet")
    ap.add_argument("--profile", action="store_true",
                    help="profile the DDPM and ADDT steps in the first JAX setting")
    ap.add_argument("--profile-top", type=int, default=12, help="slowest ops listed")
    ap.add_argument("--quick", action="store_true", help="3 reps, settings 2dev,2dev_noconv")
    h.add_worker_args(ap, smoke=SMOKE)
    args = h.parse_args(ap, argv, SMOKE)
    if not h.serve_if_worker(args, JaxWorker, TorchWorker):
        drive(args)


if __name__ == "__main__":
    main()
