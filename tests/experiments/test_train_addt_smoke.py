"""experiments/train_addt.py on digits: a loadable ADDT export, the three ablation variants, a
killed run resuming to the same parameters bit for bit, and bad input refused before any step.

The fine-tunes start from a tiny random DDPM export and a tiny classifier export written here (the
committed digits models work the same way, ``configs/digits_addt.py:smoke``, but their UNet
triples the compilation time); the committed MNIST DDPM is the wrong-image-shape export.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from exp_helpers import REPO, load_config

import jaxrob
from experiments import _train_addt, train_addt
from jaxrob.checkpoint import Checkpointer, export_checksum, load_params, read_metadata, save_params
from jaxrob.models import DiffusionModel, classifier_from_metadata, unet_from_metadata
from jaxrob.training import read_metrics

UNET = {"name": "unet", "config": "digits",
        "overrides": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
                      "dropout": 0.0, "num_groups": 4}}
DIFFUSION = {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
CNN = {"name": "small_cnn", "kwargs": {"features": [4, 8], "hidden": 16, "dropout": 0.0}}
DIGITS = {"name": "digits", "train_split": "train", "image_shape": [8, 8, 1]}
NUM_STEPS = 4  # the smoke config: batch 16, checkpoints at 2 and 4


def _random_variables(init, *args, seed):
    """Variables of ``init``'s shapes drawn on the host: no init program to compile (XLA:CPU
    takes longer over a UNet's initialisers than over its ADDT step). N(0, 0.1^2) weights,
    norm scales around 1, BatchNorm statistics 0 / 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name or "mean" in name:
            return np.full(s.shape, float("var" in name), np.float32)
        x = rng.normal(0.0, 0.1, s.shape).astype(np.float32)
        return x + 1.0 if "scale" in name else x

    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(init, jr.key(0), *args))


def _classifier_export(path, num_classes):
    module = classifier_from_metadata(CNN, num_classes)
    variables = _random_variables(module.init, jnp.zeros((1, 8, 8, 1)), seed=num_classes)
    return save_params(path, variables, {"kind": "classifier", "model": CNN,
                                         "num_classes": num_classes, "data": DIGITS})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    variables = _random_variables(unet_from_metadata(UNET).init, jnp.zeros((1, 8, 8, 1)),
                                  jnp.zeros((1,), jnp.int32), seed=0)
    ddpm = save_params(root / "ddpm", variables, {"kind": "ddpm", "model": UNET,
                                                  "diffusion": DIFFUSION, "data": DIGITS,
                                                  "step": 0, "params": "ema"})
    return {"ddpm": ddpm, "clf": _classifier_export(root / "clf", 10),
            "clf3": _classifier_export(root / "clf3", 3)}


def _config(exports, variant="addt"):
    cfg = load_config("digits_addt", f"{variant},smoke")
    cfg.ddpm.path, cfg.classifier.path = str(exports["ddpm"]), str(exports["clf"])
    return cfg


@pytest.fixture(scope="module")
def smoke(exports, tmp_path_factory):
    wd = tmp_path_factory.mktemp("addt")
    return wd, train_addt.run(_config(exports), wd)


def test_smoke_writes_a_loadable_addt_export(smoke, exports):
    wd, res = smoke
    model = jaxrob.models.load(wd / "export")
    assert isinstance(model, DiffusionModel) and model.schedule.num_steps == 1000
    meta = read_metadata(wd / "export")
    assert meta["kind"] == "ddpm" and meta["params"] == "ema" and meta["step"] == NUM_STEPS
    ft = meta["finetune"]
    assert ft["method"] == "addt" and ft["variant"] == "addt" and ft["steps"] == NUM_STEPS
    assert ft["options"] == {**ft["options"], "mapping": "rbgm", "num_iters": 5,
                             "lambda_unit": 0.03, "lambda_min": 0.0, "lambda_max": 0.3}
    assert ft["base"]["checksum"] == export_checksum(exports["ddpm"])
    assert ft["classifier"]["checksum"] == export_checksum(exports["clf"])
    assert ft["classifier"]["num_classes"] == 10
    assert meta["train"]["learning_rate"] == 2e-4 and meta["train"]["b1"] == 0.95
    # the same network, other parameters
    base, _ = load_params(exports["ddpm"])
    tuned, _ = load_params(wd / "export")
    assert jax.tree.structure(base) == jax.tree.structure(tuned)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                         jax.tree.leaves(tuned), strict=True))
    # metrics of every step; RBGM's delta is a permutation of N(0, 1) draws
    recs = read_metrics(wd)
    assert [r["step"] for r in recs] == list(range(1, NUM_STEPS + 1))
    for r in recs:
        assert np.isfinite(r["loss"]) and r["lr"] == pytest.approx(2e-4)
        assert 0.0 <= r["ratio"] <= 0.3 and 0.8 < r["delta_rms"] < 1.2
    assert Checkpointer(wd / "checkpoints").all_steps() == [2, 4]
    # timing, manifest, the before/after evaluation
    t = res["train"]
    assert t["steps_run"] == NUM_STEPS and t["steps_per_s"] > 0 and t["compile_s"] > 0
    m = res["manifest"]
    assert m["devices"]["count"] == 8 and m["wall_s"] > 0 and "commit" in m["git"]
    assert m["config"]["addt"]["variant"] == "addt"
    ev = res["eval"]
    assert ev["num_images"] == 16 and set(ev["base"]) == {"t_star=0.1", "t_star=0.3"}
    for name in ("base", "finetuned"):
        row = ev[name]["t_star=0.1"]
        assert row["step"] == 99 and 0.0 <= row["x0_accuracy"] <= 1.0
        assert np.isfinite(row["eps_mse"]) and 0.0 <= row["x0_mse"] <= 1.0
    assert meta["metrics"]["eval"] == ev


# ~30 s each; the step's options are unit-tested in CI (tests/training/test_addt.py)
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["no_rbgm", "no_cgpo"])
def test_ablation_variants_run(exports, tmp_path, variant):
    cfg = _config(exports, variant)
    cfg.eval.enabled = False
    res = train_addt.run(cfg, tmp_path)
    ft = read_metadata(tmp_path / "export")["finetune"]
    assert ft["variant"] == variant and res["train"]["num_steps"] == NUM_STEPS
    recs = read_metrics(tmp_path)
    assert len(recs) == NUM_STEPS and all(np.isfinite(r["loss"]) for r in recs)
    if variant == "no_rbgm":  # the reference's Linf PGD step: delta within 2 * 8/255
        assert ft["options"]["mapping"] == "pgd_linf" and ft["options"]["num_iters"] == 5
        assert all(0.0 < r["delta_rms"] <= 2 * 8 / 255 + 1e-6 for r in recs)
        assert all(0.0 <= r["ratio"] <= 10.0 for r in recs)
    else:  # the control run: delta ~ N(0, I), no CGPO
        assert ft["options"]["mapping"] == "gaussian" and ft["options"]["num_iters"] == 0
        assert all(0.8 < r["delta_rms"] < 1.2 for r in recs)


def test_killed_run_resumes_to_the_same_parameters(smoke, exports, tmp_path, monkeypatch):
    ref_wd, _ = smoke
    stream = _train_addt.batch_stream

    def killed_at_step_3(train_ds, batch_size, seed):
        batches = stream(train_ds, batch_size, seed)

        def gen(start):
            for i, batch in enumerate(batches(start)):
                if start + i == 3:  # three steps done, the last checkpoint at step 2
                    raise KeyboardInterrupt("killed")
                yield batch
        return gen

    monkeypatch.setattr(_train_addt, "batch_stream", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_addt.run(_config(exports), tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    assert not (tmp_path / "export").exists()
    monkeypatch.undo()
    res = train_addt.run(_config(exports), tmp_path)
    t = res["train"]
    assert t["resumed"] and t["start_step"] == 2 and t["steps_run"] == NUM_STEPS - 2
    ref, _ = load_params(ref_wd / "export")
    got, _ = load_params(tmp_path / "export")
    jax.tree.map(np.testing.assert_array_equal, got, ref)
    assert export_checksum(tmp_path / "export") == export_checksum(ref_wd / "export")
    # the metrics file describes one run, identical to the uninterrupted one
    a, b = read_metrics(tmp_path), read_metrics(ref_wd)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for k in ("loss", "grad_norm", "delta_rms", "ratio"):
        assert [r[k] for r in a] == [r[k] for r in b], k


@pytest.mark.parametrize("change, match", [
    ({"addt.lambda_min": 0.5}, r"addt.lambda_min, addt.lambda_max: expected lambda_min <= "
                               r"lambda_max, got lambda_min=0.5 > lambda_max=0.3"),
    ({"addt.num_iters": -1}, r"addt.num_iters: expected a non-negative integer .* got -1"),
    ({"addt.lambda_max": 1.5}, r"addt.lambda_max: expected a value in \[0.0, 1.0\]"),
    ({"classifier.path": "clf3"}, r"classifier.path: the classifier export .*clf3 has 3 "
                                  r"classes; expected 10, the number of classes of the data "
                                  r"\(digits train\)"),
    ({"ddpm.path": "checkpoints/mnist_ddpm"}, r"ddpm.path: the DDPM export .*mnist_ddpm was "
                                              r"trained on images of shape \(28, 28, 1\); "
                                              r"expected \(8, 8, 1\)"),
    ({"ddpm.path": "clf"}, r"ddpm.path: .* holds a 'classifier' export, expected a 'ddpm'"),
])
def test_bad_input_raises_before_any_step(exports, tmp_path, change, match):
    cfg = _config(exports)
    for field, value in change.items():
        section, name = field.split(".")
        if name == "path" and value in exports:
            value = str(exports[value])
        elif name == "path":
            value = str(REPO / value)
        cfg[section][name] = value
    with pytest.raises(ValueError, match=match):
        train_addt.run(cfg, tmp_path / "wd")
    assert not (tmp_path / "wd" / "checkpoints").exists()
    assert not (tmp_path / "wd" / "config.json").exists()


def test_config_variants():
    for arg, variant in [(None, "addt"), ("no_rbgm", "no_rbgm"), ("no_cgpo,smoke", "no_cgpo"),
                         ("smoke", "addt")]:
        cfg = load_config("digits_addt", arg)
        assert cfg.addt.variant == variant
        assert (cfg.train.num_steps == NUM_STEPS) == ("smoke" in (arg or ""))
        assert cfg.train.learning_rate == 2e-4 and cfg.addt.num_iters == 5
    cfg = load_config("mnist_addt", "no_cgpo")
    assert cfg.ddpm.path == "checkpoints/mnist_ddpm" and cfg.addt.variant == "no_cgpo"
    for bad in ("smoke,smoke", "addt,no_cgpo", "rbgm"):
        with pytest.raises(ValueError, match="config variant"):
            load_config("digits_addt", bad)
