"""experiments/jacobian_spectrum.py: outputs, resume after a kill, sharding, bad input.

One setting on 3 digits (D = 64) with a random tiny UNet (made once for the module, without
compiling its init), one image per chunk. The compiled parts are cached per process, so the
resume and rerun tests compile nothing.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exp_helpers import load_config

from experiments import jacobian_spectrum as js

N = 3


def _config(**study):
    cfg = load_config("digits_jacobian", "smoke")
    cfg.ddpm.source = "random"  # the tiny UNet of robust_smoke: compiles in seconds
    cfg.data.test_split = f"test[:{N}]"
    cfg.settings = ({"name": "ddpm_t0.1", "purifier.t_star": 0.1},)
    cfg.study.update(**study)
    return cfg


def _random_ddpm(ddpm_config, image_shape):
    """``load_ddpm``'s ``source="random"`` without compiling ``unet.init`` (~15 s on the
    shared CPU): shapes from ``jax.eval_shape``, scaled Gaussian weights from numpy."""
    from experiments import _common

    assert ddpm_config.source == "random"
    unet = _common.build_unet(ddpm_config.model)
    shapes = jax.eval_shape(unet.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *image_shape), np.float32),
                            jax.ShapeDtypeStruct((1,), np.int32))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(s.shape, s.dtype)
        if "bias" in name:
            return np.zeros(s.shape, s.dtype)
        fan_in = max(int(np.prod(s.shape[:-1])), 1)
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return unet, params, _common.build_schedule(ddpm_config.diffusion), {"source": "random"}


@pytest.fixture(scope="module", autouse=True)
def _one_model():
    """Every run of this module shares one random model, made without compiling."""
    model = {}

    def cached(ddpm_config, image_shape):
        if not model:
            model["m"] = _random_ddpm(ddpm_config, tuple(image_shape))
        return model["m"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(js, "load_ddpm", cached)
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
    assert entry["chunks_run"] == entry["chunks_total"] == N and entry["dim"] == 64
    s = entry["summary"]
    for k in ("frac_below", "frac_above", "frac_zero_sv", "frac_clipped"):
        assert 0.0 <= s[k]["min"] <= s[k]["max"] <= 1.0
    assert s["sigma_max"]["min"] > 0 and s["rate"]["min"] > 0
    assert s["topk_max_rel_err"]["max"] < 1e-3  # Lanczos agrees with the dense spectrum
    assert 0 <= entry["pooled"]["frac_below"] <= 1 and entry["pooled"]["num_values"] == N * 64
    assert entry["paper"]["frac_above_1.0"] == 0.013
    per = _per(workdir)
    sv = per["ddpm_t0.1.svals"]
    assert sv.shape == (N, 64) and np.all(np.diff(sv, axis=1) <= 0) and np.all(sv >= 0)
    assert per["ddpm_t0.1.topk"].shape == (N, 3)
    np.testing.assert_array_equal(per["ddpm_t0.1.index"], np.arange(N))
    np.testing.assert_allclose(per["ddpm_t0.1.sigma_max"], sv[:, 0])
    np.testing.assert_allclose(per["ddpm_t0.1.frobenius"], np.linalg.norm(sv, axis=1),
                               rtol=1e-5)
    for f in ("spectrum.png", "settings.png", "config.json"):
        assert (workdir / f).stat().st_size > 0
    assert sorted(p.name for p in (workdir / "ddpm_t0.1" / "chunks").glob("chunk_*")) == [
        f"chunk_{i}_{i + 1}.npz" for i in range(N)]
    m = json.loads((workdir / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, N] and m["devices"]["count"] == 8


def test_purifier_key_is_robust_evals_fixed_key():
    import jax.random as jr

    from jaxrob.evaluation import fixed_purifier_keys

    k_i = jr.fold_in(jr.key(3), 7)
    assert jr.key_data(jr.fold_in(k_i, js._FIXED)).tolist() == jr.key_data(
        fixed_purifier_keys(jr.key(3), jnp.array([7]))[0]).tolist()


def test_killed_run_resumes_without_recomputing(full, tmp_path, monkeypatch):
    cfg = _config()
    real = js._compute_chunk
    calls = []

    def killed_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(js, "_compute_chunk", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        js.run(cfg, tmp_path)
    chunks = tmp_path / "ddpm_t0.1" / "chunks"
    assert [p.name for p in chunks.glob("chunk_*")] == ["chunk_0_1.npz"]

    calls.clear()

    def counting(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(js, "_compute_chunk", counting)
    res = js.run(cfg, tmp_path)
    assert calls == [[1], [2]]  # only the unfinished images
    assert (res["settings"][0]["chunks_run"], res["settings"][0]["chunks_total"]) == (2, N)
    ref, got = _per(full[0]), _per(tmp_path)
    assert set(ref) == set(got)
    for k in ref:
        if ".time_" not in k:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    calls.clear()
    assert js.run(cfg, tmp_path)["settings"][0]["chunks_run"] == 0 and calls == []


def test_sharded_equals_single_device(full, tmp_path):
    cfg = _config(topk=0, num=0)
    cfg.mesh.num_devices = 1
    res = js.run(cfg, tmp_path)
    assert res["devices"] == 1 and full[1]["devices"] == 8
    np.testing.assert_allclose(_per(tmp_path)["ddpm_t0.1.svals"],
                               _per(full[0])["ddpm_t0.1.svals"], rtol=2e-4, atol=1e-6)


def test_unclipped_has_fewer_zero_directions(full, tmp_path):
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
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier.tstar": 0.2},)),
     r"settings\[0\] \(x\): unknown config field 'purifier.tstar'"),
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier.gradient": "bpda"},)),
     "gradient: expected 'exact'"),
    (lambda c: setattr(c, "settings", ({"name": "a"}, {"name": "a"})), "unique"),
    (lambda c: setattr(c, "settings", ({"name": "a/b"},)), "sub-directory"),
    (lambda c: setattr(c, "settings", ({"name": "x", "purifier.num_steps": 10 ** 4},)),
     "num_steps"),
])
def test_bad_input_fails_before_compiling(tmp_path, monkeypatch, edit, match):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the config")

    monkeypatch.setattr(js, "_functions", no_compile)
    cfg = _config()
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        js.run(cfg, tmp_path)
    assert not (tmp_path / "ddpm_t0.1").exists()
