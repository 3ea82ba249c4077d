"""Tests for the classifiers (jaxrob.models._classifiers)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from jaxrob.models import (
    MODELS,
    CifarResNet,
    DMWideResNet,
    ResNet,
    SmallCNN,
    UNet,
    WideResNet,
)


def _n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes(model, batch, height, width, channels):
    x = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.float32)
    return jax.eval_shape(model.init_with_output, jr.key(0), x)


def random_variables(model, shape, seed=0):
    """Random parameters and BN statistics built in numpy (compiling initialisers is slow)."""
    rng = np.random.default_rng(seed)
    _, shapes = _shapes(model, *shape)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(
                rng.standard_normal(s.shape, np.float32) / np.sqrt(np.prod(s.shape[:-1]))
            )
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(np.float32))
        return jnp.asarray(0.1 * rng.standard_normal(s.shape, np.float32))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize(
    "model, shape, expected",
    [
        (CifarResNet(depth=20), (1, 32, 32, 3), 269_722),  # akamaster PROVENANCE.md
        (CifarResNet(depth=32), (1, 32, 32, 3), 464_154),
        (CifarResNet(depth=44), (1, 32, 32, 3), 658_586),
        (CifarResNet(depth=56), (1, 32, 32, 3), 853_018),
        (WideResNet(depth=28, widen_factor=10), (1, 32, 32, 3), 36_479_194),  # RobustBench Standard
        (SmallCNN(), (1, 28, 28, 1), 421_738),
        (SmallCNN(), (1, 8, 8, 1), 53_098),
    ],
)
def test_param_counts(model, shape, expected):
    _, variables = _shapes(model, *shape)
    assert set(variables) == {"params", "batch_stats"}
    assert _n_params(variables["params"]) == expected


@pytest.mark.parametrize(
    "model, shape",
    [
        (SmallCNN(), (3, 28, 28, 1)),
        (SmallCNN(num_classes=5), (3, 8, 8, 1)),
        (SmallCNN(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), (2, 32, 32, 3)),
        (CifarResNet(depth=20), (2, 32, 32, 3)),
        (WideResNet(depth=28, widen_factor=10), (2, 32, 32, 3)),
        (WideResNet(depth=16, widen_factor=4, num_classes=100), (2, 32, 32, 3)),
    ],
)
def test_output_shapes(model, shape):
    logits, _ = _shapes(model, *shape)
    assert logits.shape == (shape[0], model.num_classes) and logits.dtype == jnp.float32


def test_registry():
    assert MODELS == {
        "unet": UNet,
        "small_cnn": SmallCNN,
        "cifar_resnet": CifarResNet,
        "wide_resnet": WideResNet,
        "dm_wide_resnet": DMWideResNet,
        "resnet": ResNet,
    }


def test_small_cnn_train_and_eval_modes():
    model = SmallCNN()
    variables = random_variables(model, (4, 8, 8, 1))
    x = jr.uniform(jr.key(0), (4, 8, 8, 1))
    fwd = jax.jit(model.apply, static_argnames=("train", "mutable"))
    logits_eval = fwd(variables, x)
    logits_train, updates = fwd(
        variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": jr.key(1)}
    )
    assert logits_eval.shape == logits_train.shape == (4, 10)
    # Training uses batch statistics and moves the running averages (momentum 0.9 like torch).
    old = variables["batch_stats"]["bn0"]["mean"]
    new = updates["batch_stats"]["bn0"]["mean"]
    assert float(jnp.max(jnp.abs(new - old))) > 0
    conv0 = jax.lax.conv_general_dilated(
        (x - 0.5) / 0.5,
        variables["params"]["conv0"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * conv0.mean(axis=(0, 1, 2)), atol=1e-5)
    with pytest.raises(Exception, match="dropout"):
        fwd(variables, x, train=True, mutable=("batch_stats",))


def test_small_cnn_fits_a_batch():
    # A few Adam steps drive the training loss of one 8x8 batch towards zero.
    import optax

    model = SmallCNN(num_classes=4)
    x = jr.uniform(jr.key(0), (16, 8, 8, 1))
    y = jnp.arange(16) % 4
    variables = random_variables(model, (16, 8, 8, 1))
    opt = optax.adam(3e-3)

    def loss_fn(params, batch_stats, key):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def run(params, batch_stats):
        def step(carry, key):
            params, batch_stats, opt_state = carry
            (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, key)
            updates, opt_state = opt.update(g, opt_state)
            return (optax.apply_updates(params, updates), upd["batch_stats"], opt_state), loss

        _, losses = jax.lax.scan(
            step, (params, batch_stats, opt.init(params)), jr.split(jr.key(2), 60)
        )
        return losses

    losses = run(variables["params"], variables["batch_stats"])
    assert float(losses[-5:].mean()) < 0.3 * float(losses[0])


def test_normalisation_inside():
    # CifarResNet normalises with the akamaster mean/std; WideResNet (RobustBench Standard) not.
    x = jr.uniform(jr.key(0), (2, 32, 32, 3))
    mean = jnp.array([0.485, 0.456, 0.406]).reshape(1, 1, 1, 3)
    std = jnp.array([0.229, 0.224, 0.225]).reshape(1, 1, 1, 3)
    model = CifarResNet(depth=20)
    bare = CifarResNet(depth=20, mean=None, std=None)
    variables = random_variables(model, (2, 32, 32, 3))
    # Traced inputs: the [0, 1] value check is skipped, so `bare` accepts normalised inputs.
    out = jax.jit(model.apply)(variables, x)
    out_bare = jax.jit(bare.apply)(variables, (x - mean) / std)
    np.testing.assert_allclose(out, out_bare, atol=1e-4)
    assert WideResNet().mean is None and WideResNet().std is None


@pytest.mark.parametrize(
    "model, x, match",
    [
        (SmallCNN(), np.zeros((28, 28, 1), np.float32), "rank 4"),
        (SmallCNN(), np.full((1, 28, 28, 1), 1.5, np.float32), r"values in \[0.0, 1.0\]"),
        (SmallCNN(), np.zeros((1, 28, 28, 1), np.int32), "float32"),
        (CifarResNet(), np.zeros((1, 32, 32, 1), np.float32), "3 channels"),
        (WideResNet(depth=10, widen_factor=1), np.zeros((1, 32, 32, 1), np.float32), "3 channels"),
        (CifarResNet(depth=21), np.zeros((1, 32, 32, 3), np.float32), "6n\\+2"),
        (WideResNet(depth=27), np.zeros((1, 32, 32, 3), np.float32), "6n\\+4"),
    ],
)
def test_input_errors(model, x, match):
    with pytest.raises(ValueError, match=match):
        model.init(jr.key(0), jnp.asarray(x))
