"""Classifier train step: BatchNorm over the global batch, sharding invariance, accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_fixtures import TinyBNClassifier, synthetic_batch

from jaxrob import training as jt
from jaxrob.models import Classifier
from jaxrob.parallel import make_mesh, shard_batch


def _setup(num_devices):
    mesh = make_mesh(num_devices)
    model = TinyBNClassifier()
    tx, lr_fn = jt.make_optimizer(name="sgd", learning_rate=0.1, weight_decay=5e-4,
                                  total_steps=20, momentum=0.9)
    init = lambda: jt.init_classifier_state(model, jax.random.key(0), (8, 8, 1), tx)
    step = jt.make_classifier_train_step(model.apply, tx, label_smoothing=0.1, lr_fn=lr_fn,
                                         mesh=mesh)
    return mesh, model, jt.init_on_mesh(init, mesh), step


def _train(num_devices, n):
    mesh, model, state, step = _setup(num_devices)
    ms = []
    for i in range(n):
        state, m = step(state, shard_batch(synthetic_batch(i, batch=32), mesh))
        ms.append(m)
    return model, state, jax.device_get(ms), step


def test_sharded_equals_single_device_and_learns():
    model, s8, m8, step8 = _train(8, 25)
    _, s1, m1, _ = _train(1, 3)
    for a, b in zip(m8[:3], m1, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert step8._cache_size() == 1
    # BatchNorm running statistics moved away from their init
    assert not np.allclose(s8.model_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    assert m8[-1]["loss"] < m8[0]["loss"]
    test = synthetic_batch(999, batch=64)
    logits_fn = Classifier(model, s8.variables())
    acc = jt.classifier_accuracy(logits_fn, test["image"], test["label"], batch_size=24)
    assert acc > 0.6
    preds = jt.classifier_predictions(logits_fn, test["image"], batch_size=64,
                                      mesh=make_mesh(1))
    np.testing.assert_allclose(np.mean(preds == test["label"]), acc)


def test_accuracy_of_oracle_and_bad_labels():
    x = np.random.default_rng(0).uniform(size=(10, 4, 4, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)
    oracle = lambda v, key=None: jax.nn.one_hot(
        (jnp.mean(v, axis=(1, 2, 3)) > 0.5).astype(jnp.int32), 2)
    assert jt.classifier_accuracy(oracle, x, y, batch_size=4) == 1.0
    with pytest.raises(ValueError, match="labels"):
        jt.classifier_accuracy(oracle, x, y[:5])
    with pytest.raises(ValueError, match="float32"):
        jt.classifier_accuracy(oracle, x.astype(np.float64), y)


def test_cross_entropy_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    y = jnp.array([0])
    plain = jt.cross_entropy(logits, y)
    np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[0, 0], rtol=1e-6)
    smooth = jt.cross_entropy(logits, y, label_smoothing=0.3)
    expected = -(0.8 * jax.nn.log_softmax(logits)[0, 0]
                 + 0.1 * jnp.sum(jax.nn.log_softmax(logits)[0, 1:]))
    np.testing.assert_allclose(smooth, expected, rtol=1e-6)
    tx, _ = jt.make_optimizer(learning_rate=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        jt.make_classifier_train_step(lambda *a, **k: None, tx, label_smoothing=1.0)
