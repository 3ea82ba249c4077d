"""Where the time of one dense purifier Jacobian goes, by UNet layer kind (XLA:CPU profile).

Builds the benchmark's map (``bench_jacobian.py``: the committed MNIST DDPM, DDPM DiffPure
t* = 0.1, 10 steps, fixed key, MNIST test[0]), computes its 784x784 Jacobian with one route,
times a few calls, then records one call with ``jax.profiler.trace`` while XLA dumps the
optimised HLO. Every executed op of the trace is attributed, through the ``op_name`` metadata
of the dump, to a layer kind (convolution, GroupNorm, upsample, attention, SiLU, ...); the
table prints each kind's summed op time. Ops run concurrently on the XLA threads, so the sum
can exceed the wall time; the shares are what to read.

    python benchmarks/profile_jacobian.py                         # vjp_chunks/112, 1 device
    python benchmarks/profile_jacobian.py --plain-layers          # nn.GroupNorm + plain upsample
    python benchmarks/profile_jacobian.py --ynn no_conv --devices 2
    python benchmarks/profile_jacobian.py --smoke                 # 2 steps, 1 rep: a check

``--plain-layers`` builds the ``fast_vjp=True`` UNet with Flax's GroupNorm and the plain
upsample+conv (autodiff VJPs), i.e. the model before ``jaxrob.models._fast_vjp_ops``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (the benchmark's input image)

KINDS = (("conv", r"conv_general_dilated"), ("upsample", r"_upsample"),
         ("groupnorm", r"norm\w*/"), ("attention", r"attn"), ("silu", r"silu"),
         ("downsample", r"_downsample"), ("skip split/concat", r"/(split|concatenate)$"))


def _kind(op_name):
    for kind, pat in KINDS:
        if re.search(pat, op_name):
            return kind
    return "other"


def _op_names(dump_dir):
    """hlo op name -> op_name metadata, from the largest optimised module of the dump."""
    files = glob.glob(os.path.join(dump_dir, "*cpu_after_optimizations.txt"))
    text = open(max(files, key=os.path.getsize)).read()
    return dict(re.findall(r"%?([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"", text))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="vjp_chunks", choices=("vjp_chunks", "jvp_chunks"))
    ap.add_argument("--chunk", type=int, default=112)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--ynn", default="all", help="jaxrob.parallel.YNN_MODES key")
    ap.add_argument("--plain-layers", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="reverse steps of the purifier")
    ap.add_argument("--smoke", action="store_true", help="--steps 2 --reps 1: a check")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.reps = 2, 1

    tmp = tempfile.mkdtemp(prefix="profile_jacobian_")
    dump = os.path.join(tmp, "hlo")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    from jaxrob import parallel

    parallel.configure_cpu(device_count=args.devices, ynn=args.ynn)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    from jaxrob.analysis import jacobian
    from jaxrob.models import UNet, _unet, load
    from jaxrob.purify import diffpure

    ddpm = load(os.path.join(h.REPO, "checkpoints", "mnist_ddpm"), kind="ddpm",
                fast_vjp=args.method == "vjp_chunks")
    if args.plain_layers:
        _unet._group_norm = lambda g, eps, fast, name: nn.GroupNorm(  # noqa: SLF001
            num_groups=g, epsilon=eps, use_fast_variance=False, name=name)

        class UNet(UNet):  # a subclass, so that Flax scopes the method like the original
            def _upsample(self, x, name):
                up = _unet.upsample_nearest2x_plain(x)
                return _unet._conv3(x.shape[-1], name, fast_vjp=self.fast_vjp)(up)  # noqa: SLF001

        fields = {f.name: getattr(ddpm.module, f.name) for f in dataclasses.fields(ddpm.module)
                  if f.name not in ("parent", "name")}
        ddpm = ddpm.replace(module=UNet(**fields))
    x_np, source = h.mnist_test_image()
    x = jnp.asarray(x_np)
    pur = diffpure(ddpm, t_star=0.1, num_steps=args.steps, sampler="ddpm")
    mesh = parallel.make_mesh() if args.devices > 1 else None
    fn = jax.jit(lambda z: jacobian(lambda u: pur(u, jr.key(0)), z, method=args.method,
                                    chunk=args.chunk, mesh=mesh))
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
    trace_dir = os.path.join(tmp, "trace")
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(fn(x))

    names = _op_names(dump)
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    per_kind = collections.Counter()
    for ev in json.load(gzip.open(trace))["traceEvents"]:
        op = ev.get("args", {}).get("hlo_op") if ev.get("ph") == "X" else None
        if op in names:
            per_kind[_kind(names[op])] += ev["dur"] / 1e6
    total = sum(per_kind.values())
    label = "plain layers" if args.plain_layers else "fast-VJP layers"
    print(f"{args.method}/{args.chunk}, {args.devices} device(s), ynn={args.ynn}, {label}, "
          f"{args.steps} steps, input {source}: "
          f"{', '.join(f'{t:.2f}' for t in times)} s per Jacobian (profiled call: op time "
          f"{total:.2f} s)")
    for kind, t in per_kind.most_common():
        print(f"  {kind:18s} {t:6.2f} s  {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
