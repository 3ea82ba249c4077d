"""experiments/diffdefense_eval.py on its smoke config (real code path: 8 digits, a random tiny
UNet, R = 2 restarts of L = 1 Adam step over 3 reverse steps, tiny attacks)."""

import json

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from exp_helpers import load_config

from experiments import _diffdefense_eval, diffdefense_eval

# white-box, black-box and the adaptive detection-aware attack (BPDA): the CI test. Every smoke
# row (+ Square, DeepFool, EAD, adaptive BPDA and exact gradients through the unrolled
# optimisation) runs in the slow test: each row compiles its own attack program, the exact one
# a second-order program through the UNet (minutes of compilation on the 2-core CPU).
SMOKE_ROWS = ("wb_fgsm", "bb_pgd", "ad_bpda_detect_pgd")
ALL_ROWS = ("wb_fgsm", "bb_pgd", "wb_deepfool", "wb_square", "wb_ead", "ad_bpda_pgd",
            "ad_bpda_detect_pgd", "ad_exact_detect_pgd")


def _smoke(rows=SMOKE_ROWS):
    cfg = load_config("mnist_diffdefense", "smoke")
    cfg.rows = tuple(r for r in cfg.rows if r["name"] in rows)
    return cfg


def _check_rows(res, names):
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == list(names)
    for name, r in rows.items():
        assert r["setting"] == {"wb": "white-box", "bb": "black-box",
                                "ad": "adaptive"}[name[:2]]
        n = 4 if name == "ad_exact_detect_pgd" else 8  # that row runs on the first 4 images
        assert r["num_images"] == n and r["robust_defended"]["num_images"] == n
        for k in ("clean", "clean_defended", "robust", "robust_defended",
                  "defended_or_detected"):
            lo, hi = r[k]["ci95"]
            assert lo <= r[k]["accuracy"] <= hi
        # the detector on top of the defence only adds: correct, or flagged
        assert r["defended_or_detected"]["accuracy"] >= r["robust_defended"]["accuracy"]
        assert 0.0 <= r["detection"]["auc"] <= 1.0 and r["detection"]["fpr"] <= 0.05
        if r["attack"]["name"] in ("fgsm", "pgd", "square"):
            assert r["mean_linf"] <= 0.3 + 1e-6  # Linf eps 0.3
        assert r["reconstruction_s_per_image"] > 0 and r["row_s_per_image"] > 0
        if name.startswith("ad_"):
            assert r["defence"]["gradient"] == name.split("_")[1]
    return rows


# ~60 s; the defence, detection and detection-aware attack are unit-tested in CI
# (test_diffdefense.py, test_detection_aware.py), the config rows by test_bad_input.py
@pytest.mark.slow
def test_diffdefense_smoke_end_to_end_and_resume(tmp_path):
    cfg = _smoke()
    res = diffdefense_eval.run(cfg, tmp_path)
    rows = _check_rows(res, SMOKE_ROWS)
    assert rows["ad_bpda_detect_pgd"]["attack"]["detection_weight"] == 10.0
    assert res["defence"]["restarts"] == 2 and res["defence"]["iterations"] == 2
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 8] and "commit" in m["git"]
    per = np.load(tmp_path / "wb_fgsm" / "per_example.npz")
    assert per["index"].tolist() == list(range(8)) and per["error_adv"].shape == (8,)
    clean = np.load(tmp_path / "clean" / "per_example.npz")
    assert clean["error"].shape == (8,) and np.all(clean["error"] >= 0)
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(SMOKE_ROWS) and "det@5%FPR" in table
    timing = json.loads((tmp_path / "reconstruction_timing.json").read_text())
    # rerunning the same command resumes: nothing is recomputed, the records are the same
    again = diffdefense_eval.run(cfg, tmp_path)
    assert again["clean"]["chunks_run"] == 0
    assert [r["chunks_run"] for r in again["rows"]] == [0] * len(SMOKE_ROWS)
    for r0, r1 in zip(res["rows"], again["rows"], strict=True):
        for k in ("robust", "robust_defended", "detection", "mean_linf"):
            assert r0[k] == r1[k]
    assert again["reconstruction_timing"] == timing
    assert (tmp_path / "table.md").read_text() == table


@pytest.mark.slow  # every attack of the smoke config: ~8 compilations, one second-order
def test_diffdefense_smoke_every_row(tmp_path):
    res = diffdefense_eval.run(_smoke(ALL_ROWS), tmp_path)
    rows = _check_rows(res, ALL_ROWS)
    assert rows["ad_exact_detect_pgd"]["num_images"] == 4
    assert rows["wb_ead"]["mean_l1"] > 0 and rows["wb_deepfool"]["mean_l2"] > 0


def test_bad_config_fails_before_any_work(tmp_path):
    def fails(match, exc=ValueError, **changes):
        cfg = _smoke(("wb_fgsm",))
        for path, value in changes.items():
            node = cfg
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        with pytest.raises(exc, match=match):
            diffdefense_eval.run(cfg, tmp_path)

    fails("defence.restarts", defence__restarts=0)
    fails("defence.iterations", defence__iterations=0)
    for fpr in (0.0, 1.0, 1.5, -0.1):
        fails("eval.fpr", eval__fpr=fpr)
    fails("defence.gradient", defence__gradient="adjoint")
    fails("attack.name", rows=({"name": "x", "attack": {"name": "cw"}},))
    fails("attack.crafted_on", rows=({"name": "x", "attack": {"crafted_on": "ensemble"}},))
    fails("detection_weight", rows=({"name": "x", "attack": {"detection_weight": 1.0}},))
    fails("only defence.gradient", rows=({"name": "x", "defence": {"restarts": 3}},))
    fails("unknown config field", rows=({"name": "x", "attack": {"epss": 0.1}},))
    fails("missing model export", FileNotFoundError, substitute__path="checkpoints/nothing")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_configs_load_and_kmnist_is_ready():
    for name in ("mnist_diffdefense", "kmnist_diffdefense"):
        for arg in (None, "small", "smoke"):
            cfg = load_config(name, arg)
            assert cfg.rows and len({r["name"] for r in cfg.rows}) == len(cfg.rows)
            for r in cfg.rows:  # every row merges into the base config and builds its attack
                _diffdefense_eval.make_attack(
                    _diffdefense_eval._common.row_config(cfg, r).attack)
    k = load_config("kmnist_diffdefense")
    assert k.ddpm.path == "checkpoints/kmnist_ddpm" and k.data.name == "kmnist"
    assert k.classifier.path == "checkpoints/kmnist_classifier"
    names = {r["name"] for r in load_config("mnist_diffdefense").rows}
    for attack in ("fgsm", "pgd", "eotpgd", "deepfool", "square", "ead"):
        assert {f"wb_{attack}", f"bb_{attack}"} <= names
    assert {"ad_bpda_pgd", "ad_exact_eotpgd", "ad_bpda_detect_pgd", "ad_exact_detect_pgd"} <= names


@pytest.mark.slow  # two second-order compilations through the UNet (minutes on 2 cores); CI
# checks remat == no remat of the same exact gradient with a closed-form eps-model
# (tests/attacks/test_detection_aware.py, tests/purify/test_diffdefense.py)
def test_adaptive_exact_gradient_with_remat_equals_without():
    """The gradient the exact adaptive rows follow (through the unrolled reconstruction of the
    smoke config's tiny UNet, EoT over the initial noise), with and without remat."""
    from experiments import _common
    from jaxrob.attacks import eot_value_and_grad, loss_from_logits
    from jaxrob.data import load_dataset
    from jaxrob.purify import DefendedModel

    cfg = load_config("mnist_diffdefense", "smoke")
    test = load_dataset("digits", "test[:2]")
    ddpm, _ = _common.load_ddpm(cfg.ddpm, tuple(test.image_shape), fast_vjp=True)
    clf, _ = _common.load_classifier(cfg.classifier, cfg.data, fast_vjp=True)
    x, y = jnp.asarray(test.images), jnp.asarray(test.labels)

    def grad(remat):
        cfg.defence.remat = remat
        model = DefendedModel(clf, _diffdefense_eval.make_defence(cfg.defence, ddpm))
        loss = loss_from_logits(model, "ce")  # one key per EoT sample, shared by the batch
        return jax.jit(lambda xx: eot_value_and_grad(loss, xx, y, jr.key(0), samples=2)[1])(x)

    g_remat, g_plain = grad(True), grad(False)
    assert np.all(np.isfinite(g_remat)) and float(jnp.abs(g_remat).max()) > 0
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g_plain).max()))
