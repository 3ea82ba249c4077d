"""The accelerator run: jaxrob's heavy workloads on one GPU/TPU, PyTorch next to them, one JSON.

Sections (each in its own ``try``: an error is recorded in the JSON and the next section runs;
the JSON is rewritten after every section, so a run cut short keeps what it finished):

* ``env``      -- device kind, backend, device count, JAX / jaxlib / Flax (/ PyTorch) versions;
* ``unet``     -- the Ho et al. CIFAR-10 UNet (``UNET_CONFIGS["cifar10"]``, 35.7M parameters,
  DiffPure's CIFAR-10 size) forward and forward+backward (gradient of ``mean(eps**2)`` w.r.t.
  the parameters) at ``--unet-batch``, in float32 and "bfloat16": float32 storage with the
  convolutions and matmuls at bfloat16 precision (``jax.default_matmul_precision``; the UNet
  takes float32 inputs only), the counterpart of PyTorch's bfloat16 autocast;
* ``attack``   -- one exact-gradient PGD-EoT iteration (EoT mean of the input gradient of the
  CE loss of a ``SmallCNN`` behind ``diffpure(t_star=0.1, num_steps=100, remat=True)``, sign
  step, projection) on batch ``--batch`` of 32x32x3 inputs, EoT 10 and 64 (``--eot``; the
  samples run ``--eot-chunk`` at a time, a ``lax.scan`` over chunks), plus the same program at
  ``--mem-steps`` reverse steps compiled only: XLA's temp memory at both chain lengths says
  whether memory is flat in the step count;
* ``jacobian`` -- the dense (3072 x 3072) Jacobian of a fixed-key DiffPure purifier
  (``--jac-steps`` reverse steps) at one 32x32x3 image, ``jaxrob.analysis.jacobian(...,
  method="jvp_chunks", chunk=--jac-chunk)``;
* ``torch``    -- in a subprocess (so its allocator and JAX's do not share the device): the
  same UNet (``benchmarks/torch_unet.py``, weights copied from JAX, forward checked against
  JAX's) forward / forward+backward in float32 and under bfloat16 autocast, the PyTorch
  reference attack iteration (``benchmarks/torch_purify.py``: eager, ``checkpoint`` per UNet
  call, serial EoT) at the first EoT value, and a chunked forward-mode Jacobian
  (``torch.func.jvp`` under ``torch.func.vmap``); skipped (recorded) when torch is missing.
* ``ratios``   -- PyTorch seconds / jaxrob seconds of each pair (> 1: jaxrob faster), and the
  issue's targets (PGD-EoT 10 >= 3x PyTorch and < 6 s per iteration, flat memory).

Times are the median of ``--reps`` calls after one first call (compile + run, reported as
``first_s``). Peak memory: ``device.memory_stats()["peak_bytes_in_use"]`` after each workload
(the process's running peak, where the backend reports it; None on CPU) and XLA's
``compiled.memory_analysis()`` temp bytes per program (:func:`compiled_memory`, which
``benchmarks/memory_flatness.py`` uses too; the ``attack`` section records all of its fields
at both chain lengths in ``xla_memory_by_steps``).

Run (repository root)::

    python benchmarks/accelerator_suite.py --out benchmarks/results/accelerator.json
    python benchmarks/accelerator_suite.py --smoke --out /tmp/accel_smoke.json    # CPU, < 20 s

``--smoke``: tiny sizes (an 8x8x3 UNet with 8 channels, 4 reverse steps, EoT 2 and 4, a
192-d Jacobian) that run every code path on CPU, PyTorch included (minutes on a loaded 2-core
box: XLA:CPU compiles the UNet's gradient through the reverse chain slowly; a slow test).
``--smoke --tiny-model`` swaps the UNet for a two-convolution eps-model and skips PyTorch:
every JAX code path of the suite in seconds, the CI test. ``--sections`` picks
sections (e.g. ``--sections env,attack``). The torch subprocess is this file with
``--torch-worker``; it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

SECTIONS = ("env", "unet", "attack", "jacobian", "torch")
T_STAR = 0.1
EPS, STEP_SIZE = 8 / 255, 2 / 255
# the speed targets (issue 16): PGD-EoT 10, batch 8, 100 steps, 35.7M-parameter UNet
TARGET_RATIO, TARGET_ITER_S = 3.0, 6.0
FULL = dict(unet="cifar10", unet_batch=64, batch=8, steps=100, mem_steps=10, eot="10,64",
            eot_chunk=10, jac_steps=10, jac_chunk=256, reps=2, image_size=32)
SMOKE = dict(unet_batch=2, batch=2, steps=4, mem_steps=2, eot="2,4", eot_chunk=2, jac_steps=2,
             jac_chunk=64, reps=1, image_size=8)
SMOKE_UNET = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                  num_groups=4, in_ch=3, image_size=8)


def _tiny_eps_module():
    """``--tiny-model``: a two-convolution eps-model with a step embedding, a stand-in for the
    UNet that compiles in seconds on XLA:CPU (the CI smoke test; no PyTorch twin)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class TinyEps(nn.Module):
        @nn.compact
        def __call__(self, x, step, train: bool = False):
            freqs = jnp.arange(1, 5, dtype=jnp.float32)[None, :]
            temb = nn.Dense(4)(jnp.sin(step.astype(jnp.float32)[:, None] / 100.0 * freqs))
            h = nn.Conv(4, (3, 3))(x) + temb[:, None, None, :]
            return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))

    return TinyEps()


def _log(msg: str) -> None:
    print(f"[accelerator_suite] {msg}", file=sys.stderr, flush=True)


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=8)[-3000:]}


def _timed(fn, reps: int) -> dict:
    """``fn()`` once (compile + run: ``first_s``), then ``reps`` times (median ``s``)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "s": statistics.median(times), "calls_s": times}


def _unet_cfg(args) -> dict:
    from jaxrob.models import UNET_CONFIGS

    cfg = dict(SMOKE_UNET) if args.smoke else dict(UNET_CONFIGS[args.unet])
    cfg["dropout"] = 0.0  # eval mode everywhere; PyTorch's twin then needs no train flag
    return cfg


def _json_cfg(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def compiled_memory(compiled) -> dict | None:
    """XLA's buffer assignment of a compiled program (``compiled.memory_analysis()``), in bytes:
    ``temp`` (scratch: activations, residuals), ``argument``, ``output``, ``alias`` (outputs
    that reuse argument buffers), ``generated_code``, and ``total`` = argument + output +
    temp - alias, the device memory the program needs while it runs. Compile-time only (no
    execution); None where the backend does not report it. On XLA:CPU it is XLA:CPU's buffer
    assignment, not a GPU measurement (another backend fuses and schedules differently)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend has it
        return None
    if m is None:
        return None
    get = lambda name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
    out = {k: get(k) for k in ("temp", "argument", "output", "alias", "generated_code")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------------------------
# JAX side (this process)
# ----------------------------------------------------------------------------------------------
class JaxSuite:
    def __init__(self, args, workdir: str, *, save_files: bool = True):
        import jax

        self.args, self.dir, self.save_files = args, workdir, save_files
        self.device = jax.devices()[0]
        self.cfg = _unet_cfg(args)
        if args.fast_vjp is None:
            args.fast_vjp = int(jax.default_backend() == "cpu")
        self._models = None

    # -- helpers -----------------------------------------------------------------------------
    def peak_bytes(self):
        try:
            stats = self.device.memory_stats()
        except Exception:  # not every backend has them
            return None
        return None if not stats else stats.get("peak_bytes_in_use")

    @staticmethod
    def temp_bytes(compiled):
        mem = compiled_memory(compiled)
        return None if mem is None else mem["temp"]

    def compile(self, jitted, args_):
        t0 = time.perf_counter()
        compiled = jitted.lower(*args_).compile()
        return compiled, time.perf_counter() - t0

    def run(self, jitted, args_, reps=None, compiled=None) -> tuple[dict, object]:
        """Compile (timed) unless given, then time ``reps`` calls; XLA temp bytes and the
        running peak. Returns ``(timings, the last call's output)``."""
        import jax

        compile_s = None
        if compiled is None:
            compiled, compile_s = self.compile(jitted, args_)
        last = {}

        def call():
            last["out"] = jax.block_until_ready(compiled(*args_))

        out = _timed(call, self.args.reps if reps is None else reps)
        out.update(compile_s=compile_s, xla_temp_bytes=self.temp_bytes(compiled),
                   peak_bytes_in_use=self.peak_bytes())
        return out, last["out"]

    def models(self):
        """UNet and classifier variables from ``random_variables`` (no ``init`` compile), saved
        for the PyTorch worker, with the inputs every section uses."""
        if self._models is not None:
            return self._models
        import _harness as h
        import jax
        import jax.numpy as jnp
        import numpy as np

        import jaxrob.diffusion as jd
        from jaxrob.models import SmallCNN, random_variables, unet_from_config

        a, cfg = self.args, self.cfg
        size, ch = cfg["image_size"], cfg["in_ch"]
        if a.tiny_model:
            unet = _tiny_eps_module()
            clf = SmallCNN(features=(4,), hidden=8, fast_vjp=bool(a.fast_vjp))
        else:
            unet = unet_from_config(cfg, fast_vjp=bool(a.fast_vjp))
            clf = SmallCNN(features=(32, 64), hidden=128, fast_vjp=bool(a.fast_vjp))
        x1 = jax.ShapeDtypeStruct((1, size, size, ch), jnp.float32)
        uv = random_variables(unet, x1, jax.ShapeDtypeStruct((1,), jnp.int32), seed=1)
        cv = random_variables(clf, x1, seed=2)
        rng = np.random.default_rng(0)
        n = max(a.unet_batch, a.batch)
        inputs = {"x01": rng.uniform(0, 1, (n, size, size, ch)).astype(np.float32),
                  "xt": rng.standard_normal((n, size, size, ch)).astype(np.float32),
                  "t": rng.integers(0, 1000, n).astype(np.int32),
                  "y": (np.arange(n) % 10).astype(np.int32)}
        sched = jd.linear_schedule()
        if self.save_files:  # for the PyTorch worker
            h.save_tree(os.path.join(self.dir, "unet.npz"), uv["params"])
            h.save_tree(os.path.join(self.dir, "clf.npz"), cv)
            np.savez(os.path.join(self.dir, "inputs.npz"), **inputs)
            for s in {a.steps, a.jac_steps}:
                h.save_fields(os.path.join(self.dir, f"chain_{s}.npz"),
                              jd.truncated(sched, T_STAR, s))
        self._models = dict(unet=unet, clf=clf, uv=uv, cv=cv, inputs=inputs, sched=sched,
                            unet_params=h.count_params(uv["params"]),
                            clf_params=h.count_params(cv["params"]))
        return self._models

    # -- sections ----------------------------------------------------------------------------
    def env(self) -> dict:
        import flax
        import jax
        import jaxlib

        out = {"backend": jax.default_backend(), "device_kind": self.device.device_kind,
               "device_count": jax.device_count(), "jax": jax.__version__,
               "jaxlib": jaxlib.__version__, "flax": flax.__version__,
               "smoke": bool(self.args.smoke), "fast_vjp": bool(self.args.fast_vjp),
               "memory_stats_available": self.peak_bytes() is not None}
        try:
            import torch

            out["torch"] = torch.__version__
            out["torch_cuda"] = bool(torch.cuda.is_available())
        except Exception as e:  # torch is optional
            out["torch"] = None
            out["torch_import_error"] = f"{type(e).__name__}: {e}"
        return out

    def unet(self) -> dict:
        import jax
        import jax.numpy as jnp

        m = self.models()
        unet, inp, b = m["unet"], m["inputs"], self.args.unet_batch
        out = {"config": "tiny stand-in" if self.args.tiny_model else _json_cfg(self.cfg),
               "num_params": m["unet_params"], "batch": b}
        params = m["uv"]["params"]
        x, t = jnp.asarray(inp["xt"][:b]), jnp.asarray(inp["t"][:b])
        for dtype in ("float32", "bfloat16"):
            # bfloat16: float32 storage, convolutions and matmuls at bfloat16 precision
            # (jax.default_matmul_precision), as PyTorch's bfloat16 autocast does; the UNet
            # takes float32 inputs only
            precision = "bfloat16" if dtype == "bfloat16" else "float32"
            with jax.default_matmul_precision(precision):
                fwd = jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t))
                loss = lambda p, x, t: jnp.mean(jnp.square(unet.apply({"params": p}, x, t)))
                fwd_bwd = jax.jit(jax.value_and_grad(loss))
                res = {"matmul_precision": precision}
                for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    try:
                        res[name] = self.run(fn, (params, x, t))[0]
                    except Exception as e:
                        res[name] = _error(e)
            out[dtype] = res
        return out

    def _attack_step(self, steps: int, eot: int, *, remat: bool = True, module=None,
                     schedule=None, sampler: str = "ddpm"):
        """``(step(uv, cv, x, x_adv, y, idx, key) -> (x_next, loss), eot_chunk)``: one PGD-EoT
        iteration through ``diffpure(t_star=T_STAR, num_steps=steps)``; the eps-model is
        ``module`` with variables ``uv`` (default: the suite's UNet and linear schedule)."""
        import jax.numpy as jnp

        from jaxrob.attacks import eot_value_and_grad, loss_from_logits, project
        from jaxrob.models import Classifier, DiffusionModel
        from jaxrob.purify import DefendedModel, diffpure, example_keys

        m = self.models()
        unet = m["unet"] if module is None else module
        sched = m["sched"] if schedule is None else schedule
        clf = m["clf"]
        chunk = min(self.args.eot_chunk, eot)
        chunk = chunk if eot % chunk == 0 else eot

        def step(uv, cv, x, x_adv, y, idx, key):
            pur = diffpure(DiffusionModel(unet, uv, sched), t_star=T_STAR, num_steps=steps,
                           sampler=sampler, remat=remat)
            defended = DefendedModel(Classifier(clf, cv), pur)
            logits_fn = lambda z, k: defended(z, example_keys(k, idx))
            loss_B, g = eot_value_and_grad(loss_from_logits(logits_fn), x_adv, y, key,
                                           samples=eot, chunk=chunk)
            return project(x_adv + STEP_SIZE * jnp.sign(g), x, jnp.asarray(EPS), "linf"), loss_B

        return step, chunk

    def attack(self) -> dict:
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        m = self.models()
        a, inp = self.args, m["inputs"]
        x = jnp.asarray(inp["x01"][: a.batch])
        args_ = (m["uv"], m["cv"], x, x, jnp.asarray(inp["y"][: a.batch]),
                 jnp.arange(a.batch, dtype=jnp.uint32), jr.key(0))
        out = {"batch": a.batch, "steps": a.steps, "t_star": T_STAR, "remat": True,
               "classifier": f"SmallCNN(features={tuple(m['clf'].features)}, "
                             f"hidden={m['clf'].hidden})", "clf_params": m["clf_params"],
               "unet_params": m["unet_params"], "nfe_per_iteration": {}}
        eots = [int(e) for e in str(a.eot).split(",")]
        # memory flat in the step count: XLA's temp bytes of the same program at two lengths
        # (the long one is compiled once, here, and timed below)
        mem, programs, full = {}, {}, {}
        for steps in (a.mem_steps, a.steps):
            try:
                step, _ = self._attack_step(steps, eots[0])
                compiled, compile_s = self.compile(jax.jit(step), args_)
                full[str(steps)] = compiled_memory(compiled)  # as benchmarks/memory_flatness.py
                mem[str(steps)] = None if full[str(steps)] is None else full[str(steps)]["temp"]
                programs[steps] = (compiled, compile_s)
            except Exception as e:
                mem[str(steps)] = _error(e)
        out["xla_temp_bytes_by_steps"] = mem
        out["xla_memory_by_steps"] = full
        vals = [v for v in mem.values() if isinstance(v, int)]
        if len(vals) == 2 and vals[0]:
            out["memory_growth_long_over_short"] = vals[1] / vals[0]
        for eot in eots:
            try:
                step, chunk = self._attack_step(a.steps, eot)
                compiled, compile_s = (programs[a.steps] if eot == eots[0] and a.steps in
                                       programs else (None, None))
                res, (x_next, loss) = self.run(jax.jit(step), args_, compiled=compiled)
                res["compile_s"] = res["compile_s"] if compile_s is None else compile_s
                res["eot_chunk"] = chunk
                res["finite"] = bool(np.isfinite(np.asarray(loss)).all())
                res["linf"] = float(jnp.max(jnp.abs(x_next - x)))
                out[f"eot{eot}"] = res
                # UNet evaluations per image: forward + recomputation + backward ~ 3 per step
                out["nfe_per_iteration"][f"eot{eot}"] = 3 * a.steps * eot
            except Exception as e:
                out[f"eot{eot}"] = _error(e)
        return out

    def jacobian(self) -> dict:
        import jax
        import jax.numpy as jnp
        import jax.random as jr

        from jaxrob.analysis import jacobian
        from jaxrob.models import DiffusionModel
        from jaxrob.purify import diffpure

        m = self.models()
        a = self.args
        unet = m["unet"] if not hasattr(m["unet"], "fast_vjp") else m["unet"].clone(
            fast_vjp=False)  # forward mode
        pur = diffpure(DiffusionModel(unet, m["uv"], m["sched"]), t_star=T_STAR,
                       num_steps=a.jac_steps, remat=True)
        key = jr.key(3)
        x = jnp.asarray(m["inputs"]["x01"][:1])
        fn = lambda z: pur(z, key)  # a fixed-key (deterministic) purifier
        run = jax.jit(lambda z: jacobian(fn, z, method="jvp_chunks", chunk=a.jac_chunk))
        res, jac = self.run(run, (x,), reps=1)
        res.update(dim=int(x.size), steps=a.jac_steps, chunk=a.jac_chunk,
                   shape=list(jac.shape), finite=bool(jnp.isfinite(jac).all()),
                   frobenius=float(jnp.linalg.norm(jac)))
        return res


# ----------------------------------------------------------------------------------------------
# PyTorch side (subprocess)
# ----------------------------------------------------------------------------------------------
def torch_worker(args) -> None:
    """The PyTorch reference of every workload; writes ``torch.json`` in ``--workdir``."""
    import _harness as h
    import numpy as np
    import torch
    from torch_purify import Chain, TorchSmallCNN, attack_iteration, load_jax_classifier, purify
    from torch_unet import TorchUNet, load_jax_params

    path = os.path.join(args.workdir, "torch.json")
    out = {"torch": torch.__version__}

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    torch.set_default_device(dev)  # the references create their tensors without a device
    if dev.type == "cpu":  # smoke runs: OpenMP's spinning threads stall on a busy machine
        torch.set_num_threads(1)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    def timed(fn, reps):
        def call():
            fn()
            sync()
        return _timed(call, reps)

    def peak():
        return int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None

    meta = json.loads(open(os.path.join(args.workdir, "meta.json")).read())
    cfg, reps = meta["unet_cfg"], int(meta["reps"])
    inp = np.load(os.path.join(args.workdir, "inputs.npz"))
    unet = load_jax_params(TorchUNet(**cfg), h.load_tree(os.path.join(args.workdir, "unet.npz")))
    unet = unet.to(dev).eval()
    t_ = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    nchw = lambda a: t_(np.asarray(a).transpose(0, 3, 1, 2))
    b = int(meta["unet_batch"])
    xt, tt = nchw(inp["xt"][:b]), t_(inp["t"][:b]).long()
    try:  # the copied weights compute JAX's eps (the JAX side saved its float32 output)
        with torch.no_grad():
            eps = unet(xt, tt).cpu().numpy().transpose(0, 2, 3, 1)
        ref = np.load(os.path.join(args.workdir, "jax_eps.npy"))
        out["unet_parity_max_abs"] = float(np.abs(eps - ref).max())
    except Exception as e:
        out["unet_parity"] = _error(e)
    save()
    # UNet forward / forward+backward, float32 and bfloat16 autocast
    out["unet"] = {}
    for dtype in ("float32", "bfloat16"):
        res = {}
        ctx = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bfloat16"
               else contextlib.nullcontext)

        def fwd():
            with torch.no_grad(), ctx():
                unet(xt, tt)

        def fwd_bwd():
            unet.zero_grad(set_to_none=True)
            with ctx():
                loss = unet(xt, tt).float().square().mean()
            loss.backward()

        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            try:
                res[name] = {**timed(fn, reps), "peak_bytes": peak()}
            except Exception as e:
                res[name] = _error(e)
        out["unet"][dtype] = res
        save()
    unet.zero_grad(set_to_none=True)
    # the reference PGD-EoT iteration (eager, checkpoint per UNet call, serial EoT)
    try:
        clf = TorchSmallCNN(features=(32, 64), hidden=128, in_ch=cfg["in_ch"],
                            image_size=cfg["image_size"])
        clf = load_jax_classifier(clf, h.load_tree(os.path.join(args.workdir, "clf.npz")))
        clf = clf.to(dev).eval()
        chain = Chain(np.load(os.path.join(args.workdir, f"chain_{meta['steps']}.npz")))
        bb = int(meta["batch"])
        x, y = nchw(inp["x01"][:bb]), t_(inp["y"][:bb]).long()
        eot = int(meta["torch_eot"])
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = timed(lambda: attack_iteration(unet, clf, chain, x, x, y, eot=eot, eps=EPS,
                                             step_size=STEP_SIZE), reps=1)
        out["attack"] = {**res, "eot": eot, "steps": int(meta["steps"]), "batch": bb,
                         "peak_bytes": peak()}
    except Exception as e:
        out["attack"] = _error(e)
    save()
    # the dense Jacobian by forward-mode chunks (fixed noise: a deterministic map)
    try:
        chain = Chain(np.load(os.path.join(args.workdir, f"chain_{meta['jac_steps']}.npz")))
        x1 = nchw(inp["x01"][:1])
        gen = torch.Generator(device=dev).manual_seed(0)
        noise = torch.randn(x1.shape, generator=gen, device=dev)
        steps_noise = [torch.randn(x1.shape, generator=gen, device=dev)
                       for _ in range(chain.num_steps)]
        f = lambda v: purify(unet, v, chain, use_checkpoint=False, noise=noise,
                             step_noises=steps_noise).reshape(-1)
        d, chunk = x1.numel(), int(meta["jac_chunk"])

        def jac():
            cols = []
            for s in range(0, d, chunk):
                basis = torch.eye(d, device=dev)[s:s + chunk].reshape(-1, *x1.shape)
                jvp = lambda v: torch.func.jvp(f, (x1,), (v,))[1]
                cols.append(torch.func.vmap(jvp)(basis))
            return torch.cat(cols).T

        with torch.no_grad():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            res = timed(jac, reps=0)
        out["jacobian"] = {**res, "dim": d, "chunk": chunk, "steps": chain.num_steps,
                           "peak_bytes": peak()}
    except Exception as e:
        out["jacobian"] = _error(e)
    save()


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _run_torch(args, suite: JaxSuite, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.tiny_model:
        return {"skipped": "--tiny-model: the stand-in eps-model has no PyTorch twin"}
    try:
        import torch  # noqa: F401
    except Exception as e:
        return {"skipped": f"torch not installed ({type(e).__name__}: {e})"}
    m = suite.models()
    b = args.unet_batch
    eps = jax.jit(lambda p, x, t: m["unet"].apply({"params": p}, x, t))(
        m["uv"]["params"], jnp.asarray(m["inputs"]["xt"][:b]), jnp.asarray(m["inputs"]["t"][:b]))
    np.save(os.path.join(workdir, "jax_eps.npy"), np.asarray(eps))
    meta = {"unet_cfg": _json_cfg(suite.cfg), "reps": args.reps, "unet_batch": b,
            "batch": args.batch, "steps": args.steps, "jac_steps": args.jac_steps,
            "jac_chunk": args.jac_chunk,
            "torch_eot": int(str(args.eot).split(",")[0])}
    with open(os.path.join(workdir, "meta.json"), "w") as f:
        json.dump(meta, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--workdir", workdir]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.torch_timeout)
        rc, tail = proc.returncode, (proc.stderr or "")[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stderr or "")[-2000:]
    path = os.path.join(workdir, "torch.json")
    out = json.loads(open(path).read()) if os.path.exists(path) else {}
    out["wall_s"] = time.perf_counter() - t0
    if rc != 0:
        out["error"] = f"torch worker exit status {rc}"
        out["stderr_tail"] = tail
    return out


def _ratios(result: dict) -> dict:
    """PyTorch seconds / jaxrob seconds (> 1: jaxrob faster), and the issue's targets."""
    s = result["sections"]
    jx, tc = s.get("unet", {}), s.get("torch", {})
    out = {}
    for dtype in ("float32", "bfloat16"):
        for name in ("fwd", "fwd_bwd"):
            a = jx.get(dtype, {}).get(name, {}).get("s")
            b = tc.get("unet", {}).get(dtype, {}).get(name, {}).get("s")
            if a and b:
                out[f"unet_{name}_{dtype}"] = b / a
    att = s.get("attack", {})
    t_att = tc.get("attack", {})
    if t_att.get("s") and att.get(f"eot{t_att.get('eot')}", {}).get("s"):
        j = att[f"eot{t_att['eot']}"]["s"]
        out[f"attack_eot{t_att['eot']}"] = t_att["s"] / j
    j_jac, t_jac = s.get("jacobian", {}).get("s"), tc.get("jacobian", {}).get("first_s")
    if j_jac and t_jac:
        out["jacobian"] = t_jac / j_jac
    targets = {}
    e10 = att.get("eot10", {}).get("s")
    if e10 is not None and att.get("steps") == 100:
        targets["pgd_eot10_iteration_s"] = e10
        targets["under_6s"] = e10 < TARGET_ITER_S
        if "attack_eot10" in out:
            targets["at_least_3x_torch"] = out["attack_eot10"] >= TARGET_RATIO
    if "memory_growth_long_over_short" in att:
        targets["memory_growth_long_over_short"] = att["memory_growth_long_over_short"]
    out["targets"] = targets
    return out


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="the JSON to write (required unless --torch-worker)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: a check")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--tiny-model", action="store_true",
                   help="a two-conv stand-in for the UNet (with --smoke: the CI test; no torch)")
    p.add_argument("--torch-timeout", type=float, default=None,
                   help="seconds for the PyTorch subprocess (default 240; smoke 180)")
    p.add_argument("--fast-vjp", type=int, choices=(0, 1), default=None,
                   help="jaxrob's custom conv VJPs (1: an XLA:CPU speed-up; default: 1 on CPU "
                        "only)")
    for k in ("unet_batch", "batch", "steps", "mem_steps", "eot_chunk", "jac_steps",
              "jac_chunk", "reps"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--eot", default=None, help="EoT sample counts, comma-separated")
    p.add_argument("--unet", default=FULL["unet"], help="UNET_CONFIGS name (not with --smoke)")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        return args
    if not args.out:
        p.error("--out is required")
    defaults = {**FULL, **(SMOKE if args.smoke else {})}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.torch_timeout is None:
        args.torch_timeout = 180.0 if args.smoke else 240.0
    bad = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if bad:
        p.error(f"--sections: unknown {bad}; expected a subset of {list(SECTIONS)}")
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.torch_worker:
        torch_worker(args)
        return {}
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.tiny_model and not args.smoke:
        raise SystemExit("--tiny-model: only with --smoke")
    t_start = time.perf_counter()
    result = {"suite": "accelerator_suite", "argv": sys.argv[1:] if argv is None else argv,
              "settings": {k: getattr(args, k) for k in FULL}, "sections": {},
              "section_s": {}}
    result["settings"]["smoke"] = bool(args.smoke)

    def write():
        result["total_s"] = time.perf_counter() - t_start
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, args.out)

    wanted = args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="accel_suite_") as workdir:
        suite = None
        try:
            suite = JaxSuite(args, workdir)
        except Exception as e:
            result["sections"]["setup"] = _error(e)
        for name in SECTIONS:
            if name not in wanted or suite is None:
                continue
            _log(f"section {name} ...")
            t0 = time.perf_counter()
            try:
                if name == "torch":
                    result["sections"][name] = ({"skipped": "--no-torch"} if args.no_torch
                                                else _run_torch(args, suite, workdir))
                else:
                    result["sections"][name] = getattr(suite, name)()
            except Exception as e:
                result["sections"][name] = _error(e)
            result["section_s"][name] = time.perf_counter() - t0
            _log(f"section {name}: {result['section_s'][name]:.1f} s")
            result["ratios"] = _ratios(result)
            write()
    result["ratios"] = _ratios(result)
    write()
    return result


if __name__ == "__main__":
    res = main()
    if res:
        errors = [k for k, v in res["sections"].items() if isinstance(v, dict) and "error" in v]
        print(json.dumps({"out": res.get("settings"), "ratios": res.get("ratios"),
                          "section_errors": errors, "total_s": res.get("total_s")},
                         indent=1, default=str))
