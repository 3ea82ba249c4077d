"""Adaptive attacks on DiffDefense: the detection-aware model and loss, BPDA and exact gradients
through the unrolled reconstruction (finite differences, remat), EoT over the initial noise.

A closed-form eps-model keeps compilation to seconds (the exact attack gradient differentiates
the reconstruction's optimiser, itself a gradient of the reverse process).
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.diffusion as jd
from jaxrob.attacks import (
    DetectionAwareModel,
    ce_loss,
    cw_loss,
    detection_aware_loss,
    eot_value_and_grad,
    loss_from_logits,
    pgd,
)
from jaxrob.purify import DefendedModel, diffdefense, example_keys

SCHED = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (3, 8, 8, 1), minval=0.05, maxval=0.95)
Y = jnp.array([0, 1, 2], jnp.int32)
W = jr.normal(jr.key(1), (64, 10))


def toy_eps(x, step):
    """The optimal eps of data N(0, 0.25 I) (in [-1, 1] space) plus a small nonlinear term."""
    abar = SCHED.alphas_cumprod[step].reshape(-1, 1, 1, 1)
    sd = jnp.sqrt(1.0 - abar)
    return sd * x / (0.25 * abar + 1.0 - abar) + 0.3 * sd * jnp.tanh(jnp.roll(x, 1, axis=1))


def clf(x, key):
    return x.reshape(x.shape[0], -1) @ W


def _dd(**kw):
    kw = {"num_steps": 3, "restarts": 2, "iterations": 2, "learning_rate": 0.1, **kw}
    return diffdefense(toy_eps, SCHED, **kw)


def test_detection_aware_model_is_the_defended_logits_and_the_reconstruction_error():
    d = _dd()
    bpda = DetectionAwareModel(clf, d.replace(gradient="bpda"))
    keys = example_keys(jr.key(2), jnp.arange(3))

    @jax.jit  # one compilation for every quantity compared
    def everything(x):
        rec = d.reconstruct(x, keys)
        g = jax.grad(lambda xx: jnp.sum(bpda(xx, keys)[:, 10]))(x)
        return (DetectionAwareModel(clf, d)(x, keys), DefendedModel(clf, d)(x, keys), rec,
                bpda(x, keys), g)

    out, defended, rec, out_bpda, g = everything(X)
    assert out.shape == (3, 11)
    np.testing.assert_allclose(out[:, :10], defended, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 10], rec.error, rtol=1e-5)
    # the loss: base(logits) - weight * error, in closed form
    for loss, base in [(detection_aware_loss(7.0), ce_loss(out[:, :10], Y)),
                       (detection_aware_loss(7.0, base="cw", kappa=0.5),
                        cw_loss(out[:, :10], Y, kappa=0.5))]:
        np.testing.assert_allclose(loss(out, Y), base - 7.0 * out[:, 10], rtol=1e-6)
    assert detection_aware_loss(7.0) == detection_aware_loss(7.0)  # hashable by value
    assert hash(detection_aware_loss(1.0, base="cw")) == hash(detection_aware_loss(1.0,
                                                                                   base="cw"))
    # the BPDA variant: same values; the error's gradient holds the reconstruction constant
    np.testing.assert_allclose(out_bpda, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, 2.0 * (X - rec.x) / 64, rtol=1e-4, atol=1e-7)


def _exact_grad_and_differences(remat, adam_eps, h, v, keys):
    loss = loss_from_logits(DetectionAwareModel(clf, _dd(remat=remat, adam_eps=adam_eps)),
                            detection_aware_loss(50.0))
    f = lambda x: jnp.sum(loss(x, Y, keys))
    return jax.jit(lambda x: (jax.grad(f)(x), f(x + h * v), f(x - h * v)))(X)


def test_exact_attack_gradient_matches_finite_differences_and_remat():
    """The detection-aware loss is differentiable in x through all L Adam steps (each through
    the reverse process): its directional derivative matches a central difference, and remat
    (checkpointed reverse steps and optimiser iterations) gives the same gradient.

    With Adam's eps = 1e-3: at the default 1e-8 the exact gradient is dominated by coordinates
    where the inner gradient nearly vanishes (d/dg g / (|g| + eps) ~ 1/eps there), and no
    float32 finite difference resolves it (module docstring of jaxrob.purify._diffdefense).
    """
    keys = example_keys(jr.key(3), jnp.arange(3))
    v = jr.normal(jr.key(4), X.shape)
    h = 3e-3
    g, f_plus, f_minus = _exact_grad_and_differences(True, 1e-3, h, v, keys)
    g_plain, _, _ = _exact_grad_and_differences(False, 1e-3, h, v, keys)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, g_plain, rtol=1e-4, atol=1e-5 * float(jnp.abs(g).max()))
    # the restart kept per example is the same at x +- h v (a discrete choice), so the loss is
    # smooth along the segment
    np.testing.assert_allclose(jnp.vdot(g, v), (f_plus - f_minus) / (2 * h), rtol=2e-2)


def test_eot_over_initial_noise_averages_per_key_gradients():
    """The adaptive EoT gradient is the mean of the gradients of reconstructions from different
    initial noise (the keys a stochastic evaluation hands the defence)."""
    model = DefendedModel(clf, _dd())
    loss = loss_from_logits(lambda x, k: model(x, k[None]))
    x, y = X[:1], Y[:1]
    key = jr.key(5)

    @jax.jit
    def both(x):
        _, g = eot_value_and_grad(loss, x, y, key, samples=3)
        single = jax.grad(lambda xx, k: jnp.sum(loss(xx, y, k)))
        gs = jax.vmap(lambda i: single(x, jr.fold_in(key, i)))(jnp.arange(3, dtype=jnp.uint32))
        return g, gs

    g, gs = both(x)
    np.testing.assert_allclose(g, gs.mean(0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(gs[0], gs[1])  # the initial noise differs between samples


def test_detection_aware_pgd_lowers_the_reconstruction_error():
    """With the classifier's term capped at a constant (cw margin capped at -100), PGD on the
    detection-aware loss only lowers the reconstruction error: the best iterate never has a
    higher error than the clean input (which PGD evaluates first), and somewhere a lower one."""
    d = _dd(gradient="bpda")
    model = DetectionAwareModel(clf, d)
    keys = example_keys(jr.key(6), jnp.arange(3))
    fixed = lambda x, _key: model(x, keys)  # the attacker knows the reconstruction's keys
    res = pgd(fixed, X, Y, jr.key(7), eps=0.1, num_steps=4,
              loss=detection_aware_loss(1e3, base="cw", kappa=-100.0))
    assert float(jnp.max(jnp.abs(res.x_adv - X))) <= 0.1 + 1e-6
    err = lambda x: np.asarray(jax.jit(fixed)(x, None)[:, 10])
    e_adv, e_clean = err(res.x_adv), err(X)
    assert np.all(e_adv <= e_clean + 1e-7) and np.any(e_adv < 0.9 * e_clean)
    np.testing.assert_allclose(res.loss, -100.0 - 1e3 * e_adv, rtol=1e-5)


def test_bad_detection_aware_inputs_raise():
    with pytest.raises(ValueError, match="base"):
        detection_aware_loss(1.0, base="mse")
    with pytest.raises(ValueError, match="kappa"):
        detection_aware_loss(1.0, base="ce", kappa=1.0)
    for w in ("a", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            detection_aware_loss(w)
    with pytest.raises(ValueError, match="adam_eps"):
        _dd(adam_eps=0.0)
    with pytest.raises(ValueError, match="classes \\+ 1"):
        detection_aware_loss(1.0)(jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32))
    model = DetectionAwareModel(clf, _dd())
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        model(X + 1.0, jr.key(0))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        DetectionAwareModel(clf, _dd(gradient="bpda"))(X - 1.0, jr.key(0))
