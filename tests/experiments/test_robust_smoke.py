"""experiments/robust_eval.py on its smoke configs (real code path, tiny settings)."""

import json

import numpy as np
import pytest
from exp_helpers import REPO, load_config

from experiments import robust_eval


def _two_rows(cfg):
    # the exact-gradient row and the classifier alone keep the smoke test short
    cfg.rows = tuple(r for r in cfg.rows if r["name"] in ("classifier", "ddpm_exact"))
    return cfg


def test_digits_robust_smoke_and_resume(tmp_path):
    cfg = _two_rows(load_config("digits_robust", "smoke"))
    res = robust_eval.run(cfg, tmp_path)
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"classifier", "ddpm_exact"}
    clf, pur = rows["classifier"], rows["ddpm_exact"]
    assert clf["purifier"] is None and clf["adv"]["one_shot"]["num_images"] == 8
    assert pur["purifier"]["gradient"] == "exact" and pur["purifier"]["nfe_forward"] == 2
    assert pur["nfe"]["attack_per_image"] == 3 * 2 * (2 + 6)  # (iters+1) * EoT * (fwd+bwd)
    assert pur["mean_linf"] <= 0.2 + 1e-6
    for p in ("one_shot", "worst_of@2"):
        lo, hi = pur["adv"][p]["ci95"]
        assert lo <= pur["adv"][p]["accuracy"] <= hi
    assert pur["adv"]["worst_of@2"]["accuracy"] <= pur["adv"]["one_shot"]["accuracy"]
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 8] and m["devices"]["count"] == 8 and "commit" in m["git"]
    per = np.load(tmp_path / "ddpm_exact" / "per_example.npz")
    assert per["pred_adv"].shape == (8, 2) and per["index"].tolist() == list(range(8))
    assert (tmp_path / "table.md").read_text().count("\n") == 4
    # rerunning the same command resumes: nothing is recomputed, the record is the same
    again = robust_eval.run(cfg, tmp_path)
    assert [r["chunks_run"] for r in again["rows"]] == [0, 0]
    assert again["rows"][1]["adv"] == pur["adv"]


@pytest.mark.slow  # the digits smoke test runs the same code path in CI
def test_cifar10_robust_smoke(data_dir, tmp_path):
    cfg = load_config("cifar10_robust", "smoke")
    cfg.data.data_dir = str(data_dir)
    cfg.eval.protocols = ("one_shot",)
    res = robust_eval.run(cfg, tmp_path)
    (row,) = res["rows"]
    assert res["classifier"]["source"] == "akamaster" and res["ddpm"]["source"] == "random"
    assert row["adv"]["one_shot"]["num_images"] == 8
    assert row["mean_linf"] <= 8 / 255 + 1e-6


def test_bad_rows_and_attack_fail_before_work(tmp_path):
    cfg = load_config("digits_robust", "smoke")
    cfg.rows = ({"name": "x", "purifier": {"t_sttar": 0.1}},)
    with pytest.raises(ValueError, match="unknown config field 'purifier.t_sttar'"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "purifier": {"t_star": "high"}},)  # typed: a float field
    with pytest.raises(ValueError, match="purifier.t_star"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "purifier": {"sampler": "heun"}},)
    with pytest.raises(ValueError, match="sampler"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "attack": {"name": "square"}},)
    with pytest.raises(ValueError, match="attack.name"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "eval": {"protocols": ("best_of@2",)}},)
    with pytest.raises(ValueError, match="protocol"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "eval": {"randomness": "forward-lock"}},)
    with pytest.raises(ValueError, match="randomness"):
        robust_eval.run(cfg, tmp_path)
    cfg.rows = ({"name": "x", "eval": {"candidates": (1,)}},)  # no fixed_aa protocol
    with pytest.raises(ValueError, match="fixed_aa"):
        robust_eval.run(cfg, tmp_path)
    assert not list(tmp_path.glob("x/chunks/chunk_*"))


def test_configs_load():
    for name in ("mnist_robust", "kmnist_robust", "cifar10_robust", "digits_robust"):
        for arg in (None, "smoke"):
            cfg = load_config(name, arg)
            assert cfg.rows and all("name" in r for r in cfg.rows)
    assert load_config("mnist_robust", "l2").attack.norm == "l2"
    assert (REPO / "experiments" / "robust_eval.py").is_file()


def test_dwbox_rows_select_the_randomness_modes_and_keep_the_nfe_accounting():
    from experiments import _common
    from experiments._robust_eval import _nfe, _stronger

    cfg = load_config("mnist_robust", "dwbox")
    rows = {r["name"]: _common.row_config(cfg, r) for r in cfg.rows}
    modes = {n: rc.eval.randomness for n, rc in rows.items()}
    assert modes["ddpm_t0.1_fixed"] == "fixed" and modes["ddim_t0.1_fixed"] == "fixed"
    assert modes["ddpm_t0.1_forward_lock"] == "forward_lock"
    assert "fixed_aa@20" in cfg.eval.protocols

    class Pur:  # nfe bookkeeping only
        nfe, nfe_backward = 10, 30

    lock, stoch = rows["ddpm_t0.1_forward_lock"], rows["ddpm_t0.1_exact"]
    # forward_lock purifies like stochastic: the same attack and scoring NFE
    assert _nfe(lock, Pur()) == _nfe(stoch, Pur())
    assert _nfe(lock, Pur())["scoring_per_image"] == 2 * 20 * 10
    assert _nfe(rows["ddpm_t0.1_fixed"], Pur())["scoring_per_image"] == 2 * 1 * 10
    lock.eval.candidates = (3, 5)  # two attack iterates scored as Fixed-AA candidates
    assert _nfe(lock, Pur())["scoring_per_image"] == 4 * 20 * 10
    # the convergence check's stronger attack draws more EoT samples in forward_lock rows
    assert _stronger(lock, 2).attack.eot_samples == 2 * lock.attack.eot_samples


def test_convergence_check_reruns_a_subset_with_a_stronger_attack(tmp_path):
    cfg = load_config("digits_robust", "smoke")
    cfg.rows = tuple(r for r in cfg.rows if r["name"] == "classifier")
    cfg.eval.convergence.update(factor=3, eot_factor=2, num_images=4)
    (row,) = robust_eval.run(cfg, tmp_path)["rows"]
    conv = row["convergence"]
    assert conv["factor"] == 3 and conv["eot_factor"] == 2 and conv["num_images"] == 4
    # 3x the iterations at the base run's step size; the classifier row is not purified, so
    # its EoT samples stay as they were
    assert conv["attack"]["num_steps"] == 3 * cfg.attack.num_steps
    assert conv["attack"]["eot_samples"] == cfg.attack.eot_samples
    for v in conv["protocols"].values():
        assert v["base"]["num_images"] == v["stronger"]["num_images"] == 4
        assert v["stronger"]["accuracy"] <= v["base"]["accuracy"] + 1e-9  # more iterations
    assert row["self_check"]["mismatches"] == [] and row["self_check"]["agree"] >= 1
    table = (tmp_path / "table.md").read_text()
    check = tmp_path / "classifier" / "convergence_x3_eot_x2"
    assert "x3, EoT x2 on 4" in table and check.is_dir()
    # the check's per-example record reproduces its summary, on the row's first images
    with np.load(check / "per_example.npz") as z:
        assert list(z["index"]) == list(range(4))
        for p, v in conv["protocols"].items():
            assert float(np.mean(z[f"adv@{p}"])) == pytest.approx(v["stronger"]["accuracy"])
    # a rerun that does not ask for the check resumes every chunk and keeps it in the record
    cfg.eval.convergence.factor = None
    (again,) = robust_eval.run(cfg, tmp_path)["rows"]
    assert again["chunks_run"] == 0 and again["convergence"] == conv
    assert "x3, EoT x2 on 4" in (tmp_path / "table.md").read_text()


def test_stronger_attack_config():
    from experiments._robust_eval import _stronger

    cfg = load_config("digits_robust", "smoke")
    st = _stronger(cfg, 4, 2)
    assert st.attack.num_steps == 4 * cfg.attack.num_steps
    assert st.attack.eot_samples == 2 * cfg.attack.eot_samples  # stochastic, purified
    assert st.attack.step_size == 2.5 * cfg.attack.eps / cfg.attack.num_steps
    assert _stronger(cfg, 4).attack.eot_samples == 4 * cfg.attack.eot_samples


def test_only_rows_runs_a_subset_and_keeps_the_other_finished_rows(tmp_path):
    cfg = _two_rows(load_config("digits_robust", "smoke"))
    cfg.only_rows = "classifier"
    first = robust_eval.run(cfg, tmp_path)
    assert [r["name"] for r in first["rows"]] == ["classifier"]
    assert not (tmp_path / "ddpm_exact").exists()  # not run, nothing written
    cfg.only_rows = " ddpm_exact "
    second = robust_eval.run(cfg, tmp_path)
    # both listed, in config order; the classifier row is the first run's record, not rerun
    assert [r["name"] for r in second["rows"]] == ["classifier", "ddpm_exact"]
    assert second["rows"][0] == first["rows"][0]
    assert (tmp_path / "table.md").read_text().count("\n") == 4
    cfg.only_rows = "ddpm_exact,nope"
    with pytest.raises(ValueError, match=r"only_rows: expected names of config.rows .*'nope'"):
        robust_eval.run(cfg, tmp_path)
