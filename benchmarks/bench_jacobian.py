"""Jacobians of a fixed-key DiffPure purifier on CPU: dense (jaxrob vs PyTorch) and matrix-free.

The map studied is a purifier with its randomness fixed, ``f(x) = purify(x, key)``: a DDPM
DiffPure purifier (``jaxrob.purify.diffpure``, t* = 0.1 of the linear 1000-step schedule, a
10-step respaced reverse chain, one key for the forward noise and every reverse-step noise).
Its Jacobian at one image says how the purifier deforms an eps-ball (Yuezhang & Wei 2025).

Part 1 -- the dense 784 x 784 Jacobian of the MNIST purifier (the committed export
``checkpoints/mnist_ddpm``, a 280,177-parameter UNet; the input is the first MNIST test digit,
or a uniform random image when the dataset is absent), side by side with PyTorch on the same
network, weights and noise.

* jaxrob routes: ``jaxrob.analysis.jacobian`` with ``method="jacfwd"`` and ``"jvp_chunks"``
  (the ``fast_vjp=False`` UNet: forward mode) and ``"vjp_chunks"`` / ``"jacrev"`` (the
  ``fast_vjp=True`` UNet), on 1 XLA device (YNN fusions off, ``1dev_noynn``) and on 2 host
  devices (``2dev``, ``mesh=``: the directions are split over a ``data`` mesh). The weights
  are an argument of the jitted program.
* PyTorch routes (``benchmarks/torch_purify.py``: the same chain with the schedule arrays
  exported from JAX and jaxrob's forward and per-step noise handed over as tensors; the UNet is
  ``benchmarks/torch_unet.py`` with the Flax weights copied in): ``torch.func.jacrev`` with
  ``chunk_size`` (the fastest PyTorch route measured before), ``torch.autograd.functional.
  jacobian(vectorize=True)`` and ``torch.func.jacfwd``. Eager, channels_last, glibc malloc
  tuning, one warm-up call; threads: ``--torch-threads auto`` times a UNet input-gradient with
  1 and 2 threads and keeps the faster (2 on an idle 2-core machine).
* Numerics in the same run: the purified image of both frameworks, and every route's Jacobian
  against the reference (the first jaxrob route): max |J - J_ref|, relative Frobenius error,
  and the singular values (max |s - s_ref| / s_ref[0]).
* Timing: each framework/setting is its own long-lived worker process (XLA flags are fixed at
  start-up); every route is compiled (timed separately: lowering + XLA compile) and called once
  before the timed calls, which are interleaved (each repetition calls every route once, in
  rotating order). Reported: median [min-max] seconds per Jacobian, CPU-seconds, cores used
  (``util``), the cores other processes used meanwhile (``fgn``), the peak RSS of the route's
  first call (``VmHWM`` reset just before it) and, for JAX, XLA's temp buffer size. The ratio
  is fastest PyTorch median / fastest jaxrob median (> 1: jaxrob faster; target >= 1.5).

Part 2 -- matrix-free top-k singular values, ``jaxrob.analysis.top_singular_values`` (Lanczos on
J^T J and randomized SVD; ``ad="jvp"`` with the ``fast_vjp=False`` UNet, ``ad="vjp"`` with the
``fast_vjp=True`` UNet), in the 1-device worker, one call each (compile timed separately, up to
3 calls when a call is short):

* ``mnist@28``: the Part 1 purifier (784-d), k = 5, 20, 40; its top-k is compared with the
  dense SVD of the Part 1 Jacobian (the correctness column).
* ``cifar@S``: the ``jaxrob.models.UNET_CONFIGS["cifar10"]`` UNet (ch 128, 35.7M parameters),
  **randomly initialised** -- no pretrained CIFAR-10 DDPM exists in this project -- with
  ``zero_init=False`` (with Ho et al.'s zero-initialised output layers a random UNet returns
  eps ~ 0 and J ~ c I) and dropout 0, on S x S x 3 inputs (uniform random image; S = 32 is
  the 3072-d CIFAR-10 case). For S != 32 only ``image_size`` changes and attention stays at
  the second level (``attn_resolutions=(S // 2,)``), so every size runs the same weights.
* products: Lanczos with m steps does m J-products and m J^T-products (m = ``num_iters``,
  default max(2k + 1, 20)); the randomized method with l = k + 10 probes and q = 4 power
  iterations does l (q + 1) of each (in batches of l). ``s/product`` = wall / products.
* ``ad="mixed"`` rows: ``top_singular_values(..., ad="mixed", f_reverse=...)``, whose
  J-products come from ``jax.linearize`` of the ``fast_vjp=False`` UNet and J^T-products from
  ``jax.vjp`` of the ``fast_vjp=True`` UNet. ``ad="jvp"`` and ``ad="vjp"`` each derive one of
  the two products by transposing the other, and a transposed convolution inside
  the chain's ``lax.scan`` takes XLA:CPU's slow path (the conv-VJP finding in README.md); the
  operator table (``--ops``) times each kind of product alone.

Run (from the repository root)::

    python benchmarks/bench_jacobian.py --smoke --out /tmp/bench_jacobian_smoke.json   # a check
    python benchmarks/bench_jacobian.py --quick --out /tmp/bench_jacobian_quick.json
    python benchmarks/bench_jacobian.py --out benchmarks/results/bench_jacobian_full.json

``--quick``: 2 reps of 5 dense routes, top-k of the 784-d purifier, one 16x16x3 CIFAR-config
top-5; it took 9.2 min while other jobs kept one of the two cores busy (about half that on an
idle machine). The full mode (``FULL_ROUTES`` x 3 reps, ``FULL_OPS``, ``FULL_SVD``) is
estimated at 15-18 min on an idle 2-core machine, about 6 of them the 3072-d CIFAR-config
top-20. Other grids: ``--routes``, ``--svd``, ``--ops`` (e.g. ``--no-dense --ops cifar@32
--svd cifar@32:lanczos:jvp:20,cifar@32:randomized:vjp:20,cifar@64:lanczos:vjp:20``; each
CIFAR-config row at 32x32 takes several minutes). Everything is also in ``--out`` (JSON, with
every call, plus a ``.txt`` copy of the printed table). Worker processes are this file with
``--jax-setting`` or ``--torch-worker``; they are not meant to be run by hand.

References:
  Yuezhang, Wei. How Do Diffusion Models Improve Adversarial Robustness? arXiv 2505.22839.
  Nie et al. Diffusion Models for Adversarial Purification. ICML 2022.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker processes, timers, result files)

# name -> (XLA host devices, jaxrob.parallel YNN mode); the first four as in bench_attack.py;
# "noconv": YNN fusions for dots / elementwise / reductions, convolutions by XLA's own kernels
SETTINGS = {"1dev": (1, "all"), "2dev": (2, "all"), "1dev_noynn": (1, "off"),
            "2dev_noynn": (2, "off"), "1dev_noconv": (1, "no_conv"), "2dev_noconv": (2, "no_conv")}
JAX_METHODS = ("jacfwd", "jacrev", "jvp_chunks", "vjp_chunks")
TORCH_METHODS = ("jacrev", "autograd_vec", "jacfwd")
# Part 1 routes, "setting:method[/chunk]"; "torch:..." for PyTorch.
# 2 devices run with XLA's default fusions: with the YNN fusions off (2dev_noynn), a few columns
# of the sharded jvp_chunks Jacobian came out wrong, differently from run to run (README.md;
# add "2dev_noynn:jvp_chunks/112" to --routes to see it). A route whose Jacobian fails the check
# is timed but left out of the ratio.
FULL_ROUTES = ("1dev_noynn:jvp_chunks/112", "1dev_noynn:jvp_chunks/392", "1dev_noynn:jacfwd",
               "1dev_noynn:vjp_chunks/112", "1dev_noynn:jacrev",
               "2dev:jvp_chunks/112", "2dev:vjp_chunks/112", "2dev_noconv:vjp_chunks/112",
               "2dev_noconv:vjp_chunks/196", "2dev_noconv:jvp_chunks/112",
               "torch:jacrev/112", "torch:autograd_vec", "torch:jacfwd")
QUICK_ROUTES = ("1dev_noynn:jvp_chunks/112", "1dev_noynn:vjp_chunks/112",
                "2dev:jvp_chunks/112", "torch:jacrev/112", "torch:autograd_vec")
# Part 2, "net@size:method:ad:k"
FULL_SVD = ("mnist@28:lanczos:jvp:20", "mnist@28:lanczos:vjp:20", "mnist@28:lanczos:mixed:20",
            "mnist@28:randomized:jvp:20", "mnist@28:lanczos:jvp:5", "mnist@28:lanczos:jvp:40",
            "mnist@28:randomized:jvp:5", "mnist@28:randomized:mixed:20",
            "cifar@16:lanczos:vjp:20", "cifar@16:lanczos:mixed:20", "cifar@32:lanczos:mixed:20",
            "cifar@32:lanczos:mixed:5", "cifar@48:lanczos:mixed:20")
QUICK_SVD = ("mnist@28:lanczos:jvp:20", "mnist@28:lanczos:vjp:20", "mnist@28:lanczos:mixed:20",
             "mnist@28:randomized:jvp:5", "cifar@16:lanczos:vjp:5")
FULL_OPS = ("mnist@28",)
QUICK_OPS = ("mnist@28",)
# operator table: name -> what one product is
OPS = {"fwd": "f(x): the purifier itself (fast_vjp=True UNet)",
       "J:linearize": "J v, jax.linearize of the fast_vjp=False UNet (ad='jvp')",
       "JT:vjp": "J^T u, jax.vjp of the fast_vjp=True UNet (ad='vjp')",
       "JT:transpose(linearize)": "J^T u, transpose of the linearized JVP (ad='jvp')",
       "J:transpose(vjp)": "J v, transpose of the fast VJP (ad='vjp')"}
OPS_APPLY = 3           # products per timed operator call (applied in a fori_loop)
PURIFY_SEED = 0         # the purifier's fixed key: jr.key(PURIFY_SEED)
CIFAR_SEED = 1          # random CIFAR-config UNet weights and inputs
T_STAR, STEPS = 0.1, 10  # the purifier (--steps changes the reverse steps)
JAC_RTOL = 1e-4         # relative Frobenius error allowed between routes
PUR_TOL = 1e-4          # max |purified_torch - purified_jax|
TARGET = 1.5            # fastest torch / fastest jaxrob
SHORT_CALL_S = 3.0      # Part 2: calls shorter than this get two more timed calls
# --smoke: the smallest run of every code path (2-step purifier, one JAX and one torch route)
SMOKE = dict(steps=2, reps=1, routes="1dev_noynn:jvp_chunks/392,torch:jacrev/392",
             svd="mnist@28:lanczos:mixed:2", ops="")


def _parse_route(tok):
    """'setting:method[/chunk]' -> (setting, method, chunk)."""
    try:
        setting, rest = tok.split(":")
        method, _, chunk = rest.partition("/")
        chunk = int(chunk) if chunk else None
    except ValueError:
        raise ValueError(f"route {tok!r}: expected 'setting:method[/chunk]'") from None
    if setting == "torch":
        if method not in TORCH_METHODS:
            raise ValueError(f"route {tok!r}: torch method must be one of {TORCH_METHODS}")
        if chunk is not None and method != "jacrev":
            raise ValueError(f"route {tok!r}: only torch jacrev takes a chunk")
    else:
        if setting not in SETTINGS:
            raise ValueError(f"route {tok!r}: setting must be one of {list(SETTINGS)} or torch")
        if method not in JAX_METHODS:
            raise ValueError(f"route {tok!r}: method must be one of {JAX_METHODS}")
        if (chunk is None) != (method in ("jacfwd", "jacrev")):
            raise ValueError(f"route {tok!r}: jvp_chunks/vjp_chunks need a chunk, "
                             f"jacfwd/jacrev take none")
    return setting, method, chunk


def _parse_svd(tok):
    """'net@size:method:ad:k' -> dict."""
    try:
        netsize, method, ad, k = tok.split(":")
        net, size = netsize.split("@")
        size, k = int(size), int(k)
    except ValueError:
        raise ValueError(f"svd spec {tok!r}: expected 'net@size:method:ad:k'") from None
    if net not in ("mnist", "cifar") or (net == "mnist" and size != 28):
        raise ValueError(f"svd spec {tok!r}: net must be mnist@28 or cifar@S")
    if net == "cifar" and (size % 8 or size < 16):
        raise ValueError(f"svd spec {tok!r}: cifar sizes must be multiples of 8, >= 16")
    if method not in ("lanczos", "randomized") or ad not in ("jvp", "vjp", "mixed"):
        raise ValueError(f"svd spec {tok!r}: method lanczos|randomized, ad jvp|vjp|mixed")
    return {"name": tok, "net": net, "size": size, "method": method, "ad": ad, "k": k}


def _products(method, k, d):
    """(num_iters, J-products, J^T-products) of top_singular_values' defaults."""
    if method == "lanczos":
        m = min(d, max(2 * k + 1, 20))
        return m, m, m
    ell = min(k + 10, d)
    return 4, ell * 5, ell * 5


# ----------------------------------------------------------------------------------------------
# JAX worker
# ----------------------------------------------------------------------------------------------
class JaxWorker(h.JaxWorker):
    def __init__(self, setting):
        n_dev, ynn = SETTINGS[setting]
        super().__init__(setting, n_dev, ynn)
        self.cifar = None

    # ------------------------------------------------------------------ models and purifiers
    def prepare(self, dir, ckpt, write, steps=STEPS):
        """Load the MNIST DDPM export; the first worker also writes what the others need."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import jaxrob.diffusion as jd
        from jaxrob.models import UNET_CONFIGS, load

        self.steps = steps
        self.ddpm = load(os.path.join(h.REPO, ckpt), kind="ddpm")   # the fast_vjp=False UNet
        self.params = self.ddpm.variables
        self.key = jr.key(PURIFY_SEED)
        # the UNet's configuration, for the PyTorch twin
        unet_cfg = {k: getattr(self.ddpm.module, k) for k in UNET_CONFIGS["mnist"]}
        info = {"ckpt": ckpt, "unet_cfg": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in unet_cfg.items()},
                "unet_params": self.ddpm.num_params}
        if write:
            x, source = h.mnist_test_image()
            np.save(os.path.join(dir, "x.npy"), x)
            h.save_tree(os.path.join(dir, "unet.npz"), self.params["params"])
            h.save_fields(os.path.join(dir, "chain.npz"),
                          jd.truncated(self.ddpm.schedule, T_STAR, steps))
            # jaxrob.purify's noise (module docstring): forward normal(fold_in(key, 0)), reverse
            # position n normal(fold_in(fold_in(key, 1), n)) -- handed to PyTorch.
            k_rev = jr.fold_in(self.key, 1)
            np.savez(os.path.join(dir, "noise.npz"),
                     noise=np.asarray(jr.normal(jr.fold_in(self.key, 0), x.shape)),
                     step_noise=np.stack([np.asarray(jr.normal(jr.fold_in(k_rev, n), x.shape))
                                          for n in range(steps)]))
            with open(os.path.join(dir, "setup.json"), "w") as f:
                json.dump({**info, "input": source, "x_shape": list(x.shape)}, f)
            y = jax.jit(self._mnist_f(False))(self.params, jnp.asarray(x))
            np.save(os.path.join(dir, "purified_jax.npy"), np.asarray(y))
        self.x = jnp.asarray(np.load(os.path.join(dir, "x.npy")))
        return info

    def _purifier(self, ddpm):
        """``f(x)``: the fixed-key DDPM purifier of the eps-model ``ddpm``."""
        from jaxrob.purify import diffpure

        pur = diffpure(ddpm, t_star=T_STAR, num_steps=self.steps, sampler="ddpm")
        return lambda z: pur(z, self.key)

    def _mnist_f(self, fast_vjp):
        """``f(params, x)``: the fixed-key purifier of the MNIST DDPM (weights an argument,
        the schedule a constant)."""
        ddpm = self.ddpm.with_fast_vjp(fast_vjp)
        return lambda params, x: self._purifier(ddpm.replace(variables=params))(x)

    def _cifar(self, size):
        """``(f_builder(fast_vjp), params, x)`` for the random CIFAR-config UNet at size S."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr

        import jaxrob.diffusion as jd
        from jaxrob.models import DiffusionModel, unet_from_config

        kw = dict(image_size=size, attn_resolutions=(size // 2,), zero_init=False, dropout=0.0)
        if self.cifar is None:   # the weights do not depend on the image size (see docstring)
            u = unet_from_config("cifar10", **dict(kw, image_size=32, attn_resolutions=(16,)))
            x32 = jnp.zeros((1, 32, 32, 3))
            self.cifar = jax.jit(u.init)(jr.key(CIFAR_SEED), x32, jnp.zeros((1,), jnp.int32))
        sched = jd.linear_schedule()
        x = jr.uniform(jr.fold_in(jr.key(CIFAR_SEED), size), (1, size, size, 3))

        def make(fast_vjp):
            unet = unet_from_config("cifar10", **kw, fast_vjp=fast_vjp)
            return lambda params, z: self._purifier(DiffusionModel(unet, params, sched))(z)

        return make, self.cifar, x, h.count_params(self.cifar)

    def _net(self, net, size):
        """``(make(fast_vjp) -> f(params, x), params, x, number of parameters)``."""
        if net == "mnist":
            return self._mnist_f, self.params, self.x, self.ddpm.num_params
        return self._cifar(size)

    # ------------------------------------------------------------------ Part 1
    def setup(self, name, method, chunk, dir):
        """Compile one dense-Jacobian route (timed), call it once (timed, peak RSS), save J."""
        import jax
        import numpy as np

        from jaxrob.analysis import jacobian

        f = self._mnist_f(method in ("jacrev", "vjp_chunks"))
        kw = {} if chunk is None else {"chunk": chunk, "mesh": self.mesh}
        fn = jax.jit(lambda params, x: jacobian(lambda z: f(params, z), x, method=method,
                                                **kw))
        args = (self.params, self.x)
        info = h.compile_timed(fn, args)
        compiled = info.pop("compiled")
        call = lambda: jax.block_until_ready(compiled(*args))
        info.update(h.first_call(call))
        J = info.pop("out")
        np.save(os.path.join(dir, f"J_{name.replace(':', '_').replace('/', '_')}.npy"),
                np.asarray(J))
        self.fns[name] = call
        return info

    # ------------------------------------------------------------------ Part 2
    def ops(self, net, size):
        """Seconds per product of each operator (``OPS``), ``OPS_APPLY`` products per call."""
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        from jax import lax

        make, params, x, n_params = self._net(net, size)
        f_slow, f_fast = make(False), make(True)
        d = int(x.size)
        flat = lambda f, params: (lambda v: jnp.reshape(f(params, jnp.reshape(v, x.shape)),
                                                        (-1,)))

        def operator(which, params, v):
            if which == "fwd":
                return lambda q: flat(f_fast, params)(v + 0.0 * q)
            if which in ("J:linearize", "JT:transpose(linearize)"):
                _, jvp = jax.linearize(flat(f_slow, params), v)
                if which == "J:linearize":
                    return jvp
                jt = jax.linear_transpose(jvp, v)
                return lambda u: jt(u)[0]
            y, vjp = jax.vjp(flat(f_fast, params), v)
            if which == "JT:vjp":
                return lambda u: vjp(u)[0]
            jv = jax.linear_transpose(lambda u: vjp(u)[0], y)
            return lambda w: jv(w)[0]

        def program(which):
            def fn(params, v, q):
                op = operator(which, params, v)
                # sequential products, as inside Lanczos / power iterations
                return lax.fori_loop(0, OPS_APPLY, lambda i, q: op(q) / jnp.linalg.norm(q), q)
            return jax.jit(fn)

        v = jnp.reshape(x, (-1,))
        q = jr.normal(jr.key(7), (d,))
        rows = {}
        for which in OPS:
            args = (params, v, q)
            info = h.compile_timed(program(which), args)
            compiled = info.pop("compiled")
            call = lambda: jax.block_until_ready(compiled(*args))  # noqa: B023
            info.update(h.first_call(call))
            info.pop("out")
            calls = ([info["first_call"]] if info["first_call_s"] > SHORT_CALL_S
                     else h.timed_calls(call, 2))
            walls = [c[0] for c in calls]
            rows[which] = {**info, "calls": calls, "s_per_call": statistics.median(walls),
                           "s_per_product": statistics.median(walls) / OPS_APPLY,
                           "foreign_load": sum(c[2] for c in calls) / sum(walls)}
        return {"net": net, "size": size, "d": d, "unet_params": n_params, "rows": rows}

    def topk(self, spec, dir):
        """One ``top_singular_values`` configuration: compile (timed), 1-3 timed calls."""
        import jax
        import numpy as np

        from jaxrob.analysis import top_singular_values

        make, params, x, n_params = self._net(spec["net"], spec["size"])
        method, ad, k = spec["method"], spec["ad"], spec["k"]
        d = int(x.size)
        m, n_j, n_jt = _products(method, k, d)
        key = jax.random.key(11)
        f = make(ad == "vjp")
        f_rev = make(True) if ad == "mixed" else None
        fn = jax.jit(lambda params, x, key: top_singular_values(
            lambda z: f(params, z), x, k=k, key=key, method=method, ad=ad,
            f_reverse=None if f_rev is None else (lambda z: f_rev(params, z))))
        args = (params, x, key)
        info = h.compile_timed(fn, args)
        compiled = info.pop("compiled")
        call = lambda: jax.block_until_ready(compiled(*args))
        info.update(h.first_call(call))
        s = np.asarray(info.pop("out"), np.float64)
        # a long first call is the measurement (XLA has nothing left to warm up)
        calls = [info["first_call"]]
        if info["first_call_s"] < SHORT_CALL_S:
            calls = h.timed_calls(call, 2)
        walls = [c[0] for c in calls]
        out = {**spec, "d": d, "unet_params": n_params, "num_iters": m, "j_products": n_j,
               "jt_products": n_jt, "calls": calls, "s": s.tolist(),
               "wall_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
               "cpu_s": statistics.median(c[1] for c in calls),
               "foreign_load": sum(c[2] for c in calls) / sum(walls)}
        out["s_per_product"] = out["wall_s"] / (n_j + n_jt)
        out.update(info)
        if spec["net"] == "mnist":
            out["dense"] = self._dense_check(s, dir)
        return out

    def _dense_check(self, s, dir):
        """Compare top-k with the SVD of Part 1's reference Jacobian (computed here if absent)."""
        import jax
        import numpy as np

        from jaxrob.analysis import jacobian

        svals = os.path.join(dir, "s_reference.npy")
        if not os.path.exists(svals):   # Part 1 skipped: jvp_chunks here
            f = self._mnist_f(False)
            J = jax.jit(lambda p, x: jacobian(lambda z: f(p, z), x, method="jvp_chunks",
                                              chunk=112))(self.params, self.x)
            np.save(svals, np.linalg.svd(np.asarray(J, np.float64), compute_uv=False))
        sd = np.load(svals)[:len(s)]
        return {"max_abs_err_over_s1": float(np.max(np.abs(s - sd)) / sd[0]),
                "kth_rel_err": float(abs(s[-1] - sd[-1]) / max(sd[-1], 1e-30)),
                "s_dense": sd.tolist()}


# ----------------------------------------------------------------------------------------------
# PyTorch worker
# ----------------------------------------------------------------------------------------------
class TorchWorker(h.TorchWorker):
    SEED = 0

    def prepare(self, dir, threads):
        """Load the JAX weights, chain and noise; pick the thread count; check f(x)."""
        import copy

        import numpy as np
        import torch
        from torch_purify import Chain, purify
        from torch_unet import TorchUNet, load_jax_params

        with open(os.path.join(dir, "setup.json")) as f:
            meta = json.load(f)
        cl = torch.channels_last
        params = h.load_tree(os.path.join(dir, "unet.npz"))
        self.unet = load_jax_params(TorchUNet(**meta["unet_cfg"]), params).to(
            memory_format=cl).eval()
        for p in self.unet.parameters():     # input Jacobians only
            p.requires_grad_(False)
        chain = Chain(dict(np.load(os.path.join(dir, "chain.npz"))))
        nz = np.load(os.path.join(dir, "noise.npz"))
        x = np.load(os.path.join(dir, "x.npy"))
        shape = self.shape = x.shape         # (1, H, W, C), NHWC like JAX
        self.v = torch.from_numpy(np.array(x, np.float32).reshape(-1))

        def make_f(unet, fmt):
            noise = h.nchw(nz["noise"]).contiguous(memory_format=fmt)
            step_noises = [h.nchw(a).contiguous(memory_format=fmt) for a in nz["step_noise"]]

            def f(v):
                """Flat NHWC in, flat NHWC out: J is laid out exactly as jaxrob's."""
                x01 = v.reshape(shape).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
                out = purify(unet, x01, chain, sampler="ddpm", use_checkpoint=False,
                             noise=noise, step_noises=step_noises)
                return out.permute(0, 2, 3, 1).reshape(-1)

            return f

        self.f = make_f(self.unet, cl)
        # torch.autograd.functional.jacobian(vectorize=True) refuses channels_last inside its
        # vmap ("NYI: querying is_contiguous inside of vmap") and torch.func.jacfwd fails on a
        # view of it: a route that fails with channels_last runs NCHW-contiguous.
        self.f_contiguous = make_f(copy.deepcopy(self.unet).to(
            memory_format=torch.contiguous_format), torch.contiguous_format)
        # as bench_attack.py: 1 or 2 threads, whichever is faster at a UNet input-gradient
        t = torch.full((8,), 50, dtype=torch.long)
        xb = torch.rand(8, shape[3], shape[1], shape[2]).contiguous(memory_format=cl)

        def grad():
            xx = xb.detach().requires_grad_(True)
            (self.unet(xx, t) ** 2).sum().backward()

        info = self.pick_threads(grad, threads)
        with torch.no_grad():
            y = self.f(self.v).reshape(shape).numpy()
        ref = np.load(os.path.join(dir, "purified_jax.npy"))
        return {**info, "purified": h.diff(y, ref)}

    def setup(self, name, method, chunk, dir):
        """One warm-up Jacobian (timed, peak RSS), saved for the numerics check.

        channels_last first; a route that fails with it runs NCHW-contiguous.
        """
        import numpy as np
        import torch

        def make(f):
            v = self.v
            if method == "jacrev":
                jac = torch.func.jacrev(f, chunk_size=chunk)
                return lambda: jac(v)
            if method == "jacfwd":
                jac = torch.func.jacfwd(f)
                return lambda: jac(v)
            return lambda: torch.autograd.functional.jacobian(f, v, vectorize=True)

        call, fmt = make(self.f), "channels_last"
        try:
            info = h.first_call(call)
        except RuntimeError as e:
            call, fmt = make(self.f_contiguous), "contiguous"
            info = h.first_call(call)
            info["channels_last_error"] = str(e)[:300]
        info["memory_format"] = fmt
        J = info.pop("out")
        np.save(os.path.join(dir, f"J_{name.replace(':', '_').replace('/', '_')}.npy"),
                J.detach().numpy())
        self.fns[name] = call
        info["threads"] = self.threads
        return info


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _stats(reps):
    """reps: per-repetition [wall, own_cpu, foreign_cpu] of one call each."""
    return {**h.call_stats(reps), "rep_s": [c[0] for c in reps],
            "calls": [[round(v, 5) for v in c] for c in reps]}


def _jac_numerics(tmp, names, ref):
    import numpy as np

    fname = lambda n: os.path.join(tmp, f"J_{n.replace(':', '_').replace('/', '_')}.npy")
    J0 = np.load(fname(ref)).astype(np.float64)
    np.save(os.path.join(tmp, "J_reference.npy"), J0)
    s0 = np.linalg.svd(J0, compute_uv=False)
    np.save(os.path.join(tmp, "s_reference.npy"), s0)
    fro = np.linalg.norm(J0)
    out = {"reference": ref, "shape": list(J0.shape), "fro_norm": float(fro),
           "max_abs": float(np.abs(J0).max()), "s_max": float(s0[0]),
           "s_min": float(s0[-1]), "frac_s_below_0.25": float(np.mean(s0 < 0.25)),
           "frac_s_above_1": float(np.mean(s0 > 1.0)), "rank_1e-6": int(np.sum(
               s0 > 1e-6 * s0[0])), "zero_rows": int(np.sum(~J0.any(axis=1))), "routes": {}}
    for n in names:
        if n == ref or not os.path.exists(fname(n)):
            continue
        J = np.load(fname(n)).astype(np.float64)
        s = np.linalg.svd(J, compute_uv=False)
        out["routes"][n] = {"max_abs_diff": float(np.abs(J - J0).max()),
                            "rel_fro": float(np.linalg.norm(J - J0) / fro),
                            "s_max_abs_diff_over_s1": float(np.abs(s - s0).max() / s0[0])}
    return out


def _part1(procs, routes, args, tmp, out):
    ph = {"setup": {}, "rows": {}}
    for name in routes:
        setting, method, chunk = _parse_route(name)
        t0 = time.time()
        try:
            ph["setup"][name] = procs[setting].call("setup", name=name, method=method,
                                                    chunk=chunk, dir=tmp)
        except h.WorkerFailed as e:
            out["errors"].append(f"setup {name}: {e}")
            h.log(f"  ! {e}")
            continue
        su = ph["setup"][name]
        h.log(f"  setup {name}: {time.time() - t0:.1f}s (first call {su['first_call_s']:.1f}s)")
    ok = [n for n in routes if n in ph["setup"]]
    jax_ok = [n for n in ok if not n.startswith("torch:")]
    if jax_ok:
        out["numerics"]["jacobian"] = _jac_numerics(tmp, ok, jax_ok[0])
    res = {n: [] for n in ok}
    for rep in range(args.reps):
        runs = {n: (_parse_route(n)[0], {"name": n}) for n in res}
        got = h.timed_round(procs, runs, rep, out["errors"], "run ")
        res = {n: calls for n, calls in res.items() if n in got}    # drop the failed routes
        for n, calls in got.items():
            res[n].append(calls[0])
        h.log(f"  rep {rep + 1}/{args.reps} done")
    for n, reps in res.items():
        if reps:
            ph["rows"][n] = _stats(reps)
    for p in {_parse_route(n)[0] for n in routes} & set(procs):
        try:
            procs[p].call("release")
        except h.WorkerFailed as e:
            out["errors"].append(f"release {p}: {e}")
    # the ratio counts only routes whose Jacobian matches the reference
    checks = out["numerics"].get("jacobian", {}).get("routes", {})
    passed = {n: r for n, r in ph["rows"].items()
              if n not in checks or checks[n]["rel_fro"] < JAC_RTOL}
    ph["excluded"] = sorted(set(ph["rows"]) - set(passed))
    jr = {n: r for n, r in passed.items() if not n.startswith("torch:")}
    tr = {n: r for n, r in passed.items() if n.startswith("torch:")}
    if jr and tr:
        bj = min(jr, key=lambda n: jr[n]["s_per_call"])
        bt = min(tr, key=lambda n: tr[n]["s_per_call"])
        per = [a / b for a, b in zip(tr[bt]["rep_s"], jr[bj]["rep_s"], strict=False)]
        ph["ratio"] = {"fastest_jax": bj, "fastest_torch": bt,
                       "torch_over_jax": tr[bt]["s_per_call"] / jr[bj]["s_per_call"],
                       "rep_min": min(per), "rep_max": max(per),
                       "cpu_torch_over_jax": tr[bt]["cpu_s_per_call"] / jr[bj]["cpu_s_per_call"],
                       "target": TARGET}
    return ph


def _part2(proc, ops, svd, tmp, out):
    import numpy as np

    for o in ops:
        net, size = o.split("@")
        t0 = time.time()
        try:
            out["ops"].append(proc.call("ops", net=net, size=int(size)))
        except h.WorkerFailed as e:
            out["errors"].append(f"ops {o}: {e}")
            h.log(f"  ! {e}")
            continue
        h.log(f"  operators {o}: {time.time() - t0:.1f}s")
    for tok in svd:
        spec = _parse_svd(tok)
        t0 = time.time()
        try:
            r = proc.call("topk", spec=spec, dir=tmp)
        except h.WorkerFailed as e:
            out["errors"].append(f"topk {tok}: {e}")
            h.log(f"  ! {e}")
            continue
        out["svd"].append(r)
        h.log(f"  top-k {tok}: {time.time() - t0:.1f}s (compile {r['compile_s']:.1f}s, call "
            f"{r['wall_s']:.1f}s)")
    # agreement between rows of the same net/size/k (e.g. lanczos vs randomized vs mixed)
    by = {}
    for r in out["svd"]:
        by.setdefault((r["net"], r["size"], r["k"]), []).append(r)
    for rows in by.values():
        ref = rows[0]
        for r in rows[1:]:
            a, b = np.array(r["s"]), np.array(ref["s"])
            r["vs_first_row"] = {"row": ref["name"],
                                 "max_abs_diff_over_s1": float(np.abs(a - b).max() / b[0])}
    try:
        proc.call("release")
    except h.WorkerFailed as e:
        out["errors"].append(f"release part 2: {e}")


def drive(args):
    t_start = time.time()
    log = h.log
    q = args.quick
    routes = [r for r in (args.routes or ",".join(QUICK_ROUTES if q else FULL_ROUTES)).split(
        ",") if r] if not args.no_dense else []
    svd = [s for s in (args.svd if args.svd is not None else ",".join(
        QUICK_SVD if q else FULL_SVD)).split(",") if s]
    ops = [s for s in (args.ops if args.ops is not None else ",".join(
        QUICK_OPS if q else FULL_OPS)).split(",") if s]
    args.reps = args.reps or (2 if q else 3)
    for r in routes:
        _parse_route(r)
    for s in svd:
        _parse_svd(s)
    for o in ops:
        if o not in ("mnist@28",) and not (o.startswith("cifar@") and o[6:].isdigit()):
            raise SystemExit(f"--ops: {o!r}: expected mnist@28 or cifar@S")
    settings = list(dict.fromkeys(_parse_route(r)[0] for r in routes if not r.startswith(
        "torch:")))
    part2 = args.svd_setting
    if (svd or ops) and part2 not in settings:
        settings.append(part2)
    if part2 not in SETTINGS:
        raise SystemExit(f"--svd-setting: expected one of {list(SETTINGS)}")
    if not settings:
        settings = [part2]
    with_torch = any(r.startswith("torch:") for r in routes)
    tmp = tempfile.mkdtemp(prefix="jaxrob_bench_jacobian_")
    procs = h.start_workers(__file__, settings, tmp, torch=with_torch)
    out = {"meta": h.run_meta(quick=q, smoke=args.smoke, t_star=T_STAR, steps=args.steps,
                              reps=args.reps, routes=routes, svd=svd, ops=ops,
                              svd_setting=part2, ops_apply=OPS_APPLY, tmp=tmp),
           "numerics": {}, "dense": {}, "ops": [], "svd": [], "errors": []}
    meta = out["meta"]
    try:
        for n, p in procs.items():
            meta["workers"][n] = p.call("hello")
        first = settings[0]
        meta["model"] = procs[first].call("prepare", dir=tmp, ckpt=args.ckpt, write=True,
                                          steps=args.steps)
        with open(os.path.join(tmp, "setup.json")) as f:
            meta["input"] = json.load(f)["input"]
        for n in settings[1:]:
            procs[n].call("prepare", dir=tmp, ckpt=args.ckpt, write=False, steps=args.steps)
        if with_torch:
            tp = procs["torch"].call("prepare", dir=tmp, threads=args.torch_threads)
            out["numerics"]["purified"] = tp.pop("purified")
            meta["torch_threads"] = tp
        log(f"workers ready ({time.time() - t_start:.0f}s)")
        if routes:
            log(f"== part 1: dense Jacobian, {len(routes)} routes x {args.reps} reps")
            out["dense"] = _part1(procs, routes, args, tmp, out)
        for n in list(procs):        # idle workers hold memory; part 2 needs one
            if n != part2:
                procs.pop(n).close()
        if svd or ops:
            log(f"== part 2: operators {ops}, top-k {svd}")
            _part2(procs[part2], ops, svd, tmp, out)
    finally:
        h.close_all(procs)
    meta["driver_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return h.finish(out, render, args.out, t_start)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _mb(kb):
    return "-" if kb is None else f"{kb / 1024:.0f}"


def render(out):
    m = out["meta"]
    mod = m.get("model", {})
    lines = h.header("bench_jacobian", m) + [
        f"purifier: DDPM DiffPure t*={m['t_star']}, {m['steps']} steps, fixed key; "
        f"{mod.get('ckpt', '?')} ({mod.get('unet_params', '?')} params); input "
        f"{m.get('input', '?')}; torch threads {h.torch_threads_text(m.get('torch_threads', {}))}",
    ]
    lines[0] += "  (--smoke)" if m.get("smoke") else "  (--quick)" if m["quick"] else ""
    num = out["numerics"]
    if "purified" in num:
        p = num["purified"]
        lines.append(f"numerics: purified image torch vs jax max|diff| {p['max_abs_diff']:.1e} "
                     f"(tol {PUR_TOL:g}) {h.ok(p['max_abs_diff'] < PUR_TOL)}")
    jn = num.get("jacobian")
    if jn:
        lines.append(f"  reference J = {jn['reference']}: {jn['shape'][0]}x{jn['shape'][1]}, "
                     f"||J||_F {jn['fro_norm']:.3f}, s_max {jn['s_max']:.4f}, "
                     f"{jn['zero_rows']} zero rows (clipped pixels), s<0.25: "
                     f"{jn['frac_s_below_0.25']:.3f}, s>1: {jn['frac_s_above_1']:.3f}")
        for n, r in jn["routes"].items():
            lines.append(f"  {n:<28} vs ref: max|dJ| {r['max_abs_diff']:.1e}  rel Frobenius "
                         f"{r['rel_fro']:.1e}  max|ds|/s1 {r['s_max_abs_diff_over_s1']:.1e}  "
                         f"{h.ok(r['rel_fro'] < JAC_RTOL)}")
    d = out["dense"]
    if d.get("rows"):
        lines.append(f"\nPart 1: dense {jn['shape'][0] if jn else '?'}x"
                     f"{jn['shape'][1] if jn else '?'} Jacobian, s/Jacobian median [min-max] "
                     f"over {m['reps']} interleaved reps")
        lines.append(f"{'route':<28}{'s/J':>7} {'[min-max]':<14}{'n':>2}{'CPU-s':>7}"
                     f"{'util':>5}{'fgn':>5}{'compile':>8}{'first':>7}{'XLA tmp':>8}"
                     f"{'peak MB':>8}{'+MB':>6}  torch/this")
        best_t = d.get("ratio", {}).get("fastest_torch")
        for n, r in d["rows"].items():
            su = d["setup"].get(n, {})
            comp = (f"{su['lower_s'] + su['compile_s']:.1f}" if "compile_s" in su else "-")
            temp = su.get("xla_temp_bytes")
            temp = "-" if temp is None else f"{temp / 1e6:.0f}"
            plus = (_mb(su["peak_kb"] - su["rss_before_kb"]) if su.get("hwm_reset")
                    else "-")
            ratio = ""
            if best_t and not n.startswith("torch:"):
                ratio = f"{d['rows'][best_t]['s_per_call'] / r['s_per_call']:.2f}"
            rng = f"[{r['min_s']:.2f}-{r['max_s']:.2f}]"
            label = n + (" NCHW" if su.get("memory_format") == "contiguous" else "")
            lines.append(f"{label:<28}{r['s_per_call']:>7.2f} {rng:<14}{r['n']:>2}"
                         f"{r['cpu_s_per_call']:>7.2f}{r['util']:>5.2f}{r['foreign_load']:>5.2f}"
                         f"{comp:>8}{su.get('first_call_s', float('nan')):>7.1f}{temp:>8}"
                         f"{_mb(su.get('peak_kb')):>8}{plus:>6}  {ratio}")
        rt = d.get("ratio")
        if rt:
            lines.append(f"**fastest torch ({rt['fastest_torch']}) / fastest jaxrob "
                         f"({rt['fastest_jax']}): {rt['torch_over_jax']:.2f} [reps "
                         f"{rt['rep_min']:.2f}-{rt['rep_max']:.2f}], CPU-time "
                         f"{rt['cpu_torch_over_jax']:.2f} (target >= {rt['target']}: "
                         f"{h.ok(rt['torch_over_jax'] >= rt['target'])})**")
        if d.get("excluded"):
            lines.append(f"(not in the ratio, Jacobian check failed: {', '.join(d['excluded'])})")
        lines.append("(compile = lowering + XLA compile; first = first call after compiling "
                     "(torch: the warm-up call); peak MB = process VmHWM over that call, "
                     "+MB = peak - RSS before it; fgn = cores used by other processes; torch "
                     "routes run channels_last unless marked NCHW)")
    if out["ops"]:
        lines.append(f"\nPart 2a: seconds per product of one operator ({OPS_APPLY} sequential "
                     f"products per call in a fori_loop, incl. the one-off linearization)")
        names = list(OPS)
        lines.append(f"{'net':<10}{'D':>7}" + "".join(f"{n:>26}" for n in names))
        for o in out["ops"]:
            cells = []
            for n in names:
                r = o["rows"].get(n)
                cells.append("-" if r is None else
                             f"{r['s_per_product']:.3f} (c {r['lower_s'] + r['compile_s']:.0f}s)")
            lines.append(f"{o['net'] + '@' + str(o['size']):<10}{o['d']:>7}"
                         + "".join(f"{c:>26}" for c in cells))
        lines += [f"  {n}: {t}" for n, t in OPS.items()]
    if out["svd"]:
        lines.append("\nPart 2b: top-k singular values, jaxrob.analysis.top_singular_values "
                     "(ad=mixed: J by forward mode, J^T by the fast_vjp twin's reverse mode)")
        lines.append(f"{'net':<10}{'D':>7}{'params':>10} {'method':<11}{'ad':<6}{'k':>3}"
                     f"{'m/q':>5}{'J':>6}{'JT':>6}{'wall s':>8}{'s/prod':>8}{'compile':>8}"
                     f"{'peak MB':>8}{'fgn':>6}  s_1..s_k (first 3, last)  check")
        for r in out["svd"]:
            s = r["s"]
            sv = ", ".join(f"{v:.4f}" for v in s[:3]) + f" .. {s[-1]:.4f}"
            chk = ""
            if r.get("dense"):
                dd = r["dense"]
                chk = (f"dense SVD: max|ds|/s1 {dd['max_abs_err_over_s1']:.1e}, s_k rel "
                       f"{dd['kth_rel_err']:.1e}")
            elif r.get("vs_first_row"):
                v = r["vs_first_row"]
                chk = f"vs {v['row']}: max|ds|/s1 {v['max_abs_diff_over_s1']:.1e}"
            fg = "-" if r.get("foreign_load") is None else f"{r['foreign_load']:.2f}"
            lines.append(f"{r['net'] + '@' + str(r['size']):<10}{r['d']:>7}"
                         f"{r['unet_params'] / 1e6:>9.2f}M {r['method']:<11}{r['ad']:<6}"
                         f"{r['k']:>3}{r['num_iters']:>5}{r['j_products']:>6}"
                         f"{r['jt_products']:>6}{r['wall_s']:>8.1f}{r['s_per_product']:>8.3f}"
                         f"{r['lower_s'] + r['compile_s']:>8.1f}{_mb(r.get('peak_kb')):>8}"
                         f"{fg:>6}  {sv}  {chk}")
        lines.append("(wall s = median call, compile excluded; s/prod = wall / (J + JT "
                     "products); m = Lanczos steps, q = power iterations; cifar = the "
                     "UNET_CONFIGS['cifar10'] UNet, RANDOMLY INITIALISED)")
    return "\n".join(lines + h.error_lines(out))


def main(argv=None):
    ap = h.parser(__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="5 dense routes x 2 reps, MNIST top-20, one small CIFAR-config top-5")
    ap.add_argument("--routes", default=None,
                    help="Part 1 routes 'setting:method[/chunk]' or 'torch:method[/chunk]', "
                         "comma-separated; the first JAX route is the numerics reference")
    ap.add_argument("--no-dense", action="store_true", help="skip Part 1")
    ap.add_argument("--reps", type=int, default=0,
                    help="timed Jacobians per route (default 3; --quick 2)")
    ap.add_argument("--svd", default=None,
                    help="Part 2 top-k specs 'net@size:method:ad:k' (net mnist@28 or cifar@S, "
                         "method lanczos|randomized, ad jvp|vjp|mixed); '' for none")
    ap.add_argument("--ops", default=None,
                    help="Part 2 operator tables, 'mnist@28' / 'cifar@S'; '' for none")
    ap.add_argument("--svd-setting", default="1dev_noynn",
                    help="JAX setting of the Part 2 worker")
    ap.add_argument("--torch-threads", default="auto", choices=("auto", "1", "2"))
    ap.add_argument("--ckpt", default="checkpoints/mnist_ddpm",
                    help="the MNIST DDPM export (repo-relative)")
    ap.add_argument("--steps", type=int, default=STEPS,
                    help=f"reverse steps of the purifier (default {STEPS})")
    h.add_worker_args(ap, smoke=SMOKE)
    args = h.parse_args(ap, argv, SMOKE)
    if not h.serve_if_worker(args, JaxWorker, TorchWorker):
        try:
            drive(args)
        except ValueError as e:
            raise SystemExit(f"bench_jacobian: {e}") from None


if __name__ == "__main__":
    main()
