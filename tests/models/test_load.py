"""jaxrob.models.load: the one way to get a trained model, and its errors."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob
from jaxrob.checkpoint import save_params
from jaxrob.models import Classifier, DiffusionModel, load

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_committed_exports_load_as_ready_models():
    ddpm = load(REPO / "checkpoints" / "digits_ddpm")
    clf = load(REPO / "checkpoints" / "digits_classifier")
    assert isinstance(ddpm, DiffusionModel) and isinstance(clf, Classifier)
    assert ddpm.schedule.num_steps == 1000 and ddpm.num_params == 176849
    x = jnp.full((2, 8, 8, 1), 0.5)
    assert ddpm(x, jnp.array([3, 4])).shape == x.shape
    assert clf(x).shape == (2, 10)
    # the reverse-mode twin has the same parameters and the same values
    fast = jaxrob.models.load(REPO / "checkpoints" / "digits_ddpm", fast_vjp=True)
    assert fast.module.fast_vjp and jax.tree.structure(fast.variables) == jax.tree.structure(
        ddpm.variables)
    np.testing.assert_allclose(fast(x, jnp.array([3, 4])), ddpm(x, jnp.array([3, 4])),
                               atol=1e-5)
    # pytrees: parameters are leaves, the module is static
    leaves = jax.tree.leaves(clf)
    assert leaves and all(isinstance(v, jax.Array) for v in leaves)


def test_bad_paths_and_kinds_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    (tmp_path / "not_an_export").mkdir()
    with pytest.raises(Exception, match="not_an_export"):
        load(tmp_path / "not_an_export")
    with pytest.raises(ValueError, match="expected a 'classifier'"):
        load(REPO / "checkpoints" / "digits_ddpm", kind="classifier")
    with pytest.raises(ValueError, match="kind: expected"):
        load(REPO / "checkpoints" / "digits_ddpm", kind="vae")


def test_metadata_of_another_kind_or_version_is_refused(tmp_path):
    params = {"w": np.ones((2,), np.float32)}
    save_params(tmp_path / "odd", params, {"kind": "vae"})
    with pytest.raises(ValueError, match="export of kind 'vae'"):
        load(tmp_path / "odd")
    save_params(tmp_path / "bad_model", params, {"kind": "ddpm", "model": {"name": "dit"},
                                                 "diffusion": {"schedule": "linear"}})
    with pytest.raises(ValueError, match="does not describe a model"):
        load(tmp_path / "bad_model")
    # an export written by another export format version
    dst = tmp_path / "other_version"
    shutil.copytree(REPO / "checkpoints" / "digits_classifier", dst)
    meta_path = dst / "metadata" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["jaxrob_export_format"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="other_version"):
        load(dst)


def test_new_parameters_reuse_the_attack_compilation():
    from jaxrob.attacks._pgd import _pgd

    clf = load(REPO / "checkpoints" / "digits_classifier")
    other = clf.replace(variables=jax.tree.map(lambda a: a * 1.01, clf.variables))
    x = jr.uniform(jr.key(0), (2, 8, 8, 1))
    y = jnp.array([1, 2])
    jaxrob.attacks.pgd(clf, x, y, jr.key(1), eps=0.1, num_steps=1)
    n = _pgd.cache_size()
    jaxrob.attacks.pgd(other, x, y, jr.key(1), eps=0.1, num_steps=1)
    assert _pgd.cache_size() == n
