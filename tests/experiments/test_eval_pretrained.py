"""experiments/eval_classifier.py with akamaster's pretrained ResNet-20 (smoke: 64 images)."""

import json

from exp_helpers import load_config

from experiments import eval_classifier


def test_resnet20_pretrained_smoke(data_dir, tmp_path):
    cfg = load_config("cifar10_resnet20_pretrained", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = eval_classifier.run(cfg, tmp_path)
    assert res["test"]["num_images"] == 64
    assert res["accuracy"] >= 0.85  # 91.5 % on all 1000 lossless test images
    lo, hi = res["test"]["ci95"]
    assert lo <= res["accuracy"] <= hi
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["manifest"]["config"]["model"]["source"] == "akamaster"
