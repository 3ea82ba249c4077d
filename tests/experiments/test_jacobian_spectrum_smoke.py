"""experiments/jacobian_spectrum.py: outputs, resume after a kill, sharding, bad input.

One setting on 3 digits (D = 64) with a random tiny UNet (made once for the module by
``jaxrob.models.random_variables``), one image per chunk. ``run_chunks`` keeps the compiled
chunk function of a study configuration for the process (the model's parameters are traced),
so the resume and rerun tests compile nothing.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from exp_helpers import load_config

import jaxrob._keys as tags
from experiments import _common
from experiments import jacobian_spectrum as js

N = 3


def _config(**study):
    cfg = load_config("digits_jacobian", "smoke")
    cfg.ddpm.source = "random"  # the tiny UNet of robust_smoke: compiles in seconds
    cfg.data.test_split = f"test[:{N}]"
    cfg.settings = ({"name": "ddpm_t0.1", "purifier": {"t_star": 0.1}},)
    cfg.study.update(**study)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _one_model():
    """Every run of this module shares one random model, made without compiling."""
    model = {}
    load_ddpm = _common.load_ddpm  # source="random": jaxrob.models.random_variables, no compile

    def cached(ddpm_config, image_shape, fast_vjp=False):
        if not model:
            model["m"] = load_ddpm(ddpm_config, tuple(image_shape))
        ddpm, info = model["m"]
        return ddpm.with_fast_vjp(fast_vjp), info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "load_ddpm", cached)
        yield


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("jacobian_full")
    return workdir, js.run(_config(), workdir)


def _per(workdir):
    with np.load(workdir / "per_example.npz") as z:
        return {k: z[k] for k in z.files}


def test_outputs(full):
    workdir, res = full
    (entry,) = res["settings"]
    parts = {"dense": N, "matrix_free": N}  # two resumable passes, one image per chunk
    assert entry["chunks_run"] == entry["chunks_total"] == parts and entry["dim"] == 64
    s = entry["summary"]
    for k in ("frac_below", "frac_above", "frac_zero_sv", "frac_clipped"):
        assert 0.0 <= s[k]["min"] <= s[k]["max"] <= 1.0
    assert s["sigma_max"]["min"] > 0 and s["rate"]["min"] > 0
    assert s["topk_max_rel_err"]["max"] < 1e-3  # Lanczos agrees with the dense spectrum
    assert 0 <= entry["pooled"]["frac_below"] <= 1 and entry["pooled"]["num_values"] == N * 64
    assert entry["paper"]["frac_above_1.0"] == 0.013
    assert all(entry["compute_s"][p] > 0 and entry["median_image_s"][p] > 0 for p in parts)
    per = _per(workdir)
    sv = per["ddpm_t0.1.svals"]
    assert sv.shape == (N, 64) and np.all(np.diff(sv, axis=1) <= 0) and np.all(sv >= 0)
    assert per["ddpm_t0.1.topk"].shape == (N, 3)
    np.testing.assert_array_equal(per["ddpm_t0.1.index"], np.arange(N))
    np.testing.assert_allclose(per["ddpm_t0.1.sigma_max"], sv[:, 0])
    np.testing.assert_allclose(per["ddpm_t0.1.frobenius"], np.linalg.norm(sv, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(per["ddpm_t0.1.frac_below"], np.mean(sv < 0.25, axis=1))
    for part in parts:
        assert np.all(per[f"ddpm_t0.1.time_{part}"] > 0)
    for f in ("spectrum.png", "settings.png", "config.json"):
        assert (workdir / f).stat().st_size > 0
    for part in parts:
        chunks = workdir / "ddpm_t0.1" / "chunks" / part
        assert sorted(p.name for p in chunks.glob("chunk_*")) == [
            f"chunk_{i}_{i + 1}.npz" for i in range(N)]
    m = json.loads((workdir / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, N] and m["devices"]["count"] == 8


def test_purifier_key_is_robust_evals_fixed_key():
    import jax.random as jr

    from jaxrob.evaluation import fixed_purifier_keys

    k_i = jr.fold_in(jr.key(3), 7)
    assert jr.key_data(jr.fold_in(k_i, tags.FIXED)).tolist() == jr.key_data(
        fixed_purifier_keys(jr.key(3), jnp.array([7]))[0]).tolist()
    assert f"fold_in(k_i, {tags.FIXED})" in js._KEYS["purifier"]


def test_killed_run_resumes_without_recomputing(full, tmp_path, monkeypatch):
    cfg = _config()
    real = js._chunk_done  # called after every stored chunk
    calls = []

    def killed_after_first(name, part, start, stop, out):
        calls.append((part, list(range(start, stop))))
        real(name, part, start, stop, out)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(js, "_chunk_done", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        js.run(cfg, tmp_path)
    chunks = tmp_path / "ddpm_t0.1" / "chunks"
    assert calls == [("dense", [0])]
    assert [p.name for p in chunks.rglob("chunk_*")] == ["chunk_0_1.npz"]

    calls.clear()

    def counting(name, part, start, stop, out):
        calls.append((part, list(range(start, stop))))
        real(name, part, start, stop, out)

    monkeypatch.setattr(js, "_chunk_done", counting)
    res = js.run(cfg, tmp_path)
    # only the unfinished images: two of the dense part, all of the matrix-free part
    assert calls == [("dense", [1]), ("dense", [2]),
                     ("matrix_free", [0]), ("matrix_free", [1]), ("matrix_free", [2])]
    entry = res["settings"][0]
    assert entry["chunks_run"] == {"dense": 2, "matrix_free": N}
    assert entry["chunks_total"] == {"dense": N, "matrix_free": N}
    ref, got = _per(full[0]), _per(tmp_path)
    assert set(ref) == set(got)
    for k in ref:
        if ".time_" not in k:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    calls.clear()
    rerun = js.run(cfg, tmp_path)["settings"][0]
    assert rerun["chunks_run"] == {"dense": 0, "matrix_free": 0} and calls == []


def test_sharded_equals_single_device(full, tmp_path):
    cfg = _config(topk=0, num=0)
    cfg.mesh.num_devices = 1
    res = js.run(cfg, tmp_path)
    assert res["devices"] == 1 and full[1]["devices"] == 8
    np.testing.assert_allclose(_per(tmp_path)["ddpm_t0.1.svals"],
                               _per(full[0])["ddpm_t0.1.svals"], rtol=2e-4, atol=1e-6)


@pytest.mark.slow  # a second study configuration (one more compilation); the clipped one runs in CI
def test_unclipped_has_fewer_zero_directions(full, tmp_path, monkeypatch):
    from jaxrob.purify import Purifier

    # Work-around: Purifier.trajectory's return annotation says (B, H, W, C) for its
    # (steps, B, H, W, C) states, which the tests' jaxtyping hook rejects; call the unchecked
    # method until the annotation is fixed in jaxrob/purify/_diffpure.py.
    monkeypatch.setattr(Purifier, "trajectory",
                        getattr(Purifier.trajectory, "__wrapped__", Purifier.trajectory))
    cfg = _config(topk=0, num=0, unclipped=True)
    cfg.mesh.num_devices = 1
    s = js.run(cfg, tmp_path)["settings"][0]["summary"]
    ref = full[1]["settings"][0]["summary"]
    assert ref["frac_clipped"]["mean"] > 0 and ref["frac_zero_sv"]["mean"] > 0
    assert s["frac_zero_sv"]["mean"] < ref["frac_zero_sv"]["mean"]
    # the clipped map's Jacobian keeps a subset of the unclipped one's rows
    np.testing.assert_array_less(_per(full[0])["ddpm_t0.1.sigma_max"],
                                 _per(tmp_path)["ddpm_t0.1.sigma_max"] * (1 + 1e-5))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.study.update(method="jacobi"), "study.method"),
    (lambda c: c.study.update(topk=65), "topk: expected at most D = 64"),
    (lambda c: c.study.update(topk_method="power"), "topk_method"),
    (lambda c: c.study.update(dense=False, topk=0), "nothing to compute"),
    (lambda c: c.study.update(max_dense_mib=0.001), "set study.dense=False"),
    (lambda c: c.study.update(images_per_chunk=0), "images_per_chunk"),
    (lambda c: c.study.update(low=2.0), "low/high"),
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier": {"tstar": 0.2}},)),
     r"settings\[0\] \(x\): unknown config field 'purifier.tstar'"),
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier": {"gradient": "bpda"}},)),
     "gradient: expected 'exact'"),
    (lambda c: setattr(c, "settings", ({"name": "a"}, {"name": "a"})), "unique"),
    (lambda c: setattr(c, "settings", ({"name": "a/b"},)), "sub-directory"),
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier": {"num_steps": 10 ** 4}},)),
     "num_steps"),
])
def test_bad_input_fails_before_compiling(tmp_path, monkeypatch, edit, match):
    def no_compile(*args, **kwargs):
        raise AssertionError("computed before checking the config")

    monkeypatch.setattr(js, "run_setting", no_compile)
    cfg = _config()
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        js.run(cfg, tmp_path)
    assert not (tmp_path / "ddpm_t0.1").exists()


def test_spectrum_summary_is_what_the_study_records():
    """``jaxrob.analysis.spectrum_summary`` (the per-image summary) on a known spectrum."""
    from jaxrob.analysis import spectrum_summary

    s = jnp.array([[4.0, 1.0, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0]])
    sm = spectrum_summary(s, low=0.25, high=1.0)
    np.testing.assert_allclose(sm.frac_below, [0.5, 0.0])
    np.testing.assert_allclose(sm.frac_above, [0.25, 0.0])
    np.testing.assert_allclose(sm.frac_zero, [0.25, 0.0])
    np.testing.assert_allclose(sm.geometric_mean, [0.0, 1.0])
    np.testing.assert_allclose(sm.geometric_mean_nonzero, [0.8 ** (1 / 3), 1.0], rtol=1e-6)
    np.testing.assert_allclose(sm.sigma_max, [4.0, 1.0])
    np.testing.assert_allclose(sm.frobenius, [np.sqrt(17.04), 2.0], rtol=1e-6)
    np.testing.assert_allclose(sm.rms, [np.sqrt(17.04) / 2, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="low <= high"):
        spectrum_summary(s, low=2.0, high=1.0)
