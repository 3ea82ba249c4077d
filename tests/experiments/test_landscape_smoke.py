"""experiments/addt_landscape.py on the digits smoke config (random tiny UNets, the committed
digits classifier): shapes, invariants and resume (a second run computes nothing).

Each (model, randomness) setting compiles one chunk program (PGD through the purifier, the
trajectory, the landscape, the scores): ~45 s on the loaded 2-core CPU, and a random UNet's
initialisation another ~20 s. CI runs one model in the stochastic setting; the whole smoke
config (two models, both settings) is marked slow."""

import json

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import addt_landscape


def _config():
    cfg = load_config("digits_landscape", "smoke")
    cfg.mesh.num_devices = 2
    return cfg


# ~65 s; the landscape functions are unit-tested in CI (tests/analysis/test_landscape.py)
@pytest.mark.slow
def test_landscape_smoke_one_unit_and_resume(tmp_path):
    cfg = _config()
    cfg.models = cfg.models[:1]
    cfg.study.randomness = ("stochastic",)
    res = addt_landscape.run(cfg, tmp_path)
    assert res["chunks_run"] == 2 and list(res["summary"]) == ["ddpm"]
    per = dict(np.load(tmp_path / "landscape.npz"))
    steps = cfg.attack.num_steps + 1
    assert per["ddpm__stochastic__trajectory"].shape == (4, steps)
    assert per["ddpm__stochastic__landscape"].shape == (4, 3, 3)
    assert np.all(per["ddpm__stochastic__adv_linf"] <= cfg.attack.eps + 1e-6)
    u = res["summary"]["ddpm"]["stochastic"]
    assert np.isfinite(u["landscape"]["roughness"]["mean"])
    assert 0.0 <= u["accuracy"]["clean"] <= 1.0
    for f in res["figures"]:
        assert (tmp_path / f).stat().st_size > 0
    # finished: a rerun loads no model and computes nothing; the record is the same
    res2 = addt_landscape.run(cfg, tmp_path)
    assert res2["chunks_run"] == 0
    assert res2["summary"]["ddpm"]["stochastic"]["trajectory"] == u["trajectory"]


@pytest.mark.slow  # two settings x two random UNets: two chunk programs, ~3 min alone on 2 cores
def test_landscape_smoke_and_resume(tmp_path):
    cfg = _config()
    res = addt_landscape.run(cfg, tmp_path)
    assert res["num_images"] == 4 and res["chunks_run"] == 8  # 2 models x 2 settings x 2
    assert set(res["summary"]) == {"ddpm", "other"}
    grid = np.asarray(res["grid_eps_units"])
    np.testing.assert_allclose(grid, [-2.0, 0.0, 2.0])
    per = dict(np.load(tmp_path / "landscape.npz"))
    steps = cfg.attack.num_steps + 1
    for name in ("ddpm", "other"):
        for r in ("stochastic", "fixed"):
            traj, land = per[f"{name}__{r}__trajectory"], per[f"{name}__{r}__landscape"]
            assert traj.shape == (4, steps) and land.shape == (4, 3, 3)
            assert np.all(np.isfinite(traj)) and np.all(np.isfinite(land))
            assert np.all(per[f"{name}__{r}__adv_linf"] <= cfg.attack.eps + 1e-6)
            u = res["summary"][name][r]
            assert len(u["trajectory"]["mean"]) == steps
            assert 0.0 <= u["accuracy"]["adversarial"] <= 1.0
        # DW-box: the landscape's origin is the loss at x under the fixed key, which is the
        # trajectory's start (PGD starts at x); the x_adv direction at 2 eps is clipped to
        # the box, never past it
        fixed_traj, fixed_land = per[f"{name}__fixed__trajectory"], per[f"{name}__fixed__landscape"]
        np.testing.assert_allclose(fixed_land[:, 1, 1], fixed_traj[:, 0], rtol=1e-4, atol=1e-5)
        # the stochastic attack and the DW-box attack are different runs
        assert not np.allclose(per[f"{name}__stochastic__trajectory"], fixed_traj)
    for f in res["figures"]:
        assert (tmp_path / f).stat().st_size > 0
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 4]

    # a killed run: one chunk of one unit lost; the rerun computes only it, same numbers
    (tmp_path / "units" / "other_fixed" / "chunk_2_4.npz").unlink()
    res2 = addt_landscape.run(cfg, tmp_path)
    assert res2["chunks_run"] == 1
    per2 = dict(np.load(tmp_path / "landscape.npz"))
    for k, v in per.items():
        np.testing.assert_allclose(per2[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert addt_landscape.run(cfg, tmp_path)["chunks_run"] == 0  # finished: no work

    cfg.study.grid_points = 5  # another run's settings: refused, nothing mixed
    with pytest.raises(ValueError, match="another run"):
        addt_landscape.run(cfg, tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("study.randomness", ("stochastic", "forward_lock"), "study.randomness"),
    ("study.grid_points", 1, "study.grid_points"),
    ("study.grid_radius", -1.0, "study.grid_radius"),
    ("study.direction", "uniform", "study.direction"),
    ("study.batch_size", 3, "does not divide"),
    ("attack.name", "apgd", "attack.name"),
    ("models", ({"name": "a"}, {"name": "a"}), "distinct"),
])
def test_bad_input(tmp_path, field, value, match):
    cfg = _config()
    if "." in field:
        section, leaf = field.split(".")
        cfg[section][leaf] = value
    else:
        cfg[field] = value
    with pytest.raises(ValueError, match=match):
        addt_landscape.run(cfg, tmp_path)
    assert not (tmp_path / "units").exists()
