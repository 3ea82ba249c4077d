"""XLA:CPU 3x3 convolutions at the MNIST UNet's Jacobian shapes, per YNN mode (GFLOP/s).

One process per ``jaxrob.parallel.YNN_MODES`` entry (the flag is read when XLA starts), 1
device, batch 112 (one ``vjp_chunks`` chunk of the dense-Jacobian benchmark):

    python benchmarks/conv_kernels.py            # ~1 min
    python benchmarks/conv_kernels.py --smoke    # batch 8, 3 calls: a check
    python benchmarks/conv_kernels.py --wgrad --batch 64   # kernel gradients, + PyTorch

``--wgrad`` times the gradient w.r.t. the kernel instead (the VJP of the convolution in its
weights, as a train step computes it; XLA expresses it as a convolution whose window is the
whole activation), and adds a row ``all+dot`` (XLA's defaults, the same gradient as one
matrix product over the 9 shifted views of the input, checked against ``jax.vjp``'s: a
candidate formulation, measured no faster) and a
PyTorch row (``conv2d`` backward with only the weight requiring a gradient; channels_last, the
malloc settings, 2 threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _harness as h  # noqa: E402  (worker environment, timers)

SHAPES = ((28, 16, 16), (28, 32, 32), (28, 48, 16), (14, 32, 32), (14, 64, 32), (7, 32, 32),
          (7, 64, 32))   # (size, C_in, C_out) of convolutions in the MNIST UNet and its VJP
BATCH = 112
CALLS = 20


def _torch_worker(batch, calls):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    out = []
    for size, cin, cout in SHAPES:
        cl = torch.channels_last
        x = torch.randn(batch, cin, size, size).contiguous(memory_format=cl)
        ct = torch.randn(batch, cout, size, size).contiguous(memory_format=cl)
        w = (0.1 * torch.randn(cout, cin, 3, 3)).contiguous(memory_format=cl)
        w.requires_grad_(True)

        def call():
            w.grad = None
            F.conv2d(x, w, padding=1).backward(ct)   # x needs no gradient: weights only

        for _ in range(3):
            call()
        wall = statistics.median(c[0] for c in h.timed_calls(call, calls))
        out.append(f"{2 * batch * size * size * 9 * cin * cout / wall / 1e9:6.0f}")
    print(" ".join(out))


def _kernel_grad_dot(x, ct):
    """The 3x3 kernel gradient (HWIO, padding 1) as one matrix product over the 9 shifted
    views of the input: ``sum_{b,h,w} x[b, h+i-1, w+j-1, c] ct[b, h, w, o]``."""
    import jax.numpy as jnp

    b, hh, ww, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = jnp.stack([xp[:, i:i + hh, j:j + ww] for i in range(3) for j in range(3)], 3)
    g = views.reshape(-1, 9 * c).T @ ct.reshape(-1, ct.shape[-1])
    return g.reshape(3, 3, c, ct.shape[-1])


def _worker(mode, batch, calls, wgrad=False):
    if mode == "torch":
        return _torch_worker(batch, calls)
    from jaxrob import parallel

    dot = mode == "all+dot"
    parallel.configure_cpu(device_count=1, ynn="all" if dot else mode)
    import jax
    import numpy as np
    from jax import lax

    fwd = lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = jax.jit(fwd)
    # the kernel's cotangent: what the backward pass of a train step computes
    kgrad = jax.jit(lambda x, w, ct: jax.vjp(lambda ww: fwd(x, ww), w)[1](ct)[0])
    out = []
    for size, cin, cout in SHAPES:
        x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
        ct = jax.random.normal(jax.random.key(2), (batch, size, size, cout))
        if wgrad and dot:
            kdot = jax.jit(_kernel_grad_dot)
            np.testing.assert_allclose(kdot(x, ct), kgrad(x, w, ct), rtol=1e-3, atol=1e-2)
            call = lambda: jax.block_until_ready(kdot(x, ct))  # noqa: B023
        elif wgrad:
            call = lambda: jax.block_until_ready(kgrad(x, w, ct))  # noqa: B023
        else:
            call = lambda: jax.block_until_ready(conv(x, w))  # noqa: B023
        call()
        wall = statistics.median(c[0] for c in h.timed_calls(call, calls))
        flop = 2 * batch * size * size * 9 * cin * cout
        out.append(f"{flop / wall / 1e9:6.0f}")
    print(" ".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--calls", type=int, default=CALLS, help="timed calls per shape")
    ap.add_argument("--smoke", action="store_true", help="--batch 8 --calls 3: a check")
    ap.add_argument("--wgrad", action="store_true",
                    help="the gradient w.r.t. the kernel, and a PyTorch row")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.calls = 8, 3
    if args.worker:
        return _worker(args.worker, args.batch, args.calls, args.wgrad)
    what = "kernel gradient of a 3x3 conv" if args.wgrad else "3x3 conv"
    print(f"{what}, batch {args.batch}, 1 device: GFLOP/s (median of {args.calls} calls)")
    print("mode     " + " ".join(f"{f'{s}:{a}>{b}':>6s}" for s, a, b in SHAPES))
    for mode in ("all", "no_conv", "off") + (("all+dot", "torch") if args.wgrad else ()):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode,
                              "--batch", str(args.batch), "--calls", str(args.calls)]
                             + (["--wgrad"] if args.wgrad else []),
                             env=h.worker_env(torch=mode == "torch"), capture_output=True,
                             text=True, check=True)
        print(f"{mode:8s} {res.stdout.strip()}")


if __name__ == "__main__":
    main()
