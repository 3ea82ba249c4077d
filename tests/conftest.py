"""Test configuration: 8 fake CPU devices, strict numerics, the shared data directory."""

import functools
import importlib
import os
import pathlib
import sys

# Must happen before JAX initialises its backend: exercise multi-device code on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite is bound by XLA:CPU compilation (tiny models, many distinct programs), most of it in
# LLVM's optimisation passes. Compile without them: the programs compute the same functions (the
# tests assert properties and tolerances, not timings) at about half the CPU time of the suite.
# JAXROB_TEST_XLA_OPT=1 keeps XLA's default optimisation (what users run). Subprocesses started
# by the tests (experiment smokes) inherit them; the quick-start notebook runs at the default
# (its Lanczos cell is execution-bound: 28 s -> 158 s at -O0).
_FAST_COMPILE = (() if os.environ.get("JAXROB_TEST_XLA_OPT", "0") == "1" else
                 ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"))
# what a test's own subprocess (the multi-process workers) adds to the XLA_FLAGS it sets
os.environ["JAXROB_TEST_XLA_EXTRA"] = " ".join(_FAST_COMPILE)
_flags = os.environ["XLA_FLAGS"].split()
_named = {g.split("=")[0] for g in _flags}
os.environ["XLA_FLAGS"] = " ".join(
    _flags + [f for f in _FAST_COMPILE if f.split("=")[0] not in _named])
_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _variables, _jaxrob_typecheck
os.environ.setdefault("JAXROB_DATA_DIR", str(_REPO.parent / "shared" / "datasets"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Shape annotations of the public primitives (``jaxrob._types``, jaxtyping) are checked at run
# time in the tests, so a shape error fails at the boundary that received it. Set
# JAXROB_TYPECHECK=0 to turn it off (e.g. to time a test).
_TYPECHECK = os.environ.get("JAXROB_TYPECHECK", "1") != "0"
if _TYPECHECK:
    from jaxtyping import install_import_hook

    # Not the two flax.struct dataclasses (TrainState, Schedule): JAX rebuilds them through
    # __init__ with placeholder leaves (None shardings, abstract templates), which a checked
    # __init__ would reject. jaxrob's own pytrees (jaxrob._pytree) bypass __init__ on unflatten.
    install_import_hook(
        ["jaxrob.analysis", "jaxrob.attacks", "jaxrob.checkpoint", "jaxrob.data",
         "jaxrob.diffusion._forward", "jaxrob.diffusion._reverse", "jaxrob.diffusion._samplers",
         "jaxrob.diffusion._vpsde", "jaxrob.evaluation", "jaxrob.models", "jaxrob.parallel",
         "jaxrob.purify", "jaxrob.training._addt", "jaxrob.training._autoencoder",
         "jaxrob.training._classifier",
         "jaxrob.training._ddpm",
         "jaxrob.training._loop"],
        "_jaxrob_typecheck.typechecker")

# Bad-input tests check the library's own error messages (what a user without the hook sees),
# which come after the annotations' check: they run with it off.
_OWN_ERRORS = ("bad", "error", "raise", "refuse", "invalid", "reject", "fails", "wrong",
               "nonsense", "mistyped", "missing", "clear")


@pytest.fixture(autouse=True)
def _shape_checks(request):
    if not _TYPECHECK or not any(w in request.node.name.lower() for w in _OWN_ERRORS):
        yield
        return
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The real datasets (../shared/datasets or $JAXROB_DATA_DIR); tests skip without them."""
    p = pathlib.Path(os.environ["JAXROB_DATA_DIR"])
    if not p.is_dir():
        pytest.skip(f"data directory {p} not found (set JAXROB_DATA_DIR)")
    return p


# Markers for tests that need an optional dependency, and the modules each one needs
# (tfds: the `jaxrob[tfds]` extra). A marked test is skipped, not failed, when one is missing.
OPTIONAL_MARKERS = {
    "torch": ("torch",),
    "diffusers": ("torch", "diffusers"),
    "tfds": ("tensorflow_datasets", "importlib_resources", "array_record"),
}


@functools.cache
def _missing_module(name: str) -> str | None:
    """Why ``name`` cannot be imported, or None when it can."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


# The longest test files (minutes each on 2 cores, mostly XLA compilation), started first so
# that the two xdist workers (pyproject's addopts) overlap them with the many short files
# instead of finishing on one of them alone.
_LONG_FIRST = ("tests/test_quickstart.py", "tests/evaluation/test_batch_invariance.py",
               "tests/evaluation/test_evaluation.py", "tests/test_multihost.py",
               "tests/experiments/")


def _path_rank(path: str) -> int:
    for i, prefix in enumerate(_LONG_FIRST):
        if path.startswith(prefix):
            return i
    return len(_LONG_FIRST)


def _long_rank(item) -> int:
    return _path_rank(item.nodeid.split("::")[0])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the ``_LONG_FIRST`` files handed out first.

    xdist (>= 3.6) orders files by their number of tests, largest first, whatever the
    collection order: the one-test notebook file ran last, minutes with one core idle.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongFilesFirst(LoadFileScheduling):
        _ordered = False

        def _assign_work_unit(self, node):
            if not self._ordered:  # the first call: the queue is complete, nothing sent yet
                self._ordered = True
                units = sorted(self.workqueue.items(), key=lambda kv: _path_rank(kv[0]))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return LongFilesFirst(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_rank)  # stable: the order inside a file is kept
    # $JAXROB_REQUIRE_MARKERS (comma-separated, set by .ci/run for the extras it installed): a
    # missing module for one of these markers is an error, not a skip.
    required = {m for m in os.environ.get("JAXROB_REQUIRE_MARKERS", "").split(",") if m}
    for item in items:
        for marker, modules in OPTIONAL_MARKERS.items():
            if item.get_closest_marker(marker) is None:
                continue
            for module in modules:
                why = _missing_module(module)
                if why is None:
                    continue
                if marker in required:
                    raise pytest.UsageError(
                        f"{item.nodeid}: marker {marker!r} is required "
                        f"($JAXROB_REQUIRE_MARKERS) but {module} cannot be imported: {why}"
                    )
                item.add_marker(pytest.mark.skip(reason=f"needs {module} ({why})"))
                break


def torch_or_skip():
    """Import torch or skip the calling test."""
    return pytest.importorskip("torch")
