"""experiments/robust_eval.py with AutoAttack rows and eval.soundness (digits smoke config).

The committed digits models, 8 images, 2 iterations. AutoAttack rows on the classifier alone
(APGD-CE and a short Square, version custom; APGD-CE + APGD-DLR with EoT 2, version rand) and
two of the soundness checks on the first row's first 4 images (the checks themselves are tested
in tests/evaluation/test_soundness.py). AutoAttack through the DDPM purifier compiles each APGD
stage through the UNet (about 3 minutes on 2 cores): the slow test.
"""

import json

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import robust_eval

AA_CLF = {"name": "classifier_aa", "purifier": {"enabled": False},
          "attack": {"name": "autoattack",
                     "autoattack": {"version": "custom", "attacks": ("apgd-ce", "square"),
                                    "n_queries": 20}},
          # base and large-eps runs share one compilation (eps is traced)
          "eval": {"soundness": {"num_images": 4, "checks": ("large_eps", "flags")}}}
AA_RAND = {"name": "classifier_aa_rand", "purifier": {"enabled": False},
           "attack": {"name": "autoattack", "autoattack": {"version": "rand", "eot_samples": 2}}}
AA_DDPM = {**AA_RAND, "name": "ddpm_aa_rand", "purifier": {"enabled": True}}


def _config(*rows):
    cfg = load_config("digits_robust", "smoke")
    cfg.rows = rows or (AA_CLF, AA_RAND)
    return cfg


# ~45 s; soundness_checks and AutoAttack are unit-tested in CI (test_soundness.py,
# test_autoattack_fab.py)
@pytest.mark.slow
def test_autoattack_rows_and_soundness_checks_are_recorded_and_resume(tmp_path):
    res = robust_eval.run(_config(), tmp_path)
    clf, rand = res["rows"]
    for row, version, attacks in ((clf, "custom", ["apgd-ce", "square"]),
                                  (rand, "rand", ["apgd-ce", "apgd-dlr"])):
        aa = row["autoattack"]
        assert aa["version"] == version and aa["attacks"] == attacks
        assert list(aa["accuracy"]) == ["clean", *attacks]
        acc = list(aa["accuracy"].values())
        assert all(a >= b for a, b in zip(acc, acc[1:], strict=False))  # running accuracy
        assert sum(aa["broken_by"].values()) == round(8 * (1 - aa["robust_accuracy"]))
        assert aa["max_perturbation"] <= 0.2 + 1e-6 and row["mean_linf"] <= 0.2 + 1e-6
        assert row["adv"]["one_shot"]["num_images"] == 8 and row["nfe"]["attack_per_image"] is None
        # a deterministic model: AutoAttack's robust flags are what the scoring measures
        assert not aa["looks_randomised"] and aa["consistent"]
        assert aa["agrees_with_scoring"] == 8
        assert row["adv"]["one_shot"]["accuracy"] == aa["robust_accuracy"]
    assert clf["autoattack"]["eot_samples"] == 1 and rand["autoattack"]["eot_samples"] == 2
    # the soundness checks asked for, a verdict each, in results.json and the table
    snd = clf["soundness"]
    assert set(snd["verdicts"]) == {"large_eps", "flags"} and snd["num_images"] == 4
    assert snd["settings"]["attack"] == "apgd" and snd["settings"]["num_steps"] == 2
    assert snd["checks"]["flags"]["remeasure"]["agree"] == 4
    assert "soundness" not in rand  # not asked for in that row
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["rows"][0]["soundness"]["verdicts"] == snd["verdicts"]
    table = (tmp_path / "table.md").read_text()
    assert "## AutoAttack" in table and "## Soundness checks" in table
    assert "autoattack-rand" in table and "| classifier_aa | 4 | large_eps |" in table
    per = np.load(tmp_path / "classifier_aa" / "per_example.npz")
    assert per["aa_broken_by"].shape == (8,) and per["pred_adv"].shape == (8, 2)
    # rerunning resumes: no chunk is recomputed, the soundness checks are kept
    again = robust_eval.run(_config(), tmp_path)
    assert [r["chunks_run"] for r in again["rows"]] == [0, 0]
    assert again["rows"][0]["soundness"] == snd
    assert again["rows"][1]["autoattack"]["accuracy"] == rand["autoattack"]["accuracy"]


@pytest.mark.slow  # AutoAttack compiles APGD-CE and APGD-DLR through the UNet: ~3 min on 2 cores
def test_autoattack_rand_row_through_the_purifier(tmp_path):
    (row,) = robust_eval.run(_config(AA_DDPM), tmp_path)["rows"]
    aa = row["autoattack"]
    assert aa["looks_randomised"] and aa["eot_samples"] == 2  # the purifier's noise
    assert row["purifier"]["gradient"] == "exact" and aa["max_perturbation"] <= 0.2 + 1e-6
    assert row["adv"]["one_shot"]["num_images"] == 8


def test_old_rows_keep_their_fingerprint():
    from experiments import _common
    from experiments._robust_eval import _fingerprint

    cfg = load_config("digits_robust", "smoke")
    rc = _common.row_config(cfg, cfg.rows[1])
    fp = _fingerprint(rc)
    # the AutoAttack options enter only AutoAttack rows' fingerprints; eval.soundness none
    assert "autoattack" not in fp["attack"] and "soundness" not in json.dumps(fp)
    aa = _fingerprint(_common.row_config(cfg, AA_DDPM))
    assert aa["attack"]["autoattack"]["version"] == "rand"


@pytest.mark.parametrize("row, match", [
    ({"attack": {"name": "autoattack"}, "eval": {"randomness": "fixed"}}, "stochastic"),
    ({"attack": {"name": "autoattack", "autoattack": {"version": "fast"}}}, "version"),
    ({"attack": {"name": "autoattack", "autoattack": {"attacks": ("apgd-ce",)}}}, "custom"),
    ({"eval": {"soundness": {"num_images": 4, "checks": ("masking",)}}}, "soundness.checks"),
    ({"eval": {"soundness": {"num_images": 4, "factor": 1}}}, "soundness.factor"),
])
def test_bad_autoattack_and_soundness_rows_fail_before_work(tmp_path, row, match):
    cfg = load_config("digits_robust", "smoke")
    cfg.rows = ({"name": "ok", "purifier": {"enabled": False}}, {"name": "x", **row})
    with pytest.raises(ValueError, match=match):
        robust_eval.run(cfg, tmp_path)
    assert not list(tmp_path.glob("*/chunks/chunk_*"))
