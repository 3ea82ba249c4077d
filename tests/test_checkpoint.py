"""jaxrob.checkpoint: round trips, retention, fingerprints, crash safety, exports."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrob.checkpoint import (
    Checkpointer,
    abstract_like,
    fingerprint_diff,
    load_params,
    read_metadata,
    save_params,
)
from jaxrob.parallel import make_mesh, replicated


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    ema: object
    extra: dict


def _state(step, value=0.0):
    return _State(step=jnp.int32(step), params={"w": jnp.full((3, 4), value), "b": jnp.ones(4)},
                  ema=None, extra={})


def test_round_trip_retention_and_sharding(tmp_path):
    mesh = make_mesh()
    with Checkpointer(tmp_path, fingerprint={"model": {"ch": 8}}, save_every=2,
                      max_to_keep=2) as ck:
        assert ck.latest_step() is None
        for step in range(1, 8):
            ck.save(step, _state(step, float(step)))
        ck.save(7, _state(7, 7.0), force=True)
        assert ck.all_steps() == [6, 7]
        template = abstract_like(jax.eval_shape(lambda: _state(0)), replicated(mesh))
        restored = ck.restore(template)
        assert int(restored.step) == 7
        np.testing.assert_array_equal(restored.params["w"], np.full((3, 4), 7.0))
        assert restored.params["w"].sharding.is_equivalent_to(replicated(mesh), 2)
        assert int(ck.restore(template, step=6).step) == 6
        with pytest.raises(FileNotFoundError):
            ck.restore(template, step=3)


def test_fingerprint_mismatch_raises(tmp_path):
    fp = {"model": {"name": "unet", "ch": 32, "mults": (1, 2)}, "diffusion": {"steps": 1000}}
    with Checkpointer(tmp_path, fingerprint=fp, save_every=1) as ck:
        ck.save(1, _state(1))
    template = jax.eval_shape(lambda: _state(0))
    other = {"model": {"name": "unet", "ch": 64, "mults": (1, 2)}, "diffusion": {"steps": 1000}}
    with Checkpointer(tmp_path, fingerprint=other) as ck:
        with pytest.raises(ValueError, match=r"model.ch: expected 64, found 32") as e:
            ck.restore(template)
        assert "expected:" in str(e.value) and "found:" in str(e.value)
    with Checkpointer(tmp_path, fingerprint=fp) as ck:  # tuples vs lists do not matter
        assert int(ck.restore(template).step) == 1
    assert fingerprint_diff({"a": 1}, {"a": 1, "b": 2}) == ["b: expected <absent>, found 2"]


def test_wrong_template_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, _state(1))
        bad = jax.eval_shape(lambda: _State(step=jnp.int32(0), params={"w": jnp.zeros((5,))},
                                            ema=None, extra={}))
        with pytest.raises(ValueError, match="does not fit"):
            ck.restore(bad)


def test_unfinished_tmp_dir_is_ignored(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(2, _state(2, 2.0))
    # what a save killed mid-write leaves behind: an unrenamed tmp directory with partial data
    tmp = tmp_path / "4.orbax-checkpoint-tmp-1712345678"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage")
    with Checkpointer(tmp_path, save_every=1) as ck:
        assert ck.latest_step() == 2
        restored = ck.restore(jax.eval_shape(lambda: _state(0)))
        np.testing.assert_array_equal(restored.params["w"], np.full((3, 4), 2.0))
        ck.save(4, _state(4, 4.0))  # the step can be written again afterwards
        assert ck.latest_step() == 4


_WRITER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from jaxrob.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], fingerprint={"k": 1}, save_every=1, max_to_keep=50)
    for step in range(1, 200):
        # 32 MB per checkpoint so that a save takes long enough to be interrupted
        ck.save(step, {"step": jnp.int32(step), "w": jnp.full((8_000_000,), float(step))})
        print(step, flush=True)
""")


def test_kill_9_mid_save_leaves_no_readable_partial_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    ckdir = tmp_path / "ck"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    caught_tmp = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            names = os.listdir(ckdir) if ckdir.exists() else []
            done = [n for n in names if n.isdigit()]
            if len(done) >= 1 and any("orbax-checkpoint-tmp" in n for n in names):
                caught_tmp = True
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(n.isdigit() for n in os.listdir(ckdir)), "no checkpoint finished in 60 s"
    leftovers = [n for n in os.listdir(ckdir) if "tmp" in n]
    with Checkpointer(ckdir, fingerprint={"k": 1}) as ck:
        step = ck.latest_step()
        template = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                    "w": jax.ShapeDtypeStruct((8_000_000,), jnp.float32)}
        restored = ck.restore(template)
    assert int(restored["step"]) == step
    w = np.asarray(restored["w"])
    assert w.min() == w.max() == float(step)
    # the race is usually won (a tmp dir existed when the process died); report if it was not
    if not caught_tmp:
        pytest.skip(f"kill landed between saves (leftovers {leftovers}); restore still fine")


def test_save_and_load_params(tmp_path):
    params = {"conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4), "bias": jnp.zeros(4)}}
    meta = {"config": {"ch": (8, 16)}, "metrics": {"loss": np.float32(0.5)}}
    d = save_params(tmp_path / "export", params, meta)
    loaded, m = load_params(d)
    np.testing.assert_array_equal(loaded["conv"]["kernel"], np.arange(24.0).reshape(2, 3, 4))
    assert m == {"config": {"ch": [8, 16]}, "metrics": {"loss": 0.5}}
    assert read_metadata(d) == m
    with pytest.raises(FileExistsError):
        save_params(d, params, meta)
    save_params(d, jax.tree.map(jnp.ones_like, params), {"v": 2}, overwrite=True)
    loaded, m = load_params(d, template=params)
    assert m == {"v": 2} and isinstance(loaded["conv"]["bias"], jax.Array)
    np.testing.assert_array_equal(loaded["conv"]["bias"], np.ones(4))
    assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()) == ["export"]
    with pytest.raises(FileNotFoundError, match="no jaxrob params export"):
        load_params(tmp_path / "missing")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=-1)
