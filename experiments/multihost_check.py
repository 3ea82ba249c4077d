"""Multi-process JAX on one machine: N local CPU processes over one global mesh == one process.

Starts ``--num_processes`` JAX processes on localhost (``jaxrob.parallel.initialize_distributed``
with a local coordinator and gloo CPU collectives), each with ``--devices_per_process`` host
devices, over one global ``data`` mesh; then one process with all those devices as the
reference. Every process runs the same job:

1. a robust evaluation (``jaxrob.evaluation.evaluate_robustness``: a tiny DiffPure purifier
   over a linear classifier, PGD with EoT, resumable chunk store);
2. a per-example pass through ``jaxrob.evaluation.run_chunks`` over data that records which
   rows each process read;
3. (``--phases`` with ``jacobian``) the Jacobian sweep of ``experiments/jacobian_spectrum.py``
   (its run_chunks function and chunk mesh: the dense Jacobian of the fixed-key purifier per
   image, directions sharded over every device of the global mesh, its singular values and
   spectrum summary) over ``N_JAC`` images;
4. DDPM training of a tiny UNet (``--model unet``; ``--model tiny``: two convolutions, the same
   sharded train step at a quarter of the compile time), parameters from
   ``jaxrob.models.random_variables``, with orbax checkpoints, stopped half-way and resumed
   from its checkpoint, then a ``save_params`` export.

and the launcher checks that the per-example records and the trained parameters equal the
reference's, that each process read only its share of the data, that only process 0 wrote
results (every process has its own results directory, as hosts of a pod have their own disks;
the checkpoints go to one shared directory, as orbax needs), and that the checkpoint and the
export written by N processes restore in one. ``--kill`` kills one process mid-run (during the
evaluation, then during training) and restarts the whole job each time, as a scheduler would:
the resumed job must end with the same records and parameters, nothing lost or counted twice.

Command (2 processes x 4 devices; about 30 s on 2 idle cores, prints a JSON verdict, exit
status 0 when every check passes)::

    python experiments/multihost_check.py --workdir /tmp/multihost --num_processes 2 \\
        --devices_per_process 4 [--kill]

The Jacobian sweep alone (2 x 4 processes x devices == 1 x 8, float tolerance)::

    python experiments/multihost_check.py --workdir /tmp/multihost_jac --phases jacobian

A worker is this script with ``--role worker``; the launcher starts them with the right
environment (``XLA_FLAGS=--xla_force_host_platform_device_count=D``, ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

N_JAC = 3  # images of the Jacobian sweep (chunks of 2: one padded)
N_EVAL = 20  # examples of the robust evaluation (not a multiple of the batch: padding)
EVAL_BATCH = 8
HW = 8
TRAIN_BATCH = 16
TRAIN_STEPS = 4
KILL_EXIT = 17  # exit status of a worker killed on purpose


# ----------------------------------------------------------------------------- worker


class _RecordingArray:
    """A host array that records which rows were read (``array[int_rows]``)."""

    def __init__(self, array):
        import numpy as np

        self.array = np.asarray(array)
        self.shape, self.dtype, self.ndim = self.array.shape, self.array.dtype, self.array.ndim
        self.reads: list[list[int]] = []

    def __getitem__(self, rows):
        import numpy as np

        rows = np.asarray(rows)
        self.reads.append(rows.reshape(-1).tolist())
        return self.array[rows]


def _eval_data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (N_EVAL, HW, HW, 1)).astype(np.float32)
    y = rng.integers(0, 3, N_EVAL).astype(np.int32)
    idx = np.arange(100, 100 + N_EVAL)  # global dataset indices (the per-example keys)
    return x, y, idx


def _purifier(num_steps: int = 1):
    """A tiny DiffPure purifier: ``num_steps`` reverse steps of a conv eps-model."""
    import jax
    import numpy as np

    import jaxrob.diffusion as jd
    from jaxrob.purify import diffpure

    rng = np.random.default_rng(1)
    w_conv = (0.1 * rng.standard_normal((3, 3, 1, 1))).astype(np.float32)
    eps_fn = lambda x, s: jax.lax.conv_general_dilated(
        x, w_conv, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return diffpure(eps_fn, jd.linear_schedule(100), t_star=0.1, num_steps=num_steps)


def _defended():
    """The tiny purifier (one reverse step) over a linear classifier."""
    import numpy as np

    from jaxrob.purify import purified_logits

    w = np.random.default_rng(2).standard_normal((HW * HW, 3)).astype(np.float32)
    return purified_logits(lambda z, key=None: z.reshape(z.shape[0], -1) @ w, _purifier())


def _attack(model, x, y, key):
    from jaxrob.attacks import pgd

    return pgd(model, x, y, key, eps=0.1, num_steps=2, loss="ce", eot_samples=2)


def _die(where: str) -> None:
    print(f"worker: killed on purpose {where}", flush=True)
    os._exit(KILL_EXIT)


def _run_eval(mesh, out: pathlib.Path, kill_at_chunk: int | None):
    import jax.random as jr

    from jaxrob.evaluation import ChunkStore, evaluate_robustness

    x, y, idx = _eval_data()
    store = ChunkStore(out / "eval_chunks", fingerprint={"check": "multihost", "n": N_EVAL})
    chunks = []

    def log(line):
        chunks.append(line)
        if kill_at_chunk is not None and len(chunks) == kill_at_chunk:
            _die(f"after evaluation chunk {len(chunks)}")

    res = evaluate_robustness(_defended(), _attack, x, y, idx, key=jr.key(0),
                              protocols=("one_shot", "worst_of@2"), batch_size=EVAL_BATCH,
                              store=store, mesh=mesh, progress=False, log=log)
    return res


def _run_reads(mesh):
    """run_chunks over recorded data: which rows did this process read?"""
    import jax.numpy as jnp
    import jax.random as jr

    from jaxrob.evaluation import run_chunks

    x, _, idx = _eval_data()
    rec = _RecordingArray(x)
    fn = lambda batch, keys: {"mean": jnp.mean(batch["x"], axis=(1, 2, 3))}
    run = run_chunks(fn, {"x": rec, "index": idx}, key=jr.key(0), batch_size=EVAL_BATCH,
                     mesh=mesh, progress=False)
    return rec.reads, run.records["mean"]


def _run_jacobian(mesh):
    """The Jacobian sweep's dense part (``experiments/jacobian_spectrum.py``) over N_JAC images:
    per image the 64 x 64 Jacobian of a 2-step fixed-key purifier, its directions sharded over
    every device of ``mesh`` (``jaxrob.analysis.jacobian(..., mesh=)``), and its spectrum."""
    import jax.random as jr
    import numpy as np

    from experiments import jacobian_spectrum as js
    from jaxrob.evaluation import run_chunks

    x, _, idx = _eval_data()
    study = {"method": "jvp_chunks", "chunk": 8, "unclipped": False, "low": 0.25, "high": 1.0,
             "dense": True, "topk": 0, "num": 0}
    run = run_chunks(js._chunk, {"x": np.asarray(x[:N_JAC]), "index": idx[:N_JAC]},
                     key=jr.key(7), args=("dense", _purifier(2), None, study, mesh),
                     batch_size=2, mesh=js._chunk_mesh("dense", study, mesh), progress=False)
    return {f"jac/{k}": v for k, v in run.records.items() if k != "seconds"}


def _tiny_eps_model():
    """A two-conv eps-model with a step embedding (compiles ~4x faster than the tiny UNet)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class TinyEps(nn.Module):
        @nn.compact
        def __call__(self, x, step, train: bool = False):
            freqs = jnp.arange(1, 5, dtype=jnp.float32)[None, :]
            temb = nn.Dense(8)(jnp.sin(step.astype(jnp.float32)[:, None] / 100.0 * freqs))
            h = nn.Conv(8, (3, 3))(x) + temb[:, None, None, :]
            return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))

    return TinyEps()


MODELS = ("unet", "tiny")


def _train_setup(mesh, model: str):
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import jaxrob.diffusion as jd
    from jaxrob import training as jt
    from jaxrob.models import UNet, random_variables

    if model == "unet":
        unet = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    else:
        unet = _tiny_eps_model()
    variables = random_variables(unet, jax.ShapeDtypeStruct((1, HW, HW, 1), jnp.float32),
                                 jax.ShapeDtypeStruct((1,), jnp.int32), seed=0)
    # SGD: Adam would turn the rounding noise of a gradient that is zero in exact arithmetic
    # (an attention key bias) into lr-sized steps of either sign, so the two runs' parameters
    # would differ there by ~lr however exact the multi-process reduction is
    tx, _ = jt.make_optimizer(name="sgd", learning_rate=0.05, total_steps=TRAIN_STEPS)
    init = lambda: jt.create_train_state(variables, tx, jr.key(1), ema=True)
    step = jt.make_ddpm_train_step(unet.apply, tx, jd.linear_schedule(100), ema_decay=0.9,
                                   mesh=mesh)

    def batches(start):
        i = start
        while True:
            rng = np.random.default_rng(1000 + i)
            yield {"image": rng.uniform(0, 1, (TRAIN_BATCH, HW, HW, 1)).astype(np.float32)}
            i += 1

    return init, step, batches


def _run_train(mesh, out: pathlib.Path, ckpt_dir: pathlib.Path, kill_at_step: int | None,
               resume_split: bool, model: str):
    from jaxrob import training as jt
    from jaxrob.checkpoint import Checkpointer

    init, step, batches = _train_setup(mesh, model)
    fp = {"check": "multihost", "model": model}
    summaries = []

    def on_log(record):
        if kill_at_step is not None and record["step"] == kill_at_step:
            _die(f"at training step {record['step']}")

    stops = (TRAIN_STEPS // 2, TRAIN_STEPS) if resume_split else (TRAIN_STEPS,)
    for num_steps in stops:  # a first invocation, then a second one that resumes from it
        ckpt = Checkpointer(ckpt_dir, fingerprint=fp, save_every=2)
        state, summary = jt.train_loop(step, init, batches, num_steps=num_steps, workdir=out,
                                       checkpointer=ckpt, mesh=mesh, log_every=1,
                                       progress=False, on_log=on_log)
        ckpt.close()
        summaries.append({k: summary[k] for k in ("start_step", "final_step", "resumed",
                                                  "steps_run")})
    return state, summaries


def _flat(tree, prefix: str) -> dict:
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return out


def _restore_foreign(ckpt_dir: pathlib.Path, export_dir: pathlib.Path, mesh,
                     model: str) -> dict:
    """The checkpoint and export written by another job (several processes), read here."""
    from jaxrob.checkpoint import Checkpointer, load_params
    from jaxrob.training import abstract_on_mesh

    init, _, _ = _train_setup(mesh, model)
    ckpt = Checkpointer(ckpt_dir, fingerprint={"check": "multihost", "model": model})
    state = ckpt.restore(abstract_on_mesh(init, mesh))
    ckpt.close()
    params, _ = load_params(export_dir)
    return {**_flat(state.params, "ckpt_params"), **_flat(params, "export_params"),
            "ckpt_step": int(state.step)}


def worker(args) -> None:
    """One process of the job (or the whole reference job with ``--num_processes 1``)."""
    import numpy as np

    from jaxrob.parallel import initialize_distributed

    if args.num_processes > 1:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                               timeout_s=args.timeout_s, heartbeat_timeout_s=30)
    import jax

    from jaxrob.checkpoint import save_params
    from jaxrob.parallel import is_main_process, make_mesh, process_rows

    t0 = time.perf_counter()
    job = pathlib.Path(args.workdir)
    out = job / f"proc{args.process_id}"  # this process's own "disk": only process 0 writes
    diag = job / "diag"  # instrumentation of the check itself, one file per process
    diag.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    kill_here = args.kill_process == args.process_id

    phases = {}

    def lap(name):
        phases[name] = round(time.perf_counter() - t0 - sum(phases.values()), 2)

    phases_run = args.phases.split(",")
    lap("init")
    res, reads, means, jac, train, export, foreign = None, [], None, {}, None, None, {}
    if "eval" in phases_run:
        res = _run_eval(mesh, out, args.kill_at_chunk if kill_here else None)
        lap("eval")
        reads, means = _run_reads(mesh)
        lap("run_chunks")
    if "jacobian" in phases_run:
        jac = _run_jacobian(mesh)
        lap("jacobian")
    if "train" in phases_run:
        state, train = _run_train(mesh, out, job / "ckpt",
                                  args.kill_at_step if kill_here else None,
                                  resume_split=not args.no_resume_split, model=args.model)
        lap("train")
        export = save_params(job / "export", state.ema_params, {"check": "multihost"},
                             overwrite=True)
        lap("export")
        foreign = (_restore_foreign(pathlib.Path(args.restore_from) / "ckpt",
                                    pathlib.Path(args.restore_from) / "export", mesh,
                                    args.model)
                   if args.restore_from else {})
        lap("restore")
    (diag / f"process{args.process_id}.json").write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "reads": reads, "rows_of_eval_batch": process_rows(EVAL_BATCH, mesh).tolist(),
        "chunks_run": res and res["chunks_run"], "chunks_total": res and res["chunks_total"],
        "train": train, "self_check": res and res["self_check"],
        "wall_s": time.perf_counter() - t0, "phases_s": phases, "phases": phases_run,
    }))
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        per = ({f"eval/{k}": v for k, v in res["per_example"].items() if k != "seconds"}
               if res else {})
        trained = ({**_flat(state.params, "params"), **_flat(state.ema_params, "ema")}
                   if train is not None else {})
        np.savez(out / "result.npz", **per, **({"reads_mean": means} if res else {}),
                 **trained, **jac, **{k: v for k, v in foreign.items()})
        (out / "results.json").write_text(json.dumps({
            "clean": res and res["clean"], "adv": res and res["adv"],
            "export": export and str(export), "chunks_run": res and res["chunks_run"],
            "train": train}, indent=1, default=str))
    print(f"worker {args.process_id}/{args.num_processes}: done in "
          f"{time.perf_counter() - t0:.1f} s {phases}", flush=True)


# ----------------------------------------------------------------------------- launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices: int) -> dict:
    env = dict(os.environ)
    # the parent's other XLA flags (e.g. the YNN mode) hold for the workers too
    keep = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={int(devices)}", *keep])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.pop("JAXROB_TYPECHECK", None)
    return env


def run_job(workdir: pathlib.Path, num_processes: int, devices_per_process: int, *,
            timeout_s: float, extra: list[str] = (), logs: pathlib.Path) -> list[int]:
    """Start every process of one job, wait for all; a killed process stops the others.

    Returns the exit statuses (a process still running at the deadline, or stopped because
    another one died, reads -9).
    """
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i in range(num_processes):
        f = open(logs / f"process{i}.log", "w")  # noqa: SIM115 - closed below
        files.append(f)
        cmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--role", "worker",
               "--workdir", str(workdir), "--num_processes", str(num_processes),
               "--process_id", str(i), "--coordinator_address", f"127.0.0.1:{port}",
               "--timeout_s", str(min(timeout_s, 120.0)), *extra]
        procs.append(subprocess.Popen(cmd, env=worker_env(devices_per_process), stdout=f,
                                      stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = [None] * num_processes
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                break  # a process died (the others wait for it in a collective) or timeout
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the worker, nothing else
                p.wait()
            codes[i] = p.returncode if codes[i] is None else codes[i]
        for f in files:
            f.close()
    return [int(c) for c in codes]


def _tail(path: pathlib.Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not ln.startswith(("I1", "W1", "I0", "W0"))]
    return "\n".join(keep[-n:])


def _compare(multi: dict, ref: dict, check: dict) -> None:
    import numpy as np

    def same(prefix, exact, rtol=1e-5, atol=1e-6):
        keys = sorted(k for k in ref if k.startswith(prefix))
        other = sorted(k for k in multi if k.startswith(prefix))
        if not keys or keys != other:
            return False
        for k in keys:
            a, b = multi[k], ref[k]
            ok = (np.array_equal(a, b) if exact or not np.issubdtype(a.dtype, np.floating)
                  else np.allclose(a, b, rtol=rtol, atol=atol))
            if not ok:
                return False
        return True

    if any(k.startswith("jac/") for k in ref):
        # the Jacobian sweep: float tolerance (a cross-device reduction in the SVD's inputs)
        check["jacobian_records_equal"] = same("jac/", exact=False, rtol=1e-5, atol=1e-6)
        check["jacobian_max_abs_diff"] = max(
            float(np.abs(np.asarray(multi[k], np.float64) - ref[k]).max())
            for k in ref if k.startswith("jac/") and k in multi)
    if not any(k.startswith("eval/") for k in ref):
        return
    check["eval_records_equal"] = same("eval/", exact=False, rtol=0, atol=1e-6)
    check["eval_predictions_identical"] = same("eval/pred_", exact=True)
    check["run_chunks_records_equal"] = same("reads_mean", exact=False, rtol=0, atol=1e-7)
    check["train_params_equal"] = same("params[", exact=False)
    check["train_ema_equal"] = same("ema[", exact=False)
    ckpt = {k[len("ckpt_params"):]: v for k, v in ref.items() if k.startswith("ckpt_params")}
    exp = {k[len("export_params"):]: v for k, v in ref.items() if k.startswith("export_params")}
    mine = {k[len("params"):]: v for k, v in multi.items() if k.startswith("params[")}
    ema = {k[len("ema"):]: v for k, v in multi.items() if k.startswith("ema[")}
    check["checkpoint_restores_in_one_process"] = bool(ckpt) and int(ref["ckpt_step"]) == \
        TRAIN_STEPS and sorted(ckpt) == sorted(mine) and all(
            np.array_equal(ckpt[k], mine[k]) for k in ckpt)
    check["export_loads_in_one_process"] = bool(exp) and sorted(exp) == sorted(ema) and all(
        np.array_equal(exp[k], ema[k]) for k in exp)


def _check_reads(diags: list[dict], check: dict) -> None:
    """Each process read only its rows; together every padded row exactly once."""
    n_pad = -(-N_EVAL // EVAL_BATCH) * EVAL_BATCH
    counts = [sum(len(r) for r in d["reads"]) for d in diags]
    seen = sorted({i for d in diags for r in d["reads"] for i in r})
    layout = sorted(i for d in diags for i in d["rows_of_eval_batch"])
    check["reads_per_process"] = counts
    check["each_process_reads_only_its_share"] = all(c == n_pad // len(diags) for c in counts)
    check["reads_cover_every_example"] = seen == list(range(N_EVAL)) and sum(counts) == n_pad
    check["batch_rows_partitioned"] = layout == list(range(EVAL_BATCH))


PHASES = ("eval", "jacobian", "train")
DEFAULT_PHASES = "eval,train"


def launch(workdir: str | os.PathLike, *, num_processes: int = 2, devices_per_process: int = 4,
           kill: bool = False, model: str = "unet", timeout_s: float = 240.0,
           phases: str = DEFAULT_PHASES) -> dict:
    """Run the multi-process job (and, with ``kill``, its killed and restarted attempts), then
    the one-process reference; returns the checks (``"ok"``: all passed).

    ``model``: the eps-model trained, ``"unet"`` (jaxrob's UNet, tiny configuration) or
    ``"tiny"`` (two convolutions: the same sharded train step at a quarter of the compile time).
    ``phases``: comma-separated subset of ``eval`` (robust evaluation + row reads),
    ``jacobian`` (the Jacobian sweep) and ``train`` (training, checkpoints, export); the full
    set of checks needs ``eval,train`` (``kill`` too).
    """
    import numpy as np

    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    wanted = phases.split(",")
    if not wanted or set(wanted) - set(PHASES):
        raise ValueError(f"phases: expected a comma-separated subset of {list(PHASES)}, got "
                         f"{phases!r}")
    full = {"eval", "train"} <= set(wanted)
    if kill and not full:
        raise ValueError("kill: needs phases with eval and train")

    root = pathlib.Path(workdir).absolute()
    multi, ref = root / "multi", root / "single"
    for d in (multi, ref):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    t0 = time.perf_counter()
    attempts = []
    plan = ([["--kill_process", "1", "--kill_at_chunk", "2"],
             ["--kill_process", "1", "--kill_at_step", "3", "--no_resume_split"],
             ["--no_resume_split"]] if kill else [[]])
    for i, extra in enumerate(plan):
        codes = run_job(multi, num_processes, devices_per_process, timeout_s=timeout_s,
                        extra=[*extra, "--model", model, "--phases", phases],
                        logs=root / "logs" / f"multi_attempt{i}")
        attempts.append(codes)
        expect_kill = i < len(plan) - 1
        if expect_kill and KILL_EXIT not in codes or not expect_kill and any(codes):
            tails = {f"process{j}": _tail(root / "logs" / f"multi_attempt{i}" /
                                          f"process{j}.log") for j in range(num_processes)}
            return {"ok": False, "failed": f"attempt {i}: exit statuses {codes}",
                    "log_tails": tails}
    t_multi = time.perf_counter() - t0
    codes = run_job(ref, 1, num_processes * devices_per_process, timeout_s=timeout_s,
                    extra=["--restore_from", str(multi), "--model", model, "--phases", phases],
                    logs=root / "logs" / "single")
    if any(codes):
        return {"ok": False, "failed": f"reference: exit status {codes}",
                "log_tails": {"single": _tail(root / "logs" / "single" / "process0.log")}}
    diags = [json.loads((multi / "diag" / f"process{i}.json").read_text())
             for i in range(num_processes)]
    check: dict = {"num_processes": num_processes, "devices_per_process": devices_per_process,
                   "model": model, "attempts": attempts}
    check["one_global_mesh"] = all(d["process_count"] == num_processes and d["devices"] ==
                                   num_processes * devices_per_process for d in diags)
    with np.load(multi / "proc0" / "result.npz") as z:
        m = {k: z[k] for k in z.files}
    with np.load(ref / "proc0" / "result.npz") as z:
        r = {k: z[k] for k in z.files}
    _compare(m, r, check)
    others = [p for i in range(1, num_processes) for p in (multi / f"proc{i}").rglob("*")]
    check["only_process_0_writes"] = not others and (multi / "proc0" / "results.json").is_file()
    last = diags[0]
    check["phases"] = wanted
    if not full:
        check["phases_s"] = {"multi_process0": diags[0].get("phases_s")}
        check["total_s"] = round(time.perf_counter() - t0, 1)
        check["ok"] = all(v for k, v in check.items() if isinstance(v, bool))
        return check
    _check_reads(diags, check)
    check["self_check_agrees"] = all(not d["self_check"]["mismatches"] for d in diags)
    if kill:
        check["resumed_eval_chunks_run"] = last["chunks_run"]
        check["resumed_train"] = last["train"]
        # the last attempt found every evaluation chunk done by attempt 1 (killed in training),
        # and training resumed from the step-2 checkpoint
        check["kill_resume_ok"] = (last["chunks_run"] == 0 and last["train"][0]["resumed"]
                                   and last["train"][0]["start_step"] == 2)
    else:
        check["train_resumed_from_checkpoint"] = (
            len(last["train"]) == 2 and last["train"][1]["resumed"]
            and last["train"][1]["start_step"] == TRAIN_STEPS // 2)
    check["phases_s"] = {"multi_process0": diags[0].get("phases_s")}
    check["multi_s"] = round(t_multi, 1)
    check["total_s"] = round(time.perf_counter() - t0, 1)
    check["ok"] = all(v for k, v in check.items() if isinstance(v, bool))
    return check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--kill", action="store_true", help="kill one process mid-run and resume")
    p.add_argument("--model", choices=MODELS, default="unet", help="the eps-model trained")
    p.add_argument("--timeout_s", type=float, default=240.0)
    p.add_argument("--phases", default=DEFAULT_PHASES,
                   help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--role", choices=("launcher", "worker"), default="launcher")
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--kill_process", type=int, default=None)
    p.add_argument("--kill_at_chunk", type=int, default=None)
    p.add_argument("--kill_at_step", type=int, default=None)
    p.add_argument("--no_resume_split", action="store_true")
    p.add_argument("--restore_from", default=None)
    args = p.parse_args(argv)
    if args.role == "worker":
        worker(args)
        return 0
    result = launch(args.workdir, num_processes=args.num_processes,
                    devices_per_process=args.devices_per_process, kill=args.kill,
                    model=args.model, timeout_s=args.timeout_s, phases=args.phases)
    print(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
