"""experiments/compression_fit.py: smoke run (real code path), the fits, bad settings."""

import json
import types

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import compression_fit


def _one_setting(cfg):
    # one setting and one classifier radius keep the smoke test short; the fits are tested
    # on synthetic settings below
    cfg.settings = cfg.settings[:1]
    cfg.study.classifier_rates = (1.0,)
    return cfg


# ~75 s; jaxrob.analysis's compression functions are unit-tested in CI (tests/analysis)
@pytest.mark.slow
def test_compression_fit_smoke(data_dir, tmp_path):
    cfg = _one_setting(load_config("mnist_compression", "smoke"))
    cfg.data.data_dir = str(data_dir)
    res = compression_fit.run(cfg, tmp_path)
    (row,) = res["settings"]
    assert row["name"] == "ddpm_t0.05" and row["sampler"] == "ddpm"
    assert row["t_star"] == pytest.approx(0.05) and row["num_steps"] == 2
    for which in ("clean", "robust"):
        lo, hi = row[which]["ci95"]
        assert lo <= row[which]["accuracy"] <= hi and row[which]["num_images"] == 8
    comp = row["compression"]
    for which in ("adversarial", "empirical"):
        assert comp[which]["mean"] > 0 and comp[which]["num"] + comp[which]["num_undefined"] == 8
    # the rates are measured under the fixed key of the evaluation: same predictions
    assert row["key_check"] == {"clean": 1.0, "adv": 1.0}
    assert row["x_adv_source"] in ("run_row", "recomputed")
    if row["x_adv_source"] == "recomputed":
        assert row["recompute_agreement"] == 1.0
    assert row["nfe"]["compression_per_image"] == (2 + 2 + 1) * 2
    assert row["mean_linf"] <= cfg.attack.eps + 1e-6
    # one setting: every fit is skipped with its reason, the fields are still there
    for which in ("adversarial", "empirical"):
        assert set(res["fits"][which]) == {"free", "weighted", "anchored"}
        assert all("skipped" in f for f in res["fits"][which].values())
    curve = res["classifier_curve"]
    assert curve["rates"] == [0.0, 1.0] and len(curve["accuracy"]) == 2
    assert curve["accuracy"][0] == res["classifier_curve"]["clean"]["accuracy"]
    assert set(res["paper"]) >= {"fig3b", "fig3c"}
    per = np.load(tmp_path / "per_example.npz")
    assert per["index"].tolist() == list(range(8))
    for k in ("robust", "clean", "adv_rate", "emp_rate", "adv_in", "emp_out"):
        assert per[f"ddpm_t0.05__{k}"].shape == (8,)
    assert per["classifier_r1__robust"].shape == (8,)
    assert (tmp_path / "compression_fit.png").stat().st_size > 0
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 8] and m["devices"]["count"] == 8
    # resumable: every stage left its finished chunks (a rerun skips them)
    for stage in ("chunks", "compression"):
        assert (tmp_path / "ddpm_t0.05" / stage / "chunk_0_8.npz").exists()


def _synthetic_rows(rates, acc, samplers, n=256):
    rows = []
    for i, (r, a, s) in enumerate(zip(rates, acc, samplers, strict=True)):
        stats = {"mean": r, "std": 0.05, "median": r, "sem": 0.005, "num": n,
                 "num_undefined": 0}
        rows.append({"name": f"{s}_{i}", "sampler": s, "t_star": 0.1 * (i + 1),
                     "robust": {"accuracy": a, "ci95": [max(a - 0.05, 0), min(a + 0.05, 1)]},
                     "clean": {"accuracy": 0.98, "ci95": [0.95, 0.99]},
                     "compression": {"adversarial": stats, "empirical": dict(stats)}})
    return rows


def test_fits_recover_a_sigmoid(tmp_path):
    rates = np.linspace(0.3, 1.3, 9)
    truth = 0.02 + 0.96 / (1.0 + np.exp(6.0 * (rates - 0.8)))  # decreasing: k = -6
    noisy = np.clip(truth + 0.01 * np.sin(np.arange(9) * 2.3), 0, 1)
    rows = _synthetic_rows(rates.tolist(), noisy.tolist(), ["ddpm"] * 6 + ["ddim"] * 3)
    fits = compression_fit._fits(rows, 0.95, 256)
    free = fits["adversarial"]["free"]
    assert free["converged"] and free["r2"] > 0.99 and free["dof"] == 5
    assert free["ci"]["k"][0] < -6.0 < free["ci"]["k"][1]
    assert free["ci"]["x0"][0] < 0.8 < free["ci"]["x0"][1]
    assert set(free["stderr"]) == {"bottom", "top", "k", "x0"}
    icpt = free["y_intercept"]
    assert icpt["ci"][0] <= icpt["value"] <= icpt["ci"][1]
    assert icpt["clean_accuracy_mean"] == pytest.approx(0.98)
    assert free["asymptotes_in_range"]
    assert set(free["mean_residual_by_sampler"]) == {"ddim", "ddpm"}
    weighted = fits["adversarial"]["weighted"]
    assert weighted["reduced_chi2"] >= 0 and weighted["params"]["k"] < 0
    anchored = fits["empirical"]["anchored"]
    assert anchored["asymptotes"] == [0.0, pytest.approx(0.98)] and anchored["dof"] == 7
    curve = {"rates": [0.0, 0.5, 1.0, 1.5], "accuracy": [0.99, 0.8, 0.3, 0.05],
             "ci95": [[0.97, 1.0], [0.75, 0.85], [0.25, 0.35], [0.02, 0.1]]}
    cmp = compression_fit._compare_curve(rows, curve)
    assert set(cmp["difference"]) == {r["name"] for r in rows}
    assert np.isfinite(cmp["mean_abs_difference"])
    compression_fit._plot(tmp_path / "fit.png", rows, fits, curve, "pgd")
    assert (tmp_path / "fit.png").stat().st_size > 0
    # too few settings: skipped with the reason, never an exception
    few = compression_fit._fits(rows[:3], 0.95, 256)
    assert "skipped" in few["adversarial"]["free"] and "params" in few["adversarial"]["anchored"]


def test_x_adv_taken_from_the_row_record_when_kept():
    x = np.zeros((2, 4, 4, 1), np.float32)
    test = types.SimpleNamespace(images=x)
    got, source, agree = compression_fit._x_adv(None, "s", None, None, test, None,
                                                {"x_adv": x + 0.5})
    assert source == "run_row" and agree is None and np.all(got == 0.5)


@pytest.mark.parametrize("edit, match", [
    (lambda c: setattr(c, "settings", ()), "at least one purifier setting"),
    (lambda c: setattr(c, "settings", ({"name": "a", "attack": {"eps": 0.1}},)),
     "only change purifier"),
    (lambda c: setattr(c, "settings", ({"name": "a"}, {"name": "a"})), "unique"),
    (lambda c: setattr(c, "settings", ({"name": "a", "purifier": {"t_sttar": 0.1}},)),
     "unknown config field 'purifier.t_sttar'"),
    (lambda c: setattr(c, "settings", ({"name": "a", "purifier": {"enabled": False}},)),
     "purifier enabled"),
    (lambda c: setattr(c, "settings", ({"name": "a", "purifier": {"gradient": "bpda"}},)),
     "gradient must be 'exact'"),
    (lambda c: c.eval.update(randomness="stochastic"), "eval.randomness"),
    (lambda c: c.attack.update(eot_samples=2), "attack.eot_samples"),
    (lambda c: c.attack.update(name="none"), "needs an attack"),
    (lambda c: c.study.update(classifier_rates=(0.0, 1.0)), "classifier_rates"),
    (lambda c: c.study.update(num=0), "study.num"),
])
def test_bad_settings_fail_before_work(tmp_path, edit, match):
    cfg = load_config("mnist_compression", "smoke")
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        compression_fit.run(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
