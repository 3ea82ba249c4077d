"""Run test code in a fresh Python process at XLA's default optimisation.

tests/conftest.py compiles the suite without LLVM's optimisation passes; records that must be
bitwise invariant (batch layouts, EoT meshes) are compared at the default instead -- what users
run -- because at -O0 the gradients carry more float-order noise, which sign steps amplify.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_at_default_optimisation(code: str, *, timeout: float = 1200) -> bytes:
    """``python -c code`` with 8 host devices, no extra XLA flags and the repository and
    ``tests/`` (the test-helper modules) on the path; returns its stdout (the assertion names
    the process's stderr when it fails)."""
    path = (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out.stdout
