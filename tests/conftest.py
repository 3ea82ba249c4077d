"""Test configuration: 8 fake CPU devices, strict numerics, the shared data directory."""

import os
import pathlib

# Must happen before JAX initialises its backend: exercise multi-device code on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
_REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAXROB_DATA_DIR", str(_REPO.parent / "shared" / "datasets"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real datasets (../shared/datasets or $JAXROB_DATA_DIR); tests skip without them."""
    p = pathlib.Path(os.environ["JAXROB_DATA_DIR"])
    if not p.is_dir():
        pytest.skip(f"data directory {p} not found (set JAXROB_DATA_DIR)")
    return p


def torch_or_skip():
    """Import torch or skip the calling test."""
    return pytest.importorskip("torch")
