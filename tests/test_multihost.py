"""Multi-process JAX on localhost: N CPU processes over one global mesh == one process.

The end-to-end check is ``experiments/multihost_check.py`` (its docstring has the command): 2
processes x 4 host devices (CI) and 4 x 2 (slow) run a robust evaluation, a ``run_chunks`` pass
over recorded data and DDPM training with checkpoints and an export; the same job in one
process with 8 devices is the reference; the Jacobian sweep (``--phases jacobian``, slow) too. A
killed process and the restarted job (slow) must end
with the same records and parameters.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from jaxrob.evaluation import run_chunks
from jaxrob.parallel import (
    broadcast_from_main,
    host_gather,
    initialize_distributed,
    make_mesh,
    process_rows,
    put_rows,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "multihost_check.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("multihost_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_ok(res):
    assert res["ok"], json.dumps(res, indent=1, default=str)


def test_two_processes_give_the_records_and_parameters_of_one(tmp_path):
    # the two-conv eps-model: the same sharded train step as the UNet's at a quarter of the
    # compile time (the UNet runs in the slow tests)
    res = _check_module().launch(tmp_path, num_processes=2, devices_per_process=4,
                                 model="tiny", timeout_s=180)
    _assert_ok(res)
    # the checks `ok` summarises, spelled out
    assert res["one_global_mesh"] and res["eval_predictions_identical"]
    assert res["eval_records_equal"] and res["run_chunks_records_equal"]
    assert res["train_params_equal"] and res["train_ema_equal"]
    assert res["train_resumed_from_checkpoint"]
    assert res["checkpoint_restores_in_one_process"] and res["export_loads_in_one_process"]
    assert res["each_process_reads_only_its_share"] and res["reads_cover_every_example"]
    assert res["reads_per_process"] == [12, 12]  # 3 chunks of 8, 4 rows per chunk each
    assert res["only_process_0_writes"]


# ~28 s of CPU over the three processes (30 s wall at load ~2, 6.6 min at load ~8); the mesh,
# run_chunks and records under it are covered in CI by
# test_two_processes_give_the_records_and_parameters_of_one
@pytest.mark.slow
def test_two_processes_jacobian_sweep_equals_one_process(tmp_path):
    """The Jacobian sweep of experiments/jacobian_spectrum.py (dense Jacobians, their directions
    sharded over all 8 devices of 2 processes) == the same sweep in one process of 8."""
    res = _check_module().launch(tmp_path, num_processes=2, devices_per_process=4,
                                 phases="jacobian", timeout_s=400)
    _assert_ok(res)
    assert res["one_global_mesh"] and res["jacobian_records_equal"]
    assert res["jacobian_max_abs_diff"] < 1e-5 and res["only_process_0_writes"]
    with np.load(tmp_path / "multi" / "proc0" / "result.npz") as z:
        svals = z["jac/svals"]
        assert svals.shape == (3, 64) and np.all(np.isfinite(svals))
        assert np.all(z["jac/jacobian_check"] < 1e-4)
    with pytest.raises(ValueError, match="phases: expected"):
        _check_module().launch(tmp_path, phases="jacobian,nope")


@pytest.mark.slow  # 4 processes compile the same programs at once: ~1 min on 2 cores
def test_four_processes_give_the_records_and_parameters_of_one(tmp_path):
    res = _check_module().launch(tmp_path, num_processes=4, devices_per_process=2,
                                 timeout_s=300)
    _assert_ok(res)
    assert res["reads_per_process"] == [6, 6, 6, 6]


@pytest.mark.slow  # three job attempts plus the reference: ~1.5 min on 2 cores
def test_killed_process_job_resumes_with_nothing_lost_or_repeated(tmp_path):
    res = _check_module().launch(tmp_path, num_processes=2, devices_per_process=4, kill=True,
                                 timeout_s=300)
    _assert_ok(res)
    # attempt 0: process 1 killed after 2 evaluation chunks; attempt 1: during training step 3
    assert res["attempts"][0][1] == 17 and res["attempts"][1][1] == 17
    assert res["attempts"][2] == [0, 0]
    assert res["kill_resume_ok"] and res["resumed_eval_chunks_run"] == 0


def _child_env():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               + os.environ.get("JAXROB_TEST_XLA_EXTRA", ""), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    return env


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time():
    import socket

    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        busy = socket.socket()
        busy.bind(("", 0))
        busy.listen()
        code = (
            "import sys\n"
            "from jaxrob.parallel import initialize_distributed\n"
            f"try:\n    initialize_distributed('127.0.0.1:{busy.getsockname()[1]}', 2, 0)\n"
            "except ConnectionError as e:\n    print('P0', e)\n"
            f"initialize_distributed('127.0.0.1:{port}', 2, 1, timeout_s=2)\n")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True,
                           text=True, timeout=60)
        took = time.perf_counter() - t0
        busy.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "TimeoutError" in r.stderr and f"127.0.0.1:{port} could not be reached" in r.stderr
    assert "process 1 of 2" in r.stderr and "Check failure" not in r.stderr
    assert "P0 process 0 of 2" in r.stdout and "cannot listen on port" in r.stdout
    assert took < 30  # the 2 s wait plus starting Python and importing JAX


@pytest.mark.parametrize("args, kwargs, match", [
    (("localhost", 2, 0), {}, "host:port"),
    (("127.0.0.1:0", 2, 0), {}, "port in 1..65535"),
    (("127.0.0.1:99999", 2, 0), {}, "port in 1..65535"),
    (("127.0.0.1:1234", 2, 2), {}, "process_id"),
    (("127.0.0.1:1234", 0, 0), {}, "process_id"),
    (("127.0.0.1:1234", 2, 1.5), {}, "process_id: expected an integer"),
    (("127.0.0.1:1234", None, None), {}, "together"),
    ((None, 2, None), {}, "together"),
    (("127.0.0.1:1234", 2, 0), {"timeout_s": 0}, "timeout_s"),
    (("127.0.0.1:1234", 2, 0), {"timeout_s": float("nan")}, "timeout_s"),
    (("127.0.0.1:1234", 2, 0), {"cpu_collectives": "nccl"}, "cpu_collectives"),
    (("127.0.0.1:1234", 2, 0), {"heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
])
def test_bad_distributed_arguments_raise_before_any_work(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        initialize_distributed(*args, **kwargs)
    assert not jax.distributed.is_initialized()


# ----------------------------------------------------------------------------- one process
# The helpers on one process (the multi-process paths run in the end-to-end check above).


class _Recording:
    """Rows read through ``array[int_rows]``."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.reads = []

    def __getitem__(self, rows):
        self.reads.append(np.asarray(rows).tolist())
        return self.a[rows]


def test_run_chunks_reads_data_only_through_row_indexing():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    rec = _Recording(x)
    run = run_chunks(lambda b, k: {"s": jnp.sum(b["x"], -1)}, {"x": rec, "index": np.arange(10)},
                     key=jr.key(0), batch_size=4, mesh=make_mesh(2), progress=False)
    np.testing.assert_array_equal(run.records["s"], x.sum(-1))
    # three chunks of 4 rows, the last padded with its last row
    assert rec.reads == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]


def test_put_rows_process_rows_and_gathers_on_one_process():
    mesh = make_mesh(4)
    a = np.arange(12.0).reshape(6, 2)
    placed = put_rows(a, np.array([5, 0, 1, 2]), mesh)
    assert placed.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(host_gather({"p": placed})["p"], a[[5, 0, 1, 2]])
    np.testing.assert_array_equal(process_rows(8, mesh), np.arange(8))
    got = broadcast_from_main({"a": a, "n": np.int64(3)})
    np.testing.assert_array_equal(got["a"], a)
    assert int(got["n"]) == 3


def test_put_rows_bad_rows_are_refused():
    mesh = make_mesh(4)
    with pytest.raises(ValueError, match="divide over 4 devices"):
        put_rows(np.zeros((6, 2)), np.arange(6), mesh)
    with pytest.raises(ValueError, match="1-D integer"):
        put_rows(np.zeros((6, 2)), np.zeros((4,)), mesh)
