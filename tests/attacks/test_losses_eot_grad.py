"""The margin losses' gradients under EoT: eot_grad == the mean of the per-key gradients.

The reported fault (docs/known_faults.md, "Margin losses under EoT"): with a random per-class
offset on the logits, ``jnp.max``'s derivative (the entries *equal* to the maximum) marked none
under EoT's ``jit(vmap(grad))`` over keys -- the cw / dlr gradients came out NaN/inf or without
their margin term, at -O0 and at XLA's default optimisation. The losses now select the logits by
index (argmax / top_k + gather); their values are the old formula's bit for bit.
"""

import textwrap

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _default_opt import run_at_default_optimisation

import jaxrob.attacks as ja
from jaxrob.attacks._losses import (
    LOSSES,
    TARGETED_LOSSES,
    TargetedLogitsLoss,
    cw_loss,
    cw_loss_targeted,
    dlr_loss,
    dlr_loss_targeted,
)

_D, _K, _B, _S = 64, 10, 6, 8
_W = jr.normal(jr.key(3), (_D, _K)) * 0.3
_X = jr.uniform(jr.key(4), (_B, 8, 8, 1))
_Y = jnp.argmax(_X.reshape(_B, -1) @ _W, axis=1).astype(jnp.int32)
_T = (_Y + 3) % _K


def _noisy(x, key):
    """The reported model: linear logits plus a random per-class offset of shape (K,)."""
    return x.reshape(x.shape[0], -1) @ _W + 2.0 * jr.normal(key, (_K,))[None, :]


def _loss_fn(name):
    if name.startswith("t_"):
        return TargetedLogitsLoss(_noisy, _T, name[2:])
    return ja.loss_from_logits(_noisy, name)


_NAMES = [*LOSSES, *(f"t_{n}" for n in TARGETED_LOSSES)]


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("name", _NAMES)
def test_eot_grad_is_the_mean_of_per_key_gradients(name, chunk):
    loss_fn, key = _loss_fn(name), jr.key(0)
    g = jax.jit(lambda x: ja.eot_grad(loss_fn, x, _Y, key, samples=_S, chunk=chunk))(_X)
    one = jax.jit(jax.grad(lambda x, k: jnp.sum(loss_fn(x, _Y, k))))
    per_key = np.stack([np.asarray(one(_X, jr.fold_in(key, i))) for i in range(_S)])
    assert np.isfinite(per_key).all()
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), per_key.mean(0), rtol=1e-5, atol=1e-5)
    # the keys disagree: the mean is not any one key's gradient
    assert np.abs(per_key - per_key.mean(0)).max() > 1e-2


def test_eot_grad_is_the_mean_at_default_optimisation():
    """The same property outside the test suite's -O0 (the fault appeared at both levels)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, jax.random as jr, numpy as np
        import test_losses_eot_grad as t
        for name in t._NAMES:
            f, key = t._loss_fn(name), jr.key(0)
            g = jax.jit(lambda x: t.ja.eot_grad(f, x, t._Y, key, samples=t._S))(t._X)
            one = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, t._Y, k))))
            ref = np.mean([one(t._X, jr.fold_in(key, i)) for i in range(t._S)], axis=0)
            np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-5, err_msg=name)
        print("ok")
    """)
    code = "import sys; sys.path.insert(0, 'tests/attacks')\n" + code
    assert run_at_default_optimisation(code, timeout=600).strip().endswith(b"ok")


def _old_true_and_max_other(z, y):
    """The pre-fix formula: a masked sum and jnp.max."""
    onehot = jax.nn.one_hot(y, z.shape[1], dtype=bool)
    return (jnp.sum(jnp.where(onehot, z, 0.0), axis=1),
            jnp.max(jnp.where(onehot, -jnp.inf, z), axis=1))


def _old_losses(z, y, t):
    zy, zo = _old_true_and_max_other(z, y)
    tt, to = _old_true_and_max_other(z, t)
    top = jax.lax.top_k(z, 4)[0]
    zt_ = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
    zy_ = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    return {
        "cw": zo - zy,
        "cw_kappa": jnp.minimum(zo - zy, 0.5),
        "dlr": -(zy - zo) / (top[:, 0] - top[:, 2] + 1e-12),
        "t_cw": -(to - tt),
        "t_dlr": -(zy_ - zt_) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12),
    }


def _new_losses(z, y, t):
    return {"cw": cw_loss(z, y), "cw_kappa": cw_loss(z, y, kappa=0.5), "dlr": dlr_loss(z, y),
            "t_cw": cw_loss_targeted(z, y, t), "t_dlr": dlr_loss_targeted(z, y, t)}


@pytest.mark.parametrize("ties", [False, True])
def test_loss_values_are_the_pre_fix_formula_bit_for_bit(ties):
    z = jr.normal(jr.key(1), (64, _K)) * 3.0
    if ties:  # a few integer levels: many tied logits, also tied with z_y
        z = jnp.round(z / 2.0)
    y = jr.randint(jr.key(2), (64,), 0, _K)
    t = (y + 1 + jr.randint(jr.key(5), (64,), 0, _K - 1)) % _K
    old, new = _old_losses(z, y, t), _new_losses(z, y, t)
    for name in old:
        np.testing.assert_array_equal(np.asarray(new[name]), np.asarray(old[name]), err_msg=name)


def test_ties_send_the_whole_derivative_to_the_lowest_index():
    """Documented tie semantics: the maximum other logit is the argmax one (lowest index)."""
    z = jnp.array([[1.0, 3.0, 3.0, 0.0], [3.0, 1.0, 3.0, 3.0]])
    y = jnp.array([0, 0])
    g = jax.grad(lambda z_: jnp.sum(cw_loss(z_, y)))(z)
    np.testing.assert_array_equal(np.asarray(g), [[-1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0]])


@pytest.mark.slow  # ~2 min: a DiffPure chain's exact gradient, compiled twice
def test_diffpure_dlr_eot_grad_is_the_mean_of_per_key_gradients():
    """Through the real purifier (input-shaped noise into the UNet and the classifier), at
    XLA's default optimisation: EoT 4, DLR, two images."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, jax.random as jr, numpy as np
        import jaxrob
        clf = jaxrob.models.load("checkpoints/mnist_classifier")
        ddpm = jaxrob.models.load("checkpoints/mnist_ddpm")
        model = jaxrob.purify.DefendedModel(
            clf, jaxrob.purify.diffpure(ddpm, t_star=0.1, num_steps=2))
        x = jr.uniform(jr.key(1), (2, 28, 28, 1))
        y = jnp.argmax(clf(x, None), axis=1).astype(jnp.int32)
        f, key = jaxrob.attacks.loss_from_logits(model, "dlr"), jr.key(7)
        g = jax.jit(lambda x_: jaxrob.attacks.eot_grad(f, x_, y, key, samples=4))(x)
        one = jax.jit(jax.grad(lambda x_, k: jnp.sum(f(x_, y, k))))
        ref = np.mean([one(x, jr.fold_in(key, i)) for i in range(4)], axis=0)
        assert np.isfinite(np.asarray(g)).all() and np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    assert run_at_default_optimisation(code, timeout=900).strip().endswith(b"ok")
