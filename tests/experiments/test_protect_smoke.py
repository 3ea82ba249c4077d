"""experiments/protect_eval.py on its smoke config (real code path, random tiny UNet)."""

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import protect_eval


@pytest.mark.slow  # ~3 min on the loaded 2-core CPU: a compilation per protection, edit and rerun
def test_protect_eval_smoke(data_dir, tmp_path):
    cfg = load_config("mnist_protect", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = protect_eval.run(cfg, tmp_path)
    table = res["table"]
    assert set(table) == {f"{m}/{p}" for m in cfg.study.methods for p in cfg.purify.methods}
    clean = table["none/none"]
    assert clean["fid"] <= 1e-6 and clean["ssim"] == pytest.approx(1.0, abs=1e-5)
    for row in table.values():
        assert row["linf"] <= cfg.study.eps + 1e-6 and np.isfinite(row["ssim"])
    assert table["advdm/none"]["linf"] > 0
    assert res["adaptive"]["linf"] <= cfg.study.eps + 1e-6
    assert (tmp_path / "results.json").stat().st_size > 0
    # rerun: every chunk is found in the store, nothing recomputed, the same table
    again = protect_eval.run(cfg, tmp_path)
    assert again["table"] == table


def test_protect_eval_bad_ldm_source(tmp_path):
    cfg = load_config("mnist_protect", "smoke")
    cfg.ldm.source = "kl_autoencoder"
    with pytest.raises(ValueError, match="ldm.source"):
        protect_eval.load_ldm(cfg.ldm, None)
