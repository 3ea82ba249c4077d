"""experiments/randomness_study.py on its smoke config (real code path, random tiny UNet)."""

import json

import numpy as np
from exp_helpers import load_config

from experiments import randomness_study


def test_randomness_study_smoke(data_dir, tmp_path):
    cfg = load_config("mnist_randomness", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = randomness_study.run(cfg, tmp_path)
    s = res["summary"]
    assert set(s) == {"fixed_noise", "fixed_input", "both"}
    for mode in s.values():
        assert -1.0 <= mode["mean_correlation"]["mean"] <= 1.0
        assert mode["radius"]["mean"] >= 0
    assert res["input_radius"] > 0 and res["num_images"] == 2
    per = np.load(tmp_path / "per_example.npz")
    assert per["fixed_noise_mean_correlation"].shape == (2,)
    assert (tmp_path / "randomness.png").stat().st_size > 0
    m = json.loads((tmp_path / "results.json").read_text())["manifest"]
    assert m["indices"] == [0, 2]
