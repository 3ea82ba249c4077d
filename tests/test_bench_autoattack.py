"""benchmarks/bench_autoattack.py: its argument checks, its side-by-side bookkeeping (which
component broke each example, the agreement counts) and, where the original PyTorch AutoAttack
checkout is on this machine, its smoke mode end to end."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# the checkouts the benchmark takes (not dependencies of jaxrob; see the benchmark's docstring)
REFERENCE = pathlib.Path(os.environ.get("JAXROB_AUTOATTACK_REFERENCE",
                                        REPO.parent / "ext" / "auto-attack"))
RESNET = pathlib.Path(os.environ.get("JAXROB_AKAMASTER_RESNET",
                                     REPO.parent / "ext" / "pytorch_resnet_cifar10"))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_autoattack",
                                                  REPO / "benchmarks" / "bench_autoattack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_checkouts_name_their_flag(tmp_path):
    bench = _bench()
    with pytest.raises(ValueError, match="--reference-path"):
        bench.parse_args(["--smoke"])
    with pytest.raises(ValueError, match="--reference-path.*fra31/auto-attack"):
        bench.parse_args(["--reference-path", str(tmp_path)])
    ref = tmp_path / "aa"
    (ref / "autoattack").mkdir(parents=True)
    (ref / "autoattack" / "autoattack.py").write_text("")
    with pytest.raises(ValueError, match="--resnet-path.*pytorch_resnet_cifar10"):
        bench.parse_args(["--reference-path", str(ref), "--resnet-path", str(tmp_path)])
    with pytest.raises(ValueError, match="--n"):
        bench.parse_args(["--sides", "jax", "--n", "1001"])
    a = bench.parse_args(["--sides", "jax", "--smoke"])  # one side: no checkouts needed
    assert (a.n, a.n_iter, a.n_queries) == (16, 5, 50)


def _side(flags_by_stage, wall, **extra):
    stages = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    robust_after = {s: list(map(bool, f)) for s, f in zip(stages, flags_by_stage, strict=True)}
    return {"robust_after": robust_after, "wall_s": wall,
            "robust_accuracy": float(np.mean(flags_by_stage[-1])),
            "clean_logits": np.eye(10)[[0, 1, 2, 3]], **extra}


def test_compare_counts_components_and_disagreements():
    bench = _bench()
    # 4 examples: 0 misclassified, 1 broken by APGD-CE, 2 by Square (jax) / robust (torch),
    # 3 robust on both sides
    jx = _side([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], 10.0,
               wall_s_excl_compile=5.0)
    tc = _side([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], 20.0)
    c = bench.compare(jx, tc, np.array([1, 1, 2, 3]))
    assert c["ratio_torch_over_jax"] == 2.0 and c["ratio_torch_over_jax_excl_compile"] == 4.0
    assert c["robust_agree"] == 3 and c["broken_by_agree"] == 3 and c["n"] == 4
    assert c["robust_disagree_ids"] == [2]
    assert c["robust_disagree_broken_by"] == {"jax": ["square"], "torch": ["robust"]}
    assert c["broken_by_counts"]["jax"] == {"clean": 1, "apgd-ce": 1, "apgd-t": 0, "fab-t": 0,
                                            "square": 1, "robust": 1}
    assert c["robust_accuracy_diff_points"] == pytest.approx(-25.0)
    assert c["clean_prediction_agree"] == 4 and c["clean_logits_max_abs_diff"] == 0.0


@pytest.mark.torch
@pytest.mark.slow  # ~1-2 min of XLA compiles (4 attacks x 2 buckets on a ResNet-20) and the
# original's run; the argument checks and the bookkeeping above are the cheap tests
@pytest.mark.skipif(not (REFERENCE / "autoattack" / "autoattack.py").is_file()
                    or not (RESNET / "resnet.py").is_file(),
                    reason="no fra31/auto-attack or akamaster checkout (see the benchmark)")
def test_smoke_runs_both_sides(tmp_path):
    pytest.importorskip("torch")
    bench = _bench()
    out = tmp_path / "aa.json"
    res = bench.main(["--smoke", "--reference-path", str(REFERENCE), "--resnet-path",
                      str(RESNET), "--out", str(out)])
    assert out.is_file() and out.with_suffix(".txt").is_file()
    c = res["compare"]
    assert c["n"] == 16 and c["clean_prediction_agree"] == 16  # same weights, same images
    assert c["clean_logits_max_abs_diff"] < 1e-3
    for side in ("jax", "torch"):
        s = res[side]
        assert s["x_adv_max_linf"] <= 8 / 255 + 1e-6
        assert 0.0 <= s["x_adv_range"][0] and s["x_adv_range"][1] <= 1.0
        acc = [s["accuracy"][k] for k in ("clean", "apgd-ce", "apgd-t", "fab-t", "square")]
        assert acc == sorted(acc, reverse=True)  # the running robust accuracy never rises
    assert res["jax"]["wall_s"] > res["jax"]["wall_s_excl_compile"] > 0
