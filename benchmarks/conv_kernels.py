"""XLA:CPU 3x3 convolutions at the MNIST UNet's Jacobian shapes, per YNN mode (GFLOP/s).

One process per ``jaxrob.parallel.YNN_MODES`` entry (the flag is read when XLA starts), 1
device, batch 112 (one ``vjp_chunks`` chunk of the dense-Jacobian benchmark):

    python benchmarks/conv_kernels.py            # ~1 min
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SHAPES = ((28, 16, 16), (28, 32, 32), (28, 48, 16), (14, 32, 32), (14, 64, 32), (7, 32, 32),
          (7, 64, 32))   # (size, C_in, C_out) of convolutions in the MNIST UNet and its VJP
BATCH = 112


def _worker(mode):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxrob import parallel

    parallel.configure_cpu(device_count=1, ynn=mode)
    import jax
    import numpy as np
    from jax import lax

    conv = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    out = []
    for size, cin, cout in SHAPES:
        x = jax.random.normal(jax.random.key(0), (BATCH, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
        jax.block_until_ready(conv(x, w))
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            jax.block_until_ready(conv(x, w))
            ts.append(time.perf_counter() - t)
        flop = 2 * BATCH * size * size * 9 * cin * cout
        out.append(f"{flop / np.median(ts) / 1e9:6.0f}")
    print(" ".join(out))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    print(f"3x3 conv, batch {BATCH}, 1 device: GFLOP/s (median of 20 calls)")
    print("mode     " + " ".join(f"{f'{s}:{a}>{b}':>6s}" for s, a, b in SHAPES))
    for mode in ("all", "no_conv", "off"):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode],
                             env=env, capture_output=True, text=True, check=True)
        print(f"{mode:8s} {res.stdout.strip()}")


if __name__ == "__main__":
    main()
