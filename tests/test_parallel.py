"""CPU set-up: the YNN modes reach XLA_FLAGS before JAX starts; bad settings are refused."""

import os
import subprocess
import sys

import pytest

from jaxrob import parallel


def _flags_after(call: str, env_extra=None, *, stderr: list | None = None) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAXROB_CPU_YNN", "JAXROB_CPU_NO_YNN")}
    env.update(env_extra or {})
    code = ("import os; from jaxrob.parallel import configure_cpu; "
            f"{call}; print(os.environ.get('XLA_FLAGS', ''))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    if stderr is not None:
        stderr.append(out.stderr)
    return out.stdout.strip()


def test_ynn_modes_set_the_xla_flag():
    assert _flags_after("configure_cpu(ynn='all')") == ""
    assert _flags_after("configure_cpu(ynn='no_conv')") == parallel.YNN_MODES["no_conv"]
    assert _flags_after("configure_cpu(1, disable_ynn=True)") == parallel.NO_YNN_FLAG
    assert _flags_after("configure_cpu()", {"JAXROB_CPU_YNN": "no_conv"}) == \
        parallel.YNN_MODES["no_conv"]
    # a flag the user set wins
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _flags_after("configure_cpu(ynn='off')", {"XLA_FLAGS": mine}) == mine


def test_ynn_off_on_several_devices_becomes_no_conv():
    # XLA:CPU computes wrong values with YNN fusions off on concurrent host devices
    # (docs/known_faults.md)
    no_conv = parallel.YNN_MODES["no_conv"]
    err = []
    assert _flags_after("configure_cpu(disable_ynn=True)", stderr=err) == no_conv  # 2 devices
    assert "known XLA:CPU fault" in err[0]
    assert _flags_after("configure_cpu(4, ynn='off')") == no_conv
    assert _flags_after("configure_cpu()", {"JAXROB_CPU_NO_YNN": "1"}) == no_conv
    forced = "--xla_force_host_platform_device_count=8"
    assert _flags_after("configure_cpu(1, ynn='off')", {"XLA_FLAGS": forced}) == \
        f"{forced} {no_conv}"


def test_bad_ynn_settings_are_refused():
    with pytest.raises(ValueError, match="expected one of"):
        parallel.configure_cpu(ynn="fast")
    with pytest.raises(ValueError, match="contradicts"):
        parallel.configure_cpu(ynn="no_conv", disable_ynn=True)


def test_configure_cpu_after_backend_start_changes_nothing():
    code = ("import os, warnings, jax; from jaxrob import parallel; "
            "assert not parallel._backend_initialized(); n = jax.config.jax_num_cpu_devices; "
            "assert parallel._backend_initialized() is False and "
            "jax.config.jax_num_cpu_devices == n; jax.devices(); "
            "assert parallel._backend_initialized(); before = os.environ.get('XLA_FLAGS', ''); "
            "w = warnings.catch_warnings(record=True); rec = w.__enter__(); "
            "warnings.simplefilter('always'); parallel.configure_cpu(4, ynn='no_conv'); "
            "assert os.environ.get('XLA_FLAGS', '') == before; "
            "assert any('already initialised' in str(r.message) for r in rec)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
