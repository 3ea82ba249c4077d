"""What every benchmark here does the same way: worker processes, timers, result files.

XLA reads its flags once, when JAX starts, and PyTorch's glibc malloc settings must be in the
environment when its process starts, so each XLA:CPU setting and PyTorch run in their own
long-lived worker process: the benchmark's own file started with ``--jax-setting NAME`` or
``--torch-worker``, speaking JSON lines on stdin/stdout (:func:`serve` in the worker,
:class:`Proc` in the driver). Every call is timed as ``[wall, own CPU, other processes' CPU]``
seconds (:func:`timed_calls`); the driver asks the workers for timed calls in rotating order
(:func:`timed_round`), so slow phases of a shared machine hit every setting alike.

Imported by ``bench_unet.py``, ``bench_attack.py``, ``bench_jacobian.py``, ``conv_kernels.py``
and ``profile_jacobian.py`` (this folder is on ``sys.path`` when they run); JAX and PyTorch are
imported lazily, so a PyTorch worker never starts JAX and the driver starts neither.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# glibc malloc tuning for PyTorch (PERF_NOTES.md section 3): must be in the environment when
# the process starts, hence the PyTorch subprocess.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}
# a JAX worker's persistent compilation cache directory (bench_unet.py --compile-cache)
COMPILE_CACHE_ENV = "JAXROB_BENCH_COMPILE_CACHE"
# what a worker's setting alone decides: never inherited from the driver's environment
_SETTING_ENV = ("XLA_FLAGS", "JAXROB_CPU_DEVICES", "JAXROB_CPU_NO_YNN", "JAXROB_CPU_YNN",
                COMPILE_CACHE_ENV, *MALLOC_ENV)
# the arrays of a truncated reverse chain (jaxrob.diffusion.truncated) handed to PyTorch
CHAIN_KEYS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_coef_x0",
              "posterior_coef_xt", "posterior_variance", "alphas_cumprod_prev",
              "one_minus_alphas_cumprod_prev", "model_steps")
TORCH_SLOW_FACTOR = 5.0   # thread calibration: stop timing 2 threads once this much slower


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def ok(flag):
    return "OK" if flag else "FAIL"


# ----------------------------------------------------------------------------------------------
# arrays on disk (every worker loads the same weights, inputs and chains)
# ----------------------------------------------------------------------------------------------
def flatten(tree, prefix=""):
    """Nested mapping -> ``{"a/b/c": leaf}`` (for ``np.savez``)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, name) if isinstance(v, Mapping) else {name: v})
    return out


def unflatten(flat):
    """Inverse of :func:`flatten`."""
    tree = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save_tree(path, tree):
    import numpy as np

    np.savez(path, **{k: np.asarray(a) for k, a in flatten(tree).items()})


def load_tree(path, convert=None):
    """A tree saved by :func:`save_tree`, leaves passed through ``convert`` (e.g. jnp.asarray)."""
    import numpy as np

    convert = convert or np.asarray
    return unflatten({k: convert(a) for k, a in np.load(path).items()})


def save_fields(path, obj, keys=CHAIN_KEYS, **extra):
    """``np.savez`` of the attributes ``keys`` of ``obj`` (a schedule or chain) and ``extra``."""
    import numpy as np

    np.savez(path, **{k: np.asarray(getattr(obj, k)) for k in keys},
             **{k: np.asarray(v) for k, v in extra.items()})


def count_params(tree):
    import jax

    return int(sum(a.size for a in jax.tree.leaves(tree)))


def diff(a, ref):
    """``{"max_abs_diff": max|a - ref|, "max_abs_ref": max|ref|}`` in float64."""
    import numpy as np

    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return {"max_abs_diff": float(np.abs(a - ref).max()), "max_abs_ref": float(np.abs(ref).max())}


def nchw(a):
    """NHWC array -> float32 NCHW torch tensor in channels_last memory."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(a, dtype=np.float32)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


def nhwc(t):
    """NCHW torch tensor -> NHWC numpy array."""
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def mnist_test_image():
    """``(x (1, 28, 28, 1), source)``: MNIST test[0], or a uniform random image without it."""
    import numpy as np

    try:
        from jaxrob.data import load_dataset

        ddir = os.environ.get("JAXROB_DATA_DIR") or os.path.join(REPO, "..", "shared",
                                                                 "datasets")
        ds = load_dataset("mnist", "test[:1]", data_dir=ddir)
        return np.array(ds.images[:1], np.float32), "mnist test[0]"
    except (OSError, ValueError) as e:
        import jax.random as jr

        x = np.asarray(jr.uniform(jr.key(3), (1, 28, 28, 1)))
        return x, f"uniform random (MNIST unavailable: {type(e).__name__})"


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s():
    """CPU-seconds all processes have spent busy since boot (/proc/stat; 0 if unavailable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _CLK_TCK   # all but idle and iowait


def timed_calls(fn, inner):
    """Run ``fn`` ``inner`` times; per call [wall_s, own_cpu_s, foreign_cpu_s].

    ``own_cpu_s`` counts all threads of this process; ``foreign_cpu_s`` is what every other
    process on the machine used meanwhile (other agents, tests, idle-spinning workers), from
    /proc/stat at 1/CLK_TCK resolution.
    """
    out = []
    for _ in range(inner):
        b0 = machine_busy_s()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        out.append([wall, cpu, max(0.0, machine_busy_s() - b0 - cpu)])
    return out


def inner_for(seconds, target, max_inner=20):
    """Calls per timed batch so that one batch takes about ``target`` seconds."""
    return max(1, min(max_inner, round(target / max(seconds, 1e-6))))


def call_stats(calls, unit="call"):
    """Median / range / CPU / load of ``calls`` ([wall, own_cpu, foreign_cpu] each)."""
    walls = [c[0] for c in calls]
    return {f"s_per_{unit}": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "n": len(walls), f"cpu_s_per_{unit}": statistics.median(c[1] for c in calls),
            "util": sum(c[1] for c in calls) / sum(walls),
            "foreign_load": sum(c[2] for c in calls) / sum(walls)}


def rss_kb(field):
    """A ``/proc/self/status`` memory field in kB (``VmRSS``, ``VmHWM``); -1 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss():
    """Reset VmHWM (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def first_call(call):
    """Call once: its output, wall, CPU and foreign-CPU seconds (as :func:`timed_calls`), and
    the process's peak RSS over the call (``VmHWM`` reset just before)."""
    gc.collect()
    before = rss_kb("VmRSS")
    reset = reset_peak_rss()
    b0 = machine_busy_s()
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    first, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"out": out, "first_call_s": first, "rss_before_kb": before,
            "peak_kb": rss_kb("VmHWM"), "hwm_reset": reset,
            "first_call": [first, cpu, max(0.0, machine_busy_s() - b0 - cpu)]}


def compile_timed(jitted, args):
    """Lower and compile ``jitted`` for ``args``, timed apart; XLA's temp buffer size."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:   # not every backend reports it
        temp = None
    return {"compiled": compiled, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "xla_temp_bytes": temp}


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------
def serve(worker_factory):
    """JSON-lines server on the original stdout; everything else printed goes to stderr.

    A request ``{"op": NAME, **kwargs}`` calls ``worker.NAME(**kwargs)`` and answers
    ``{"ok": True, **result}`` or ``{"ok": False, "error": ...}``; ``{"op": "exit"}`` ends it.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = worker_factory()
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "exit":
            break
        try:
            res = {"ok": True, **getattr(worker, op)(**msg)}
        except Exception as e:  # reported to the driver, which records it and goes on
            traceback.print_exc()
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(res) + "\n")


class _Worker:
    """Registered calls (``self.fns[name]``) the driver times with ``run``."""

    def run(self, name, inner=1):
        return {"calls": timed_calls(self.fns[name], inner)}

    def release(self):
        self.fns.clear()
        gc.collect()
        return {}


class JaxWorker(_Worker):
    """Base of the JAX workers: XLA:CPU set up before JAX starts, then checked.

    Args:
      setting: the setting's name (for messages).
      devices: XLA host devices.
      ynn: ``jaxrob.parallel.YNN_MODES`` key.
      shard: make ``self.mesh`` (a ``data`` mesh over all devices) when ``devices > 1``.
    """

    def __init__(self, setting, devices, ynn, *, shard=True):
        from jaxrob import parallel

        parallel.configure_cpu(device_count=devices, ynn=ynn)
        import jax

        cache = os.environ.get(COMPILE_CACHE_ENV)
        if cache:   # reruns load executables instead of compiling them
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        if len(jax.devices()) != devices:
            raise RuntimeError(f"{setting}: expected {devices} devices, got {jax.devices()}")
        self.setting = setting
        self.parallel = parallel
        self.mesh = parallel.make_mesh() if shard and devices > 1 else None
        self.fns = {}

    def hello(self, extra=()):
        """Device count, XLA flags, and the versions of jax, jaxlib, flax and ``extra``."""
        import importlib

        import jax

        mods = ("jax", "jaxlib", "flax", *extra)
        return {"devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "versions": {m: importlib.import_module(m).__version__ for m in mods}}

    def release(self):
        import jax

        super().release()
        jax.clear_caches()
        return {}


class TorchWorker(_Worker):
    """Base of the PyTorch workers: 2 threads (see :meth:`pick_threads`), ``SEED`` if set."""

    SEED = None

    def __init__(self):
        import torch

        torch.set_num_threads(2)
        if self.SEED is not None:
            torch.manual_seed(self.SEED)
        self.torch = torch
        self.threads = 2
        self.fns = {}

    def hello(self):
        return {"versions": {"torch": self.torch.__version__},
                "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}}

    def pick_threads(self, grad, threads):
        """Set the thread count: ``"1"``, ``"2"`` or ``"auto"`` (time ``grad`` with 1 and 2).

        ``torch.set_num_threads(2)`` is right on an idle 2-core machine, but when other
        processes keep a core busy, OpenMP's spinning threads stall for seconds per call.

        Returns:
          ``{"threads": n, "calibration_s_per_unet_grad": {"1": s, "2": s} or {}}``.
        """
        torch = self.torch
        cal = {}
        if threads == "auto":
            for n in (1, 2):
                torch.set_num_threads(n)
                for _ in range(2):
                    grad()
                calls = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    grad()
                    calls.append(time.perf_counter() - t0)
                    if n == 2 and calls[-1] > TORCH_SLOW_FACTOR * cal["1"]:
                        break
                cal[str(n)] = statistics.median(calls)
            threads = 1 if cal["1"] <= cal["2"] else 2
        torch.set_num_threads(int(threads))
        self.threads = int(threads)
        return {"threads": self.threads, "calibration_s_per_unet_grad": cal}


# ----------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------
class WorkerFailed(RuntimeError):
    pass


class Proc:
    """A worker process; ``call(op, **kwargs)`` sends one request and returns its answer."""

    def __init__(self, name, argv, env, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")  # open as long as the process runs
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, env=env, text=True, bufsize=1, cwd=REPO)
        self.dead = None

    def send(self, op, **kw):
        if self.dead:
            raise WorkerFailed(f"{self.name}: dead ({self.dead})")
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        self.pending = op

    def recv(self):
        if self.dead:
            raise WorkerFailed(f"{self.name}: dead ({self.dead})")
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            with open(self.log_path) as f:
                tail = f.read()[-1500:]
            self.dead = f"exited rc={self.p.returncode}"
            raise WorkerFailed(f"{self.name}: worker exited rc={self.p.returncode}\n{tail}")
        res = json.loads(line)
        if not res.pop("ok"):
            raise WorkerFailed(f"{self.name}: {self.pending}: {res['error']}")
        return res

    def call(self, op, **kw):
        self.send(op, **kw)
        return self.recv()

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.write('{"op": "exit"}\n')
                self.p.stdin.flush()
                self.p.wait(timeout=30)
            except Exception:
                self.p.kill()
        self.log.close()


def worker_env(torch=False, compile_cache=None):
    """The driver's environment without what a worker's setting decides; PyTorch's gets the
    malloc settings, JAX's the compilation cache."""
    env = {k: v for k, v in os.environ.items() if k not in _SETTING_ENV}
    if torch:
        env.update(MALLOC_ENV)
    elif compile_cache:
        env[COMPILE_CACHE_ENV] = os.path.abspath(compile_cache)
    return env


def start_workers(script, settings, tmp, *, torch=True, prefix="", compile_cache=None):
    """Start ``script --jax-setting S`` per setting (named ``prefix + S``) and, with ``torch``,
    ``script --torch-worker`` (named ``torch``); logs go to ``tmp/worker_*.log``."""
    me = [sys.executable, os.path.abspath(script)]
    procs = {f"{prefix}{s}": Proc(f"{prefix}{s}", [*me, "--jax-setting", s],
                                  worker_env(compile_cache=compile_cache),
                                  os.path.join(tmp, f"worker_{s}.log")) for s in settings}
    if torch:
        procs["torch"] = Proc("torch", [*me, "--torch-worker"], worker_env(torch=True),
                              os.path.join(tmp, "worker_torch.log"))
    return procs


def close_all(procs):
    for p in procs.values():
        p.close()


def parser(doc):
    """An argument parser whose description is ``doc``'s first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_worker_args(ap, smoke=None):
    """The options every benchmark driver takes: ``--out``, ``--smoke`` (where ``smoke`` gives
    its option values, see :func:`parse_args`) and the hidden worker flags."""
    ap.add_argument("--out", default=None, help="write the results JSON (and a .txt table) here")
    if smoke is not None:
        ap.add_argument("--smoke", action="store_true",
                        help="the smallest run of every code path (checks the script; its "
                             "numbers mean nothing): " + ", ".join(f"--{k.replace('_', '-')} "
                                                                   f"{v!r}" for k, v in
                                                                   smoke.items()))
    ap.add_argument("--jax-setting", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)


def parse_args(ap, argv, smoke):
    """``ap.parse_args(argv)``; with ``--smoke``, options left at their defaults take the
    values of ``smoke``."""
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in smoke.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    return args


def serve_if_worker(args, jax_worker, torch_worker):
    """Serve as the worker ``args`` names (and return True), else return False."""
    if args.jax_setting:
        serve(lambda: jax_worker(args.jax_setting))
    elif args.torch_worker:
        serve(torch_worker)
    else:
        return False
    return True


def timed_round(procs, runs, k, errors, prefix):
    """One timed batch of calls from every run, in order rotated by ``k``.

    Args:
      procs: the workers by name.
      runs: ordered ``{name: (worker name, run kwargs)}``; a run whose worker fails is logged,
        recorded in ``errors`` as ``f"{prefix}{name}: {error}"`` and deleted from ``runs``.
      k: rotation (e.g. the repetition), so each run is sometimes first and sometimes last.

    Returns:
      ``{name: calls}`` of the runs that answered.
    """
    names = list(runs)
    out = {}
    if not names:
        return out
    k %= len(names)
    for name in names[k:] + names[:k]:
        proc, kw = runs[name]
        try:
            out[name] = procs[proc].call("run", **kw)["calls"]
        except WorkerFailed as e:
            log(f"  ! {e}")
            errors.append(f"{prefix}{name}: {e}")
            del runs[name]
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_meta(**extra):
    """The ``meta`` every results file starts with (machine, versions are added by workers)."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(), "argv": sys.argv[1:], **extra,
            "loadavg_start": os.getloadavg(), "workers": {}}


def header(name, meta):
    """The first two lines of a printed table: run, machine, wall time, load; versions."""
    versions = {}
    for w in meta["workers"].values():
        versions.update(w.get("versions", {}))
    return [f"{name} {meta['date']}  {meta['cpu_model']} x{meta['cpu_count']}  wall "
            f"{meta.get('wall_s', 0):.0f}s  loadavg {meta['loadavg_start'][0]:.1f}->"
            f"{meta.get('loadavg_end', [float('nan')])[0]:.1f}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]


def torch_threads_text(tt):
    """``"N (1 thr a ms, 2 thr b ms)"`` from :meth:`TorchWorker.pick_threads`' answer."""
    cal = ", ".join(f"{k} thr {v * 1e3:.0f} ms" for k, v in
                    tt.get("calibration_s_per_unet_grad", {}).items())
    return f"{tt.get('threads', '-')} ({cal or 'fixed'})"


def error_lines(out):
    """The last lines of a printed table: the errors recorded in ``out``, if any."""
    return ["\nERRORS:", *(f"  {e}" for e in out["errors"])] if out["errors"] else []


def finish(out, render, path, t_start):
    """Close ``out["meta"]`` (end load, wall time), print ``render(out)``, write ``path`` (JSON)
    and a ``.txt`` copy of the table next to it."""
    out["meta"]["loadavg_end"] = os.getloadavg()
    out["meta"]["wall_s"] = time.time() - t_start
    text = render(out)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(text + "\n")
        log(f"wrote {path}")
    return out
