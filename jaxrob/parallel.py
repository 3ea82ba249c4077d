"""Device set-up, meshes and sharding helpers.

One code path from a laptop CPU to a TPU pod: batches (and EoT samples) are sharded over the
``data`` axis of a 1-D mesh, parameters are replicated.

On CPU, call :func:`configure_cpu` before JAX initialises its backend. XLA:CPU keeps only ~1.3
of 2 cores busy per device on small convolutions; splitting the host into several XLA devices
and sharding the batch over them recovers most of the rest (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# XLA:CPU flag that turns off YNNPACK conv fusions (jaxlib 0.10.2; experimental). Measured in
# benchmarks/README.md; kept here so experiments, tests and benchmarks agree on one setting.
NO_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)  # noqa: SLF001
    except Exception:  # pragma: no cover - private API moved
        return False


def configure_cpu(device_count: int | None = None, *, disable_ynn: bool | None = None) -> None:
    """Choose jaxrob's CPU defaults; a no-op once JAX's backend is running or on accelerators.

    Args:
      device_count: number of XLA host devices to split the CPU into (default: the
        ``JAXROB_CPU_DEVICES`` environment variable, else 2). Ignored when
        ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``.
      disable_ynn: add ``NO_YNN_FLAG`` to ``XLA_FLAGS`` (default: ``JAXROB_CPU_NO_YNN``, else
        False).
    """
    if _backend_initialized():
        warnings.warn("configure_cpu: JAX backend already initialised; CPU settings unchanged",
                      stacklevel=2)
        return
    if device_count is None:
        device_count = int(os.environ.get("JAXROB_CPU_DEVICES", "2"))
    if disable_ynn is None:
        disable_ynn = os.environ.get("JAXROB_CPU_NO_YNN", "0") == "1"
    flags = os.environ.get("XLA_FLAGS", "")
    if disable_ynn and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + NO_YNN_FLAG).strip()
    if "xla_force_host_platform_device_count" not in flags and device_count > 1:
        jax.config.update("jax_num_cpu_devices", int(device_count))


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices: expected 1..{len(devices)}, got {num_devices}")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree, mesh: jax.sharding.Mesh):
    """Place a host batch (pytree of arrays with a common leading axis) over the ``data`` axis.

    The leading axis must divide by the mesh size; pad with :func:`pad_to_multiple` first.
    """
    n = mesh.shape[DATA_AXIS]

    def put(a):
        a = np.asarray(a)
        if a.shape[0] % n:
            raise ValueError(f"batch of {a.shape[0]} does not divide over {n} devices; "
                             "pad it with jaxrob.parallel.pad_to_multiple")
        return jax.device_put(a, data_sharding(mesh))

    return jax.tree.map(put, tree)


def replicate(tree, mesh: jax.sharding.Mesh):
    return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad the leading axis by repeating the last row; returns (padded, original_length)."""
    n = x.shape[0]
    rem = (-n) % multiple
    if rem == 0:
        return x, n
    pad = np.repeat(x[-1:], rem, axis=0)
    return np.concatenate([x, pad], axis=0), n


def is_main_process() -> bool:
    return jax.process_index() == 0
