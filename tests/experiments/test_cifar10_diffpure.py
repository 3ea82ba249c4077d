"""configs/cifar10_diffpure.py: DiffPure's CIFAR-10 pipeline (score_sde DDPM++ + RobustBench
WRN-28-10), its fields, and the clear errors when the real files are not there."""

import pytest
from exp_helpers import load_config

from experiments import _common


def test_config_is_diffpures_and_missing_files_are_named(tmp_path):
    cfg = load_config("cifar10_diffpure")
    assert cfg.ddpm.source == "score_sde" and cfg.ddpm.use_ema
    assert cfg.ddpm.model.config == "cifar10_ddpmpp_deep_continuous"
    assert (cfg.purifier.sampler, cfg.purifier.t_star, cfg.purifier.num_steps) == ("sde", 0.1,
                                                                                    100)
    assert cfg.classifier.source == "robustbench" and cfg.classifier.depth == 28
    assert load_config("cifar10_diffpure", "autoattack").rows[0]["attack"]["name"] == "autoattack"
    with pytest.raises(ValueError, match="config variant"):
        load_config("cifar10_diffpure", "smok")

    cfg.ddpm.path = str(tmp_path / "checkpoint_8.pth")
    with pytest.raises(FileNotFoundError, match=r"ddpm.path.*checkpoint_8\.pth"):
        _common.load_ddpm(cfg.ddpm, (32, 32, 3))
    cfg.classifier.path = str(tmp_path / "Standard.pt")
    with pytest.raises(FileNotFoundError, match=r"classifier.path.*Standard\.pt"):
        _common.load_classifier(cfg.classifier, cfg.data)


# ~1-2 min on 2 CPU cores (a PGD-EoT attack through the SDE purifier plus the ResNet-20
# compile); the test above covers the config and the loading path, tests/models/test_ncsnpp.py
# the DDPM++ model inside the VP-SDE purifier
@pytest.mark.slow
def test_cifar10_diffpure_smoke(data_dir, tmp_path):
    from experiments import robust_eval

    cfg = load_config("cifar10_diffpure", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = robust_eval.run(cfg, tmp_path)
    (row,) = res["rows"]
    assert res["ddpm"]["model"] == "ncsnpp" and res["ddpm"]["source"] == "random"
    assert row["purifier"]["sampler"] == "sde" and row["purifier"]["nfe_forward"] == 2
    assert row["adv"]["one_shot"]["num_images"] == 8
    assert row["mean_linf"] <= 8 / 255 + 1e-6
