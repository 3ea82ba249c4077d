"""configs/addt_robust.py and experiments/addt_table.py: the ADDT robustness table.

The config: its arg grammar, the exports it points at, rows that robust_eval accepts. The table:
on synthetic run directories whose per-example scores are known, every cell and every paired
difference equals the numbers computed directly, and runs that are not comparable are refused.
"""

import json
import pathlib

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import _common, addt_table
from jaxrob.evaluation import check_randomness

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_config_default_is_the_digits_base_run():
    assert load_config("addt_robust", None).ddpm.path == "checkpoints/digits_ddpm"
    assert load_config("addt_robust", "smoke").ddpm.source == "random"


@pytest.mark.parametrize("arg", ["digits", "addt", "digits,addt,l1", "cifar10,addt",
                                 "digits,addt,smoke,smoke", "digits,base,addt"])
def test_config_rejects_bad_args(arg):
    with pytest.raises(ValueError, match="<dataset>,<model>"):
        load_config("addt_robust", arg)


@pytest.mark.parametrize("model", ["base", "addt", "no_rbgm", "no_cgpo"])
def test_config_points_at_committed_digits_exports(model):
    cfg = load_config("addt_robust", f"digits,{model}")
    assert (REPO / cfg.ddpm.path / "metadata.json").is_file() or (REPO / cfg.ddpm.path).is_dir()
    assert cfg.classifier.path == "checkpoints/digits_classifier"
    assert cfg.attack.norm == "linf" and cfg.attack.eps == pytest.approx(0.2)
    assert cfg.addt_table.to_dict() == {"dataset": "digits", "model": model}
    l2 = load_config("addt_robust", f"digits,{model},l2")
    assert l2.attack.norm == "l2" and l2.ddpm.path == cfg.ddpm.path


def test_config_rows_are_the_papers_settings():
    cfg = load_config("addt_robust", "mnist,addt")
    assert cfg.ddpm.path == "checkpoints/mnist_addt" and cfg.data.test_split == "test[:256]"
    names = [r["name"] for r in cfg.rows]
    assert names[0] == "classifier"
    for sampler in ("ddpm", "ddim"):
        for t in ("0.1", "0.2"):
            assert f"{sampler}_t{t}_stochastic" in names and f"{sampler}_t{t}_dwbox" in names
            # DDIM with eta 0 draws no reverse noise: forward_lock would equal the DW-box
            assert (f"{sampler}_t{t}_forward_lock" in names) == (sampler == "ddpm")
    for r in cfg.rows:
        rc = _common.row_config(cfg, r)
        check_randomness(rc.eval.randomness)
        if rc.eval.randomness == "fixed":
            assert rc.attack.eot_samples == 1
        assert tuple(rc.eval.protocols) == ("one_shot", "worst_of@10", "fixed_aa@20")


# ----------------------------------------------------------------------------- the table


def _summary(scores: np.ndarray) -> dict:
    return {"accuracy": float(scores.mean()), "ci95": [0.0, 1.0],
            "num_images": int(scores.size)}


def _write_run(root: pathlib.Path, model: str, scores: dict, *, steps: int = 10,
               n: int = 6) -> pathlib.Path:
    """A finished addt_robust run with per-example scores ``scores[row][protocol]``; its config
    arg names the base model, its ``ddpm.path`` the model (the table labels by the path)."""
    wd = root / model
    wd.mkdir(parents=True)
    path = "checkpoints/digits_" + ("ddpm" if model == "base" else
                                    "addt" + ("" if model == "addt" else f"_{model}"))
    cfg = {"addt_table": {"dataset": "digits", "model": "base"}, "ddpm": {"path": path},
           "attack": {"name": "pgd", "norm": "linf", "eps": 0.2, "num_steps": steps,
                      "eot_samples": 4, "loss": "ce"},
           "data": {"test_split": "test"}}
    cfg["rows"] = [{"name": name} for name in scores]
    (wd / "config.json").write_text(json.dumps(cfg))
    for name, per in scores.items():
        (wd / name).mkdir()
        np.savez(wd / name / "per_example.npz", index=np.arange(n),
                 **{f"adv@{p}": v for p, v in per.items()},
                 **{f"clean@{p}": np.ones(n, np.float32) for p in per})
        (wd / name / "results.json").write_text(json.dumps(
            {"name": name, "num_images": n, "wall_s": 1.0,
             "clean": {p: _summary(np.ones(n)) for p in per},
             "adv": {p: _summary(v) for p, v in per.items()}}))
    return wd


def _scores(rng, n=6):
    protos = ("one_shot", "worst_of@10", "fixed_aa@20")
    out = {"classifier": {p: np.zeros(n, np.float32) for p in protos}}
    for s in ("ddpm_t0.1_stochastic", "ddpm_t0.1_dwbox"):
        out[s] = {"one_shot": rng.integers(0, 2, n).astype(np.float32),
                  "worst_of@10": rng.integers(0, 2, n).astype(np.float32),
                  "fixed_aa@20": rng.integers(0, 21, n).astype(np.float32) / 20}
    return out


def test_table_cells_and_paired_differences(tmp_path):
    rng = np.random.default_rng(0)
    runs = {m: _scores(rng) for m in ("base", "addt", "no_cgpo")}
    dirs = [_write_run(tmp_path, m, s) for m, s in runs.items()]
    md = addt_table.format_tables([addt_table.load_run(d) for d in dirs])
    acc = runs["addt"]["ddpm_t0.1_stochastic"]["one_shot"].mean()
    assert f"| DDPM t*=0.1 stochastic | ADDT | 100.0 [0.0, 100.0] | {100 * acc:.1f} [0.0, " in md
    # claim 2: ADDT - base, one-shot, stochastic -- the mean of the paired differences
    d = (runs["addt"]["ddpm_t0.1_stochastic"]["one_shot"]
         - runs["base"]["ddpm_t0.1_stochastic"]["one_shot"]).mean()
    m, lo, hi = addt_table.paired_diff(runs["addt"]["ddpm_t0.1_stochastic"]["one_shot"],
                                       runs["base"]["ddpm_t0.1_stochastic"]["one_shot"])
    assert m == pytest.approx(100 * d) and lo <= m <= hi
    assert f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" in md
    # claim 1: stochastic - DW-box of the control, Fixed-AA
    f = (runs["no_cgpo"]["ddpm_t0.1_stochastic"]["fixed_aa@20"]
         - runs["no_cgpo"]["ddpm_t0.1_dwbox"]["fixed_aa@20"]).mean()
    assert f"{100 * f:+.1f} [" in md
    assert "ADDT - control (w/o CGPO)" in md


def test_paired_diff_of_identical_scores_is_exactly_zero():
    a = np.array([1, 0, 1, 1], np.float32)
    assert addt_table.paired_diff(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal-length"):
        addt_table.paired_diff(a, a[:3])


def test_table_refuses_runs_that_are_not_comparable(tmp_path):
    rng = np.random.default_rng(1)
    a = _write_run(tmp_path / "a", "base", _scores(rng))
    b = _write_run(tmp_path / "b", "addt", _scores(rng), steps=40)
    with pytest.raises(ValueError, match="attack .* differs"):
        addt_table.format_tables([addt_table.load_run(a), addt_table.load_run(b)])
    c = _write_run(tmp_path / "c", "base", _scores(rng))
    with pytest.raises(ValueError, match="more than one run of the same model"):
        addt_table.format_tables([addt_table.load_run(a), addt_table.load_run(c)])
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        addt_table.load_run(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(
        {"addt_table": {"dataset": "digits", "model": "base"}, "rows": [{"name": "x"}]}))
    with pytest.raises(FileNotFoundError, match="no finished row"):
        addt_table.load_run(tmp_path / "d")


def test_a_cut_run_contributes_its_finished_rows(tmp_path):
    rng = np.random.default_rng(2)
    a = _write_run(tmp_path, "base", _scores(rng))
    cfg = json.loads((a / "config.json").read_text())
    cfg["rows"].append({"name": "ddim_t0.1_stochastic"})  # listed, never finished
    (a / "config.json").write_text(json.dumps(cfg))
    run = addt_table.load_run(a)
    assert list(run["rows"]) == ["classifier", "ddpm_t0.1_stochastic", "ddpm_t0.1_dwbox"]
    assert run["wall_s"] == 3.0


def test_the_convergence_checks_of_the_rows_are_listed(tmp_path):
    rng = np.random.default_rng(3)
    a = _write_run(tmp_path, "base", _scores(rng))
    md = addt_table.format_tables([addt_table.load_run(a)])
    assert "**Convergence**" not in md  # no row carries a check
    res = json.loads((a / "ddpm_t0.1_dwbox" / "results.json").read_text())
    res["attack"] = {"num_steps": 10, "eot_samples": 1}
    res["convergence"] = {
        "num_images": 4, "converged": False, "attack": {"num_steps": 40, "eot_samples": 1},
        "protocols": {"one_shot": {"base": {"accuracy": 0.5, "ci95": [0.15, 0.85]},
                                   "stronger": {"accuracy": 0.0, "ci95": [0.0, 0.49]}}}}
    (a / "ddpm_t0.1_dwbox" / "results.json").write_text(json.dumps(res))
    md = addt_table.format_tables([addt_table.load_run(a)])
    assert ("| DDPM t*=0.1 DW-box | base DDPM | 4 | x10 EoT 1 -> x40 EoT 1 | "
            "50.0 [15.0, 85.0] -> 0.0 [0.0, 49.0] | - | **no** |") in md


def _write_check(run: pathlib.Path, row: str, pred_adv, pred_clean, labels, *, recorded=None):
    """A finished convergence check of ``row``: its chunk records and its summary."""
    from jaxrob.evaluation import ChunkStore

    n = pred_adv.shape[0]
    ChunkStore(run / row / "convergence_x4" / "chunks", write=True).save(
        0, n, index=np.arange(n), pred_adv=pred_adv, pred_clean=pred_clean)
    with np.load(run / row / "per_example.npz") as z:
        arrays = dict(z)
    arrays["label"] = labels
    np.savez(run / row / "per_example.npz", **arrays)
    res = json.loads((run / row / "results.json").read_text())
    acc = float(np.mean(pred_adv[:, 0] == labels[:n])) if recorded is None else recorded
    res.update(attack={"num_steps": 10, "eot_samples": 4}, randomness="stochastic",
               convergence={"factor": 4, "eot_factor": 4, "num_images": n, "converged": True,
                            "attack": {"num_steps": 40, "eot_samples": 16},
                            "protocols": {"one_shot": {
                                "base": {"accuracy": acc, "ci95": [0.0, 1.0]},
                                "stronger": {"accuracy": acc, "ci95": [0.0, 1.0]}}}})
    (run / row / "results.json").write_text(json.dumps(res))


def test_claim_2_under_the_stronger_attack_is_paired_on_the_checks_records(tmp_path):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 10, 6)
    runs, adv = [], {}
    for m in ("base", "addt"):
        wd = _write_run(tmp_path, m, _scores(rng))
        # 20 purifications of the attacked and the clean input per image, mostly correct
        adv[m] = np.where(rng.random((4, 20)) < 0.6, labels[:4, None], (labels[:4, None] + 1) % 10)
        clean = np.repeat(labels[:4, None], 20, axis=1)
        _write_check(wd, "ddpm_t0.1_stochastic", adv[m], clean, labels)
        runs.append(wd)
    md = addt_table.format_tables([addt_table.load_run(d) for d in runs])
    one = addt_table.paired_diff(adv["addt"][:, 0] == labels[:4], adv["base"][:, 0] == labels[:4])
    faa = addt_table.paired_diff((adv["addt"] == labels[:4, None]).mean(1),
                                 (adv["base"] == labels[:4, None]).mean(1))
    cell = [f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" + ("" if lo <= 0 <= hi else " *")
            for m, lo, hi in (one, faa)]
    assert (f"| DDPM t*=0.1 stochastic | ADDT - base DDPM | 4 | {cell[0]} | {cell[1]} |") in md
    # records that do not reproduce the check's own summary are refused
    _write_check(runs[1], "ddpm_t0.1_stochastic", adv["addt"], adv["addt"], labels,
                 recorded=0.123)
    with pytest.raises(ValueError, match="differs from the check's recorded"):
        addt_table.load_run(runs[1])


def test_a_checks_per_example_record_is_read_in_place_of_its_chunks(tmp_path):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, 6)
    runs, faa = [], {}
    for m in ("base", "addt"):
        wd = _write_run(tmp_path, m, _scores(rng))
        _write_check(wd, "ddpm_t0.1_stochastic", np.repeat(labels[:4, None], 20, axis=1),
                     np.repeat(labels[:4, None], 20, axis=1), labels)
        # robust_eval's own record of the check: every protocol, no chunks needed
        check = wd / "ddpm_t0.1_stochastic" / "convergence_x4"
        faa[m] = rng.integers(0, 21, 4) / 20
        one = (faa[m] > 0.5).astype(np.float64)
        np.savez(check / "per_example.npz", index=np.arange(4), **{
            "adv@one_shot": one, "adv@worst_of@10": one, "adv@fixed_aa@20": faa[m]})
        for d in (check / "chunks").iterdir():
            d.unlink() if d.is_file() else None
        res = json.loads((wd / "ddpm_t0.1_stochastic" / "results.json").read_text())
        res["convergence"]["protocols"] = {
            p: {"base": {"accuracy": 1.0, "ci95": [0.0, 1.0]},
                "stronger": {"accuracy": float(np.mean(v)), "ci95": [0.0, 1.0]}}
            for p, v in (("one_shot", one), ("fixed_aa@20", faa[m]))}
        (wd / "ddpm_t0.1_stochastic" / "results.json").write_text(json.dumps(res))
        runs.append(wd)
    run = addt_table.load_run(runs[1])
    assert set(run["rows"]["ddpm_t0.1_stochastic"]["conv_scores"]) == {
        "index", "adv@one_shot", "adv@worst_of@10", "adv@fixed_aa@20"}
    md = addt_table.format_tables([addt_table.load_run(d) for d in runs])
    m_, lo, hi = addt_table.paired_diff(faa["addt"], faa["base"])
    assert f"{m_:+.1f} [{lo:+.1f}, {hi:+.1f}]" in md.split("under the stronger attack")[1]
    # a record that does not reproduce the check's summary is refused
    np.savez(runs[1] / "ddpm_t0.1_stochastic" / "convergence_x4" / "per_example.npz",
             index=np.arange(4), **{"adv@fixed_aa@20": 1.0 - faa["addt"]})
    with pytest.raises(ValueError, match="per_example.npz: adv@fixed_aa@20"):
        addt_table.load_run(runs[1])


def _acc(a: float) -> dict:
    return {"accuracy": a, "ci95": [max(a - 0.2, 0.0), min(a + 0.2, 1.0)], "num_images": 4}


def test_the_soundness_checks_of_the_rows_are_listed(tmp_path):
    rng = np.random.default_rng(6)
    runs = [_write_run(tmp_path, m, _scores(rng)) for m in ("base", "addt")]
    md = addt_table.format_tables([addt_table.load_run(d) for d in runs])
    assert "**Soundness**" not in md  # no row carries the checks
    checks = {"large_eps": {"verdict": "pass", "eps": 0.5, "adv": _acc(0.0)},
              "gradient_free": {"verdict": "inconclusive", "queries": 1000,
                                "square": _acc(0.25)},
              "transfer": {"verdict": "pass", "transfer": _acc(0.75)},
              "iterations": {"verdict": "fail", "stronger": _acc(0.0), "num_steps": 40,
                             "eot_samples": 16},
              "flags": {"verdict": "pass"}}
    for run in runs:  # the classifier row of both runs: listed once
        for row, sound in (("classifier", {"verdict": "pass", "checks": {
                "large_eps": checks["large_eps"], "flags": checks["flags"]}}),
                ("ddpm_t0.1_stochastic", {"verdict": "fail", "checks": checks})):
            res = json.loads((run / row / "results.json").read_text())
            res["soundness"] = {**sound, "num_images": 4, "base": {"adv": _acc(0.5)}}
            (run / row / "results.json").write_text(json.dumps(res))
    md = addt_table.format_tables([addt_table.load_run(d) for d in runs])
    assert "Square (1000 queries" in md and "at eps 0.5 (pass" in md
    assert md.count("| classifier alone | - | 4 | 50.0 [30.0, 70.0] | 0.0 pass | - | - | - | "
                    "pass | pass |") == 1
    for model in ("base DDPM", "ADDT"):
        assert (f"| DDPM t*=0.1 stochastic | {model} | 4 | 50.0 [30.0, 70.0] | 0.0 pass | "
                f"25.0 inconcl. | 75.0 pass | 0.0 (x40 EoT 16) **fail** | pass | **fail** |"
                ) in md
