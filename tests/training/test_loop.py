"""train_loop: resume after a crash == uninterrupted run, metrics file, checkpoint cadence."""

import json

import jax
import numpy as np
import pytest
from training_fixtures import TinyEps, synthetic_batches

import jaxrob.diffusion as jd
from jaxrob import training as jt
from jaxrob.checkpoint import Checkpointer
from jaxrob.parallel import make_mesh

FP = {"model": {"name": "tiny", "features": 8}, "diffusion": {"num_steps": 100}}


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(8)
    model = TinyEps()
    tx, lr_fn = jt.make_optimizer(learning_rate=5e-3, warmup_steps=2, total_steps=8,
                                  lr_schedule="cosine", weight_decay=1e-4)
    init = lambda: jt.init_ddpm_state(model, jax.random.key(3), (8, 8, 1), tx)
    step = jt.make_ddpm_train_step(model.apply, tx, jd.linear_schedule(100), ema_decay=0.99,
                                   lr_fn=lr_fn, mesh=mesh)
    return mesh, init, step


def _crashing_batches(crash_at):
    def batches(start):
        for i, b in enumerate(synthetic_batches(start)):
            if start + i == crash_at:
                raise KeyboardInterrupt("simulated kill")
            yield b
    return batches


def test_resume_is_bit_identical(setup, tmp_path):
    mesh, init, step = setup
    kw = dict(num_steps=8, mesh=mesh, log_every=1, progress=False)
    ref, summary = jt.train_loop(
        step, init, synthetic_batches, workdir=tmp_path / "a",
        checkpointer=Checkpointer(tmp_path / "a" / "ckpt", fingerprint=FP, save_every=3), **kw)
    assert summary["final_step"] == 8 and not summary["resumed"]

    wd = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        jt.train_loop(step, init, _crashing_batches(5), workdir=wd,
                      checkpointer=Checkpointer(wd / "ckpt", fingerprint=FP, save_every=3), **kw)
    assert [r["step"] for r in jt.read_metrics(wd)] == [1, 2, 3, 4, 5]
    ck = Checkpointer(wd / "ckpt", fingerprint=FP, save_every=3)
    assert ck.latest_step() == 3
    resumed, summary = jt.train_loop(step, init, synthetic_batches, workdir=wd, checkpointer=ck,
                                     **kw)
    assert summary["resumed"] and summary["start_step"] == 3 and summary["steps_run"] == 5
    for a, b in [(ref.params, resumed.params), (ref.ema_params, resumed.ema_params),
                 (ref.opt_state, resumed.opt_state)]:
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert int(resumed.step) == 8
    assert step._cache_size() == 1
    # the metrics file describes one run: records past the checkpoint were replaced
    recs = jt.read_metrics(wd)
    assert [r["step"] for r in recs] == list(range(1, 9))
    ref_recs = jt.read_metrics(tmp_path / "a")
    np.testing.assert_array_equal([r["loss"] for r in recs], [r["loss"] for r in ref_recs])
    assert {"step", "loss", "lr", "grad_norm", "steps_per_s", "wall_s"} <= set(recs[-1])
    assert Checkpointer(wd / "ckpt").all_steps() == [3, 6, 8]
    # rerunning a finished run restores and does nothing
    again, summary = jt.train_loop(step, init, synthetic_batches, workdir=wd,
                                   checkpointer=Checkpointer(wd / "ckpt", fingerprint=FP), **kw)
    assert summary["steps_run"] == 0
    jax.tree.map(np.testing.assert_array_equal, again.params, ref.params)


def test_resume_with_other_config_fails(setup, tmp_path):
    mesh, init, step = setup
    jt.train_loop(step, init, synthetic_batches, num_steps=2, mesh=mesh, workdir=tmp_path,
                  checkpointer=Checkpointer(tmp_path / "ckpt", fingerprint=FP), progress=False)
    other = {**FP, "model": {"name": "tiny", "features": 16}}
    with pytest.raises(ValueError, match="model.features: expected 16, found 8"):
        jt.train_loop(step, init, synthetic_batches, num_steps=4, mesh=mesh, workdir=tmp_path,
                      checkpointer=Checkpointer(tmp_path / "ckpt", fingerprint=other),
                      progress=False)


def test_metrics_writer_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = jt.MetricsWriter(path)
    for s in range(1, 6):
        w.write({"step": s, "loss": np.float32(1.0 / s)})
    assert json.loads(path.read_text().splitlines()[1]) == {"step": 2, "loss": 0.5}
    jt.MetricsWriter(path, resume_step=3)
    assert [r["step"] for r in jt.read_metrics(tmp_path)] == [1, 2, 3]
    jt.MetricsWriter(path)  # a fresh run starts a fresh file
    assert jt.read_metrics(tmp_path) == []
