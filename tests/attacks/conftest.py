"""The attack tests' classifier: softmax regression on scikit-learn's 8x8 digits."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxrob.attacks as ja
from jaxrob.data import load_dataset


def _linear_logits(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None, :]


@pytest.fixture(scope="module")
def model():
    """(logits_fn, x, y): softmax regression trained on digits (200 Adam steps), 64 test images."""
    train = load_dataset("digits", "train")
    x_tr, y_tr = jnp.asarray(train.images), jnp.asarray(train.labels)
    opt = optax.adam(0.1)

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda p: ja.ce_loss(_linear_logits(p, x_tr), y_tr).mean())(p)
            u, s = opt.update(g, s)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, opt.init(params)), None, length=200)[0][0]

    params = fit({"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))})
    test = load_dataset("digits", "test[:64]")
    logits_fn = lambda x, key: _linear_logits(params, x)
    return logits_fn, jnp.asarray(test.images), jnp.asarray(test.labels)
