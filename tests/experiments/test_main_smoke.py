"""experiments/main.py on its smoke config: trains both models (through train_diffusion.run and
train_classifier.run), exports them, evaluates; a rerun loads the exports."""

import json

import numpy as np
import pytest
from exp_helpers import load_config
from PIL import Image

from experiments import eval_classifier, main, train_diffusion
from jaxrob.checkpoint import read_metadata


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("main")
    return wd, main.run(load_config("main", "smoke"), wd)


def test_main_trains_exports_and_reports(main_run):
    wd, res = main_run
    on_disk = json.loads((wd / "results.json").read_text())
    assert on_disk["accuracy"] == res["accuracy"]
    assert res["ddpm"]["source"] == res["classifier"]["source"] == "trained"
    assert set(res["denoising"]) == {"t_star=0.1", "t_star=0.3"}
    d = res["denoising"]["t_star=0.1"]
    assert d["num_images"] == 16 and np.isfinite(d["eps_mse"]) and 0 <= d["x0_mse"] <= 1
    assert 0.0 <= res["accuracy"] <= 1.0
    (row,) = res["robust"]["rows"]
    assert row["name"] == "classifier" and row["adv"]["one_shot"]["num_images"] == 8
    assert (wd / "robust" / "table.md").is_file()
    m = res["manifest"]
    assert m["devices"]["count"] == 8 and m["versions"]["jax"] and "commit" in m["git"]
    assert m["config"]["ddpm"]["train"]["num_steps"] == 3 and m["wall_s"] > 0
    assert set(m["seeds"]) >= {"ddpm", "classifier", "sample", "eval"}
    png = Image.open(wd / "samples.png")
    assert png.size[0] >= 256 and png.size == png.size[::-1]
    assert np.load(wd / "samples.npz")["samples"].shape == (4, 8, 8, 1)
    # exports carry config + metrics; training workdirs carry metrics and checkpoints
    meta = read_metadata(wd / "checkpoints" / "digits_ddpm")
    assert meta["kind"] == "ddpm" and meta["params"] == "ema" and meta["step"] == 3
    assert "t_star=0.3" in meta["metrics"]["denoising"]
    meta = read_metadata(wd / "checkpoints" / "digits_classifier")
    assert meta["kind"] == "classifier" and "accuracy" in meta["metrics"]["test"]
    recs = [json.loads(x) for x in (wd / "train_ddpm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert sorted(p.name for p in (wd / "train_ddpm" / "checkpoints").iterdir()) == ["2", "3"]


def test_main_rerun_loads_exports(main_run):
    wd, first = main_run
    again = main.run(load_config("main", "smoke"), wd)
    assert again["ddpm"]["source"] == again["classifier"]["source"] == "loaded"
    assert again["denoising"] == first["denoising"]
    assert again["accuracy"] == first["accuracy"]


def test_export_from_another_config_is_refused(main_run):
    wd, _ = main_run
    cfg = load_config("main", "smoke")
    cfg.ddpm.model.overrides.ch = 16
    with pytest.raises(ValueError, match=r"model.overrides.ch: expected 16, found 8"):
        main.run(cfg, wd)


def test_resuming_with_another_model_is_refused(main_run):
    wd, _ = main_run
    before = (wd / "train_ddpm" / "config.json").read_text()
    cfg = load_config("digits_ddpm", "smoke")
    cfg.model.overrides.num_groups = 2
    with pytest.raises(ValueError, match=r"expected 2, found 4"):
        train_diffusion.run(cfg, wd / "train_ddpm")
    assert (wd / "train_ddpm" / "config.json").read_text() == before  # untouched


def test_eval_classifier_on_an_export(main_run, tmp_path):
    wd, _ = main_run
    cfg = load_config("cifar10_resnet20_pretrained", "smoke")
    cfg.data.name = "digits"
    cfg.data.test_split = "test"
    cfg.model.source = "export"
    cfg.model.path = str(wd / "checkpoints" / "digits_classifier")
    cfg.eval.update(num_images=32, batch_size=32)
    res = eval_classifier.run(cfg, tmp_path)
    trained = json.loads((wd / "train_classifier" / "results.json").read_text())
    assert res["accuracy"] == trained["accuracy"]  # same export, same 32 test images
    pred = np.load(tmp_path / "predictions.npz")
    assert pred["predictions"].shape == (32,)
    np.testing.assert_array_equal(pred["indices"], np.arange(32))
