"""experiments/protect_eval.py: the smoke run (slow), the real LDM's codec, the tables."""

import jax
import numpy as np
import pytest
from exp_helpers import load_config

from experiments import protect_eval, protect_table


@pytest.mark.slow  # minutes on the loaded 2-core CPU: a compilation per protection, edit and rerun;
# the cheap tests below cover the codec wiring, the amplification and the tables
def test_protect_eval_smoke(data_dir, tmp_path):
    cfg = load_config("mnist_protect", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = protect_eval.run(cfg, tmp_path)
    rows = {(r["method"], r["eps_name"], r["pipeline"]): r for r in res["rows"]}
    pipes = set(cfg.purify.pipelines)
    assert {k[2] for k in rows} == pipes
    for pipe in ("ldm", "pdm"):  # the clean edit scored against itself
        clean = rows[("none", "0", pipe)]
        assert clean["fid"] <= 1e-6 and clean["ssim"] == pytest.approx(1.0, abs=1e-5)
    for r in res["rows"]:
        assert r["linf"] <= r["eps"] + 1e-6 and np.isfinite(r["ssim"])
    assert rows[("advdm", "8/255", "ldm")]["linf"] > 0
    assert ("pdm_sdedit", "8/255", "ldm") not in rows  # heavy methods: heavy_eps only
    assert ("adaptive", "32/255", "pdm_pure") in rows
    assert {(a["method"], a["eps_name"]) for a in res["amplification"]} == {
        (m, e) for m, e, _ in rows if m != "none"}
    assert (tmp_path / "results.json").stat().st_size > 0
    # rerun: every chunk is found in the store, nothing recomputed, the same rows
    again = protect_eval.run(cfg, tmp_path)
    assert again["rows"] == res["rows"]
    assert "| AdvDM | 8/255 |" in protect_table.format_tables(res)


def test_protect_eval_bad_ldm_source(tmp_path):
    cfg = load_config("mnist_protect", "smoke")
    cfg.ldm.source = "kl_autoencoder"
    with pytest.raises(ValueError, match="ldm.source"):
        protect_eval.load_ldm(cfg.ldm, None)


def test_mnist_ldm_codec_shapes():
    """The default LDM is the committed export; its codec maps pixels to the scaled 7x7x4 codes
    its latent DDPM runs on, and back (shapes only: no compilation)."""
    cfg = load_config("mnist_protect")
    assert cfg.ldm.source == "mnist_ldm"
    enc, dec, eps_model, info = protect_eval.load_ldm(cfg.ldm, None)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), np.float32)
    z = jax.eval_shape(enc, x)
    assert z.shape == (2, *info["latent_shape"]) == (2, 7, 7, 4)
    assert jax.eval_shape(dec, z).shape == x.shape
    step = jax.ShapeDtypeStruct((2,), np.int32)
    assert jax.eval_shape(eps_model, z, step).shape == z.shape
    assert jax.tree.leaves(enc) and jax.tree.leaves(dec)  # parameters are traced leaves


def test_amplification_ratios():
    rec = {"pixel": np.array([1.0, 2.0, 0.0]), "latent": np.array([3.0, 8.0, 0.0]),
           "pixel_random": np.array([1.0, 2.0, 0.0]),
           "latent_random": np.array([1.0, 2.0, 0.0])}
    a = protect_eval._amplification(rec)  # the unmoved example is left out of the ratios
    assert a["ratio"] == pytest.approx(3.5) and a["ratio_random"] == pytest.approx(1.0)
    assert a["amplification"] == pytest.approx(3.5)


def test_format_tables():
    row = dict(fid=1.0, ssim=0.5, psnr=20.0, accuracy=0.75)
    res = {"num_images": 4, "clean_accuracy": 1.0,
           "rows": [{"method": m, "eps_name": e, "pipeline": p, **row}
                    for m, e in (("none", "0"), ("mist", "16/255"))
                    for p in ("ldm", "pdm", "pdm_pure", "jpeg", "crop")],
           "amplification": [{"method": "mist", "eps_name": "16/255", "pixel_l2": 1.0,
                              "latent_l2": 2.0, "ratio": 2.0, "ratio_random": 1.0,
                              "amplification": 2.0}]}
    md = protect_table.format_tables(res)
    assert "| Mist | 16/255 | 1.0 / 0.50 / 20.0 / 0.75 |" in md
    assert "| Mist | 16/255 | 1.00 | 2.00 | 2.00 | 1.00 | 2.00 |" in md
    assert "not Inception" in md
