"""experiments/train_diffusion.py on the CIFAR-10 DDPM smoke config (tiny UNet, RGB 32x32)."""

import json

import numpy as np
import pytest
from exp_helpers import load_config

from experiments import train_diffusion
from jaxrob.checkpoint import load_params


@pytest.mark.slow  # the digits / MNIST smoke tests run the same code path in CI
def test_cifar10_ddpm_smoke(data_dir, tmp_path):
    cfg = load_config("cifar10_ddpm", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = train_diffusion.run(cfg, tmp_path)
    assert res["train"]["num_steps"] == 3 and res["train"]["batch_size"] == 16
    assert set(res["denoising"]) == {"t_star=0.1", "t_star=0.3"}
    assert np.load(tmp_path / "samples.npz")["samples"].shape == (4, 32, 32, 3)
    params, meta = load_params(tmp_path / "export")
    assert meta["model"]["config"] == "cifar10" and meta["data"]["image_shape"] == [32, 32, 3]
    assert "params" in params
    assert json.loads((tmp_path / "results.json").read_text())["manifest"]["seeds"]["seed"] == 0
