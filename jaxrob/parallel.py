"""Device set-up, meshes and sharding helpers.

One code path from a laptop CPU to a TPU pod: batches (and EoT samples) are sharded over the
``data`` axis of a 1-D mesh, parameters are replicated. A 2-D mesh ``(data, eot)``
(``make_mesh(eot=E)``) splits the batch over ``data`` and the EoT samples of each example over
``eot``, so a batch smaller than the device count still keeps every device busy.

On CPU, call :func:`configure_cpu` before JAX initialises its backend. XLA:CPU keeps only ~1.3
of 2 cores busy per device on small convolutions; splitting the host into several XLA devices
and sharding the batch over them recovers most of the rest (see ``benchmarks/README.md``).

Several processes (hosts of a TPU pod, GPU nodes, or local CPU processes): every process calls
:func:`initialize_distributed` first, then runs the same program over one global mesh
(:func:`make_mesh` spans every process's devices). Host data enters through :func:`put_rows` /
:func:`shard_batch` (each process reads only the rows its own devices hold), per-example
outputs come back through :func:`host_gather`, and :func:`broadcast_from_main` hands process
0's view (e.g. what a store on its disk already holds) to every process. Files are written by
process 0 only (:func:`is_main_process`). ``docs/multihost.md`` has the commands.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
EOT_AXIS = "eot"

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


def make_mesh(num_devices: int | None = None, *, eot: int = 1) -> jax.sharding.Mesh:
    """A ``data`` mesh over the first ``num_devices`` devices (default: all).

    Args:
      num_devices: devices of the mesh (default: every device).
      eot: devices of an ``eot`` axis that the EoT samples of one example are split over
        (``jaxrob.attacks.eot_value_and_grad(..., mesh=)``, ``pgd(..., eot_mesh=)``). 1: a
        1-D ``data`` mesh; more: a 2-D ``(data, eot)`` mesh of shape
        ``(num_devices // eot, eot)``; batches are split over ``data`` (and replicated over
        ``eot``), so batch sizes need only divide by ``num_devices // eot``.

    Raises:
      ValueError: ``num_devices`` not in ``1..device_count``, or ``eot`` not a positive
        divisor of it.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices: expected 1..{len(devices)}, got {num_devices}")
    if isinstance(eot, bool) or not isinstance(eot, int | np.integer) or eot < 1 or n % eot:
        raise ValueError(f"eot: expected a positive divisor of the {n} devices of the mesh, "
                         f"got {eot!r}")
    if eot == 1:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                             devices=devices[:n])
    return jax.make_mesh((n // int(eot), int(eot)), (DATA_AXIS, EOT_AXIS),
                         axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def eot_axis(mesh: jax.sharding.Mesh) -> str:
    """The mesh axis that EoT samples are split over: ``eot`` when the mesh has one (a 2-D
    ``(data, eot)`` mesh, the batch on ``data``), else ``data`` (a 1-D mesh given to the
    attack alone, the batch unsharded)."""
    if EOT_AXIS in mesh.shape:
        return EOT_AXIS
    if DATA_AXIS in mesh.shape:
        return DATA_AXIS
    raise ValueError(f"mesh: expected an '{EOT_AXIS}' or a '{DATA_AXIS}' axis "
                     f"(jaxrob.parallel.make_mesh), got axes {tuple(mesh.shape)}")


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_rows(array, rows, mesh: jax.sharding.Mesh) -> jax.Array:
    """``array[rows]`` as one global array split over the ``data`` axis of ``mesh``.

    Each process reads only the rows that its own devices hold (``array`` may be a
    ``np.memmap`` or any array-like that supports ``array[int_index_array]``), so on several
    hosts no process touches the others' share of the data. Every process must pass the same
    ``rows`` (and an ``array`` with the same values at the rows it reads).

    Args:
      array: host array-like with a leading example axis.
      rows: (B,) integer positions into ``array``'s leading axis; B a multiple of the mesh size.
      mesh: 1-D ``data`` mesh.

    Returns:
      A (B, ...) ``jax.Array`` sharded with :func:`data_sharding`.
    """
    rows = np.asarray(rows)
    n = mesh.shape[DATA_AXIS]
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows: expected a 1-D integer array, got {rows.dtype} of shape "
                         f"{rows.shape}")
    if rows.shape[0] % n:
        raise ValueError(f"batch of {rows.shape[0]} does not divide over {n} devices; "
                         "pad it with jaxrob.parallel.pad_to_multiple")
    sharding = data_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(np.asarray(array[rows]), sharding)
    shape = (rows.shape[0], *np.shape(array)[1:])

    def local(index):  # index: one device's slices of the global (B, ...) array
        return np.asarray(array[rows[index[0]]])[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, local)


def process_rows(batch_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
    """Positions in a ``batch_size`` batch that this process's devices hold (sorted).

    What this process needs of a batch placed with :func:`put_rows` / :func:`shard_batch`; the
    processes' positions are disjoint and together cover the batch exactly once.
    """
    sharding = data_sharding(mesh)
    idx = sharding.addressable_devices_indices_map((int(batch_size),))
    return np.unique(np.concatenate([np.arange(batch_size)[sl[0]] for sl in idx.values()]))


def shard_batch(tree, mesh: jax.sharding.Mesh):
    """Place a host batch (pytree of arrays with a common leading axis) over the ``data`` axis.

    The leading axis must divide by the mesh size; pad with :func:`pad_to_multiple` first. On
    several processes every process passes the same global batch and reads only its rows
    (:func:`put_rows`).
    """
    n = mesh.shape[DATA_AXIS]

    def put(a):
        a = np.asarray(a)
        if a.shape[0] % n:
            raise ValueError(f"batch of {a.shape[0]} does not divide over {n} devices; "
                             "pad it with jaxrob.parallel.pad_to_multiple")
        if jax.process_count() == 1:
            return jax.device_put(a, data_sharding(mesh))
        return put_rows(a, np.arange(a.shape[0]), mesh)

    return jax.tree.map(put, tree)


def host_gather(tree):
    """Host NumPy copies of a pytree of (possibly multi-process) arrays, on every process.

    One process: ``np.asarray`` of each leaf. Several: arrays that span other processes'
    devices are gathered (``multihost_utils.process_allgather``), so every process gets the
    global value; every process must call it, in the same order (it is a collective).
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    def gather(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(gather, tree)


def broadcast_from_main(arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Process 0's dict of host arrays, on every process (others' argument is ignored).

    For what only process 0 can see (files it wrote on its own disk). A collective: every
    process must call it, in the same order. One process: the dict itself.
    """
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in (arrays or {}).items()}
    from jax.experimental import multihost_utils

    main = is_main_process()
    payload = b""
    if main:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in (arrays or {}).items()})
        payload = buf.getvalue()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload)), is_source=main))
    data = (np.frombuffer(payload, np.uint8) if main else np.zeros((size,), np.uint8))
    data = np.asarray(multihost_utils.broadcast_one_to_all(data, is_source=main), np.uint8)
    with np.load(io.BytesIO(data.tobytes())) as z:
        return {k: z[k] for k in z.files}


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad the leading axis by repeating the last row; returns (padded, original_length)."""
    n = x.shape[0]
    rem = (-n) % multiple
    if rem == 0:
        return x, n
    pad = np.repeat(x[-1:], rem, axis=0)
    return np.concatenate([x, pad], axis=0), n


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files."""
    return jax.process_index() == 0


CPU_COLLECTIVES = ("gloo", "mpi")


def _parse_address(address) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"coordinator_address: expected 'host:port' (e.g. '127.0.0.1:12355'), "
                         f"got {address!r}")
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address: expected 'host:port' with a port in 1..65535, "
                         f"got {address!r}")
    return host, int(port)


def _wait_for_coordinator(host: str, port: int, deadline: float, what: str) -> None:
    """Connect to the coordinator's port until it answers; a clear error at ``deadline``."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConnectionError(f"{what}: cannot resolve the coordinator host {host!r} ({e})") \
            from None
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(1.0, left)):
                return
        except OSError as e:
            last = e
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(f"{what}: the coordinator at {host}:{port} could not be reached "
                       f"({last}); process 0 runs the coordinator: start it, and check the "
                       f"address, the port and the firewall")


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConnectionError(f"{what}: process 0 runs the coordinator but cannot listen on "
                                  f"port {port} ({e}); choose a free port") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           timeout_s: float = 300.0, cpu_collectives: str | None = "gloo",
                           heartbeat_timeout_s: int | None = None) -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``) with a bounded wait.

    Call it first, before anything runs on a device, in every process of the job. With no
    address (TPU pods, SLURM, ...) JAX detects the cluster itself. With one, every process
    gets the same ``coordinator_address`` and ``num_processes`` and its own ``process_id``;
    process 0 runs the coordinator on that port. Before JAX is asked, the other processes wait
    for the coordinator's port to answer, at most ``timeout_s``: an address that cannot be
    reached raises :class:`TimeoutError` naming it, instead of JAX's abort (a C++ check
    failure, not an exception) or a hang.

    Example (two local CPU processes with 4 devices each, one global mesh of 8)::

        XLA_FLAGS=--xla_force_host_platform_device_count=4 python -c "
        from jaxrob.parallel import initialize_distributed, make_mesh
        initialize_distributed('127.0.0.1:12355', 2, PROCESS_ID)
        print(make_mesh())"

    Args:
      coordinator_address: ``host:port`` of process 0 (None: auto-detect; then
        ``num_processes`` and ``process_id`` must be None too).
      num_processes: number of processes of the job.
      process_id: this process, in ``[0, num_processes)``.
      timeout_s: the longest wait for the coordinator, and JAX's initialization timeout (for
        process 0: the longest wait for every other process to join; JAX aborts after it).
      cpu_collectives: cross-process collectives of the CPU backend (``"gloo"``, ``"mpi"``;
        None: JAX's default, which has none). Accelerator backends ignore it.
      heartbeat_timeout_s: seconds after which JAX declares a silent process dead and stops
        the others (None: JAX's default, 100 s).

    Raises:
      ValueError: a malformed address, process count or id, or timeout.
      TimeoutError: the coordinator did not answer within ``timeout_s``.
      ConnectionError: the coordinator's host cannot be resolved, or process 0 cannot listen
        on the port.
      RuntimeError: JAX's backend is already running or JAX is already initialised.
    """
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("initialize_distributed: expected coordinator_address, num_processes "
                         "and process_id together (or none of them, to auto-detect), got "
                         f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    try:
        timeout = float(timeout_s)
    except (TypeError, ValueError):
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"cpu_collectives: expected one of {list(CPU_COLLECTIVES)} or None, "
                         f"got {cpu_collectives!r}")
    if heartbeat_timeout_s is not None:
        if isinstance(heartbeat_timeout_s, bool) or not isinstance(heartbeat_timeout_s, int) \
                or heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s: expected a positive integer, got "
                             f"{heartbeat_timeout_s!r}")
    if coordinator_address is not None:
        host, port = _parse_address(coordinator_address)
        for v, name in ((num_processes, "num_processes"), (process_id, "process_id")):
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{name}: expected an integer, got {v!r}")
        num_processes, process_id = int(num_processes), int(process_id)
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id: expected 0 <= process_id < num_processes, got "
                             f"process_id={process_id}, num_processes={num_processes}")
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize_distributed: jax.distributed is already initialised")
    if _backend_initialized():
        raise RuntimeError("initialize_distributed: JAX's backend is already running; call it "
                           "first, before any array is created or computed")
    deadline = time.monotonic() + timeout
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {} if heartbeat_timeout_s is None else {
        "heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    if coordinator_address is None:
        jax.distributed.initialize(initialization_timeout=max(1, math.ceil(timeout)), **kwargs)
        return
    what = f"process {process_id} of {num_processes}"
    if process_id == 0:
        _check_port_free(port, what)
    else:
        _wait_for_coordinator(host, port, deadline, what)
    left = max(1, math.ceil(deadline - time.monotonic()))
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=left, **kwargs)
