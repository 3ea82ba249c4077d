"""experiments/train_ldm.py on MNIST: both stages' smoke configs (a tiny autoencoder, then a tiny
latent UNet on its codes) write exports that ``jaxrob.models.load`` builds in one call, and bad
input (an image size the autoencoder cannot halve evenly, a UNet that does not take the codes)
is refused before any work."""

import jax
import numpy as np
import pytest
from exp_helpers import load_config

import jaxrob
from experiments import train_ldm
from jaxrob.checkpoint import export_checksum, load_params, read_metadata
from jaxrob.models import Autoencoder, LatentDiffusionModel
from jaxrob.training import read_metrics

# both stages train, encode, sample and export: ~15 compilations, over a minute of CPU
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    del data_dir  # MNIST must be there
    vae_wd = tmp_path_factory.mktemp("vae")
    vae = train_ldm.run(load_config("mnist_vae", "smoke"), vae_wd)
    cfg = load_config("mnist_ldm", "smoke")
    cfg.autoencoder.path = str(vae_wd / "export")
    ldm_wd = tmp_path_factory.mktemp("ldm")
    return vae_wd, vae, ldm_wd, train_ldm.run(cfg, ldm_wd)


def test_autoencoder_stage_writes_a_loadable_export(smoke):
    wd, res, _, _ = smoke
    ae = jaxrob.models.load(wd / "export")
    meta = read_metadata(wd / "export")
    assert isinstance(ae, Autoencoder) and meta["kind"] == "autoencoder"
    assert meta["autoencoder"]["scaling_factor"] == pytest.approx(res["scaling_factor"])
    assert float(ae.scaling_factor) == pytest.approx(res["scaling_factor"])
    assert res["scaling_factor"] > 0
    assert ae.latent_shape((28, 28, 1)) == (7, 7, 4) and res["code_shape"] == [7, 7, 4]
    rec = res["reconstruction"]
    assert rec["num_images"] == 16 and 0 < rec["mse"] < 1 and np.isfinite(rec["psnr"])
    assert rec["psnr_of_mse"] == pytest.approx(10 * np.log10(1 / rec["mse"]))
    recs = read_metrics(wd)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["kl"] >= 0 and r["recon"] > 0 for r in recs)
    assert (wd / "reconstructions.png").is_file()
    assert res["manifest"]["devices"]["count"] == 8


def test_ldm_stage_writes_one_export_with_both_networks(smoke):
    vae_wd, _, wd, res = smoke
    ldm = jaxrob.models.load(wd / "export", kind="ldm")
    assert isinstance(ldm, LatentDiffusionModel) and ldm.latent_shape == (7, 7, 4)
    meta = read_metadata(wd / "export")
    assert meta["autoencoder_export"]["checksum"] == export_checksum(vae_wd / "export")
    assert meta["data"]["code_shape"] == [7, 7, 4] and meta["step"] == 3
    # the autoencoder inside is the stage-1 export, bit for bit
    ae_params, _ = load_params(vae_wd / "export")
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(ldm.autoencoder.variables), ae_params)
    assert float(ldm.autoencoder.scaling_factor) == pytest.approx(
        read_metadata(vae_wd / "export")["autoencoder"]["scaling_factor"])
    codes = res["codes"]
    assert codes["num_images"] == 64 and codes["posterior_std_rms"] > 0
    assert res["samples"]["count"] == 4 and (wd / "samples.png").is_file()
    with np.load(wd / "samples.npz") as f:
        x = f["samples"]
    assert x.shape == (4, 28, 28, 1) and 0 <= x.min() and x.max() <= 1
    assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3]


def test_bad_input_is_refused_before_any_work(smoke, tmp_path):
    vae_wd = smoke[0]
    cfg = load_config("mnist_vae", "smoke")
    cfg.autoencoder.overrides.block_out_channels = (4, 8, 8, 8)  # f = 8: 28 is not divisible
    with pytest.raises(ValueError, match=r"divisible by .* = 8"):
        train_ldm.run(cfg, tmp_path / "vae")
    cfg = load_config("mnist_ldm", "smoke")
    cfg.autoencoder.path = str(vae_wd / "export")
    cfg.model.config = "mnist"  # the pixel UNet: 28x28x1 inputs
    with pytest.raises(ValueError, match="7x7x4 latent codes.*takes 1-channel inputs"):
        train_ldm.run(cfg, tmp_path / "ldm")
    cfg = load_config("mnist_ldm", "smoke")
    cfg.autoencoder.path = str(smoke[2] / "export")  # an 'ldm' export, not an autoencoder
    with pytest.raises(ValueError, match="expected a 'autoencoder'"):
        train_ldm.run(cfg, tmp_path / "ldm2")
    cfg.stage = "vae"
    with pytest.raises(ValueError, match="stage: expected"):
        train_ldm.run(cfg, tmp_path / "ldm3")
    for name in ("vae", "ldm", "ldm2", "ldm3"):
        assert not (tmp_path / name / "checkpoints").exists()
