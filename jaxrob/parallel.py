"""Device set-up, meshes and sharding helpers.

One code path from a laptop CPU to a TPU pod: batches (and EoT samples) are sharded over the
``data`` axis of a 1-D mesh, parameters are replicated.

On CPU, call :func:`configure_cpu` before JAX initialises its backend. XLA:CPU keeps only ~1.3
of 2 cores busy per device on small convolutions; splitting the host into several XLA devices
and sharding the batch over them recovers most of the rest (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import os
import re
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# XLA:CPU's YNNPACK fusions (jaxlib 0.10.2; experimental flag), set through one of three modes
# measured in benchmarks/README.md; kept here so experiments, tests and benchmarks agree.
#   "all":     XLA's default (convolutions, dots, elementwise and reductions through YNNPACK)
#   "no_conv": YNNPACK for dots, elementwise fusions and reductions, convolutions by XLA's own
#              (Eigen) kernels: 1.5x faster convolutions on the 2-core CPU
#   "off":     no YNNPACK fusions; one host device only: with two or more executing at the same
#              time, XLA:CPU's own elementwise fusions returned wrong values (docs/known_faults.md),
#              so configure_cpu turns "off" into "no_conv" on several devices
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
YNN_MODES = {"all": None, "no_conv": _YNN_FLAG + "dot,eltwise,reduce", "off": _YNN_FLAG}
NO_YNN_FLAG = YNN_MODES["off"]


def _backend_initialized() -> bool:
    """Whether JAX's backends are up, through public API only: JAX refuses to change
    ``jax_num_cpu_devices`` once they are (RuntimeError); before, the value is put back."""
    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", 2 if current == 1 else 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def configure_cpu(device_count: int | None = None, *, disable_ynn: bool | None = None,
                  ynn: str | None = None) -> None:
    """Choose jaxrob's CPU defaults; a no-op once JAX's backend is running or on accelerators.

    Args:
      device_count: number of XLA host devices to split the CPU into (default: the
        ``JAXROB_CPU_DEVICES`` environment variable, else 2). Ignored when
        ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``.
      disable_ynn: shorthand for ``ynn="off"`` (default: ``JAXROB_CPU_NO_YNN=1``).
      ynn: XLA:CPU YNNPACK fusion mode, one of ``YNN_MODES`` (``"all"``, ``"no_conv"``,
        ``"off"``; default: ``JAXROB_CPU_YNN``, else ``disable_ynn``, else ``"all"``). Ignored
        when ``XLA_FLAGS`` already sets ``--xla_cpu_experimental_ynn_fusion_type``. ``"off"``
        with more than one host device becomes ``"no_conv"`` (with a warning): that
        combination computes wrong values (docs/known_faults.md).
    """
    if ynn is not None and disable_ynn is not None and (ynn == "off") != bool(disable_ynn):
        raise ValueError(f"configure_cpu: disable_ynn={disable_ynn} contradicts ynn={ynn!r}")
    if ynn is None and disable_ynn is None:
        ynn = os.environ.get("JAXROB_CPU_YNN")
        disable_ynn = os.environ.get("JAXROB_CPU_NO_YNN", "0") == "1"
    if ynn is None:
        ynn = "off" if disable_ynn else "all"
    if ynn not in YNN_MODES:
        raise ValueError(f"ynn: expected one of {list(YNN_MODES)}, got {ynn!r}")
    if _backend_initialized():
        warnings.warn("configure_cpu: JAX backend already initialised; CPU settings unchanged",
                      stacklevel=2)
        return
    if device_count is None:
        device_count = int(os.environ.get("JAXROB_CPU_DEVICES", "2"))
    flags = os.environ.get("XLA_FLAGS", "")
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", flags)
    num_devices = int(forced.group(1)) if forced else device_count
    if ynn == "off" and num_devices > 1 and "ynn_fusion_type" not in flags:
        warnings.warn(f"configure_cpu: YNNPACK fusions off on {num_devices} host devices is a "
                      "known XLA:CPU fault (wrong values when devices run concurrently, "
                      "docs/known_faults.md); using ynn='no_conv'", stacklevel=2)
        ynn = "no_conv"
    if YNN_MODES[ynn] is not None and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + YNN_MODES[ynn]).strip()
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
