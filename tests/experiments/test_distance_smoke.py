"""experiments/distance_trajectory.py on its smoke config (real code path, random tiny UNet)."""

import numpy as np
from exp_helpers import load_config

from experiments import distance_trajectory


def test_distance_trajectory_smoke(data_dir, tmp_path):
    cfg = load_config("mnist_distance", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = distance_trajectory.run(cfg, tmp_path)
    assert set(res["final"]) == {"clean", "adversarial", "random"}
    clean = res["curves"]["clean"]
    # input + 2 forward + 2 reverse states; the clean input is at distance 0, SSIM 1
    assert len(clean["l2"]["mean"]) == 5
    assert clean["l2"]["mean"][0] == 0 and abs(clean["ssim"]["mean"][0] - 1) < 1e-5
    adv = res["final"]["adversarial"]
    assert 0 < adv["linf"]["input"] <= 0.3 + 1e-6
    assert np.isfinite(adv["l2"]["purified"])
    assert (tmp_path / "trajectory.png").stat().st_size > 0
