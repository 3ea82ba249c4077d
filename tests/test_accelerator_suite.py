"""benchmarks/accelerator_suite.py: its CPU smoke mode writes one complete JSON, and a failing
section is recorded without losing the others."""

import importlib.util
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _suite():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the suite imports _harness from there
    spec = importlib.util.spec_from_file_location("accelerator_suite",
                                                  REPO / "benchmarks" / "accelerator_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_mode_writes_every_section_and_survives_a_failing_one(tmp_path, monkeypatch):
    suite = _suite()

    def broken(self):
        raise RuntimeError("section broken on purpose")

    monkeypatch.setattr(suite.JaxSuite, "env", broken)
    out = tmp_path / "accel.json"
    res = suite.main(["--smoke", "--tiny-model", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["sections"].keys() == set(suite.SECTIONS)
    s = on_disk["sections"]
    assert "section broken on purpose" in s["env"]["error"]  # recorded, the others still ran
    for name in ("unet", "attack", "jacobian"):
        assert "error" not in json.dumps(s[name]), (name, s[name])
    for dtype in ("float32", "bfloat16"):
        for w in ("fwd", "fwd_bwd"):
            assert s["unet"][dtype][w]["s"] > 0 and s["unet"][dtype][w]["compile_s"] > 0
    att = s["attack"]
    for eot in (2, 4):
        assert att[f"eot{eot}"]["finite"] and 0 < att[f"eot{eot}"]["linf"] <= 8 / 255 + 1e-6
    mem = att["xla_temp_bytes_by_steps"]
    assert set(mem) == {"2", "4"} and all(isinstance(v, int) for v in mem.values())
    for steps, full in att["xla_memory_by_steps"].items():  # compiled_memory's fields
        assert full["temp"] == mem[steps] and full["argument"] > 0
        assert full["total"] == full["argument"] + full["output"] + full["temp"] - full["alias"]
    jac = s["jacobian"]
    assert jac["shape"] == [192, 192] and jac["finite"] and jac["dim"] == 192
    assert "skipped" in s["torch"]
    assert res["ratios"]["targets"]["memory_growth_long_over_short"] > 0
    assert set(on_disk["section_s"]) == set(suite.SECTIONS)


def test_bad_arguments_are_refused():
    suite = _suite()
    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--sections", "env,nope", "--out", "/dev/null"])
    with pytest.raises(SystemExit):
        suite.main(["--tiny-model", "--out", "/dev/null"])
