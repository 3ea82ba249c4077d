"""Edit quality: the Frechet distance (FID formula on given features), PSNR, SSIM, the classifier's
penultimate features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import jaxrob.evaluation as je
from jaxrob.models import Classifier, SmallCNN, random_variables


def _feats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d))
    return rng.standard_normal((n, d)) @ mix + shift


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    a, b = _feats(200, 6, 0), _feats(150, 6, 1, shift=0.5)
    scale = float(np.trace(np.cov(a, rowvar=False)))
    assert je.frechet_distance(a, a) <= 1e-9 * scale
    d_ab, d_ba = je.frechet_distance(a, b), je.frechet_distance(b, a)
    assert d_ab > 0.1
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-9)
    # the closed form with scipy's general matrix square root
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    want = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b)
            - 2 * np.trace(covmean))
    np.testing.assert_allclose(d_ab, want, rtol=1e-6)
    # a pure shift of the same set costs exactly its squared length
    v = np.arange(6, dtype=np.float64) / 3.0
    np.testing.assert_allclose(je.frechet_distance(a, a + v), np.sum(v**2), rtol=1e-6)


def test_fid_on_given_features_and_on_the_classifier_penultimate_layer():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (12, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(0, 1, (9, 8, 8, 1)), jnp.float32)
    flat = lambda v: v.reshape(v.shape[0], -1)[:, :5]
    assert je.fid(flat, x, x, batch_size=5) <= 1e-9
    np.testing.assert_allclose(je.fid(flat, x, y), je.fid(flat, y, x), rtol=1e-9)
    module = SmallCNN(num_classes=10, features=(4,), hidden=6)
    clf = Classifier(module, random_variables(module, x[:1], seed=0))
    feature_fn = je.classifier_features(clf)
    f = feature_fn(x)
    assert f.shape == (12, 6) and float(f.min()) >= 0.0  # after the hidden layer's ReLU
    out = clf.variables["params"]["out"]
    np.testing.assert_allclose(np.asarray(f @ out["kernel"] + out["bias"][None, :]),
                               np.asarray(jax.jit(clf)(x)), rtol=1e-5, atol=1e-5)
    assert je.fid(feature_fn, x, x) <= 1e-9


def test_psnr_ssim_and_edit_quality():
    x = jnp.zeros((2, 12, 12, 1), jnp.float32)
    y = x + 0.1
    np.testing.assert_allclose(np.asarray(je.psnr(x, y)), 20.0, rtol=1e-5)
    assert np.all(np.isinf(np.asarray(je.psnr(x, x))))
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.uniform(0, 1, (4, 12, 12, 1)), jnp.float32)
    same = je.edit_quality(a, a)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5) and same["psnr"] == 100.0
    assert same["fid"] is None
    noisy = jnp.clip(a + 0.2 * jnp.asarray(rng.standard_normal(a.shape), jnp.float32), 0, 1)
    q = je.edit_quality(noisy, a, feature_fn=lambda v: v.reshape(v.shape[0], -1)[:, :3])
    assert q["ssim"] < 0.95 and q["psnr"] < 20.0 and q["fid"] > 0.0
    assert len(q["ssim_per_example"]) == 4


def test_bad_edit_quality_inputs_raise():
    a = _feats(10, 3, 0)
    with pytest.raises(ValueError, match="feature dimension"):
        je.frechet_distance(a, _feats(10, 4, 1))
    with pytest.raises(ValueError, match="at least 2"):
        je.frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="features_a"):
        je.frechet_distance(a[:, 0], a)
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)
    with pytest.raises(ValueError, match="same size"):
        je.fid(lambda v: v, x, jnp.zeros((2, 6, 6, 1), jnp.float32))
    with pytest.raises(ValueError, match="x_ref"):
        je.edit_quality(x, x[:1])
    with pytest.raises(ValueError, match="x, y"):
        je.psnr(x, x[:1])
