"""GDMP guided purification (exact second-order gradients) and DiffAttack's loss.

Cost (CI runs every file on 2 cores): the gradient-fidelity checks run GDMP over a one-layer
convolutional eps-model, which compiles in a second and runs in float64, where central finite
differences are accurate to ~1e-8: the exact gradient must agree to many digits and the
"guidance treated as constant" gradient of the reference code must not. The same small model
serves the checks of chain algebra (GDMP without guidance is DiffPure, DiffAttack with weight 0
is CE, the closed-form start state). The tiny UNet of tests/purify (a reverse-mode compilation of
it costs ~10 s on 2 cores) runs once, end to end: PGD with the DiffAttack loss on a GDMP-defended
classifier. Compiled functions are shared through ``filter_jit`` (pytrees' arrays traced).
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables

import jaxrob.attacks as ja
import jaxrob.diffusion as jd
from jaxrob._jit import filter_jit
from jaxrob._pytree import pytree_dataclass
from jaxrob.models import DiffusionModel, unet_from_config
from jaxrob.purify import DefendedModel, diffpure, gdmp, multistage, ssim

SCHED = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (4, 8, 8, 1), minval=0.1, maxval=0.9)
Y = jnp.arange(4, dtype=jnp.int32) % 10
W = jr.normal(jr.key(2), (64, 10)) * 0.5
U = jr.normal(jr.key(3), X.shape)
KEY = jr.key(7)


def _unet():
    m = unet_from_config("digits", ch=8, ch_mult=(1, 2), num_groups=4, dropout=0.0,
                         attn_resolutions=())
    v = random_variables(m, X, jnp.zeros((4,), jnp.int32), seed=1)
    return DiffusionModel(m, v, SCHED)


EPS = _unet()


@pytree_dataclass
class ConvEps:
    """A smooth one-layer eps-model, ``tanh(conv3x3(x) + b t)``, usable in float64."""

    w: jax.Array
    b: jax.Array

    def __call__(self, x, step):
        h = jax.lax.conv_general_dilated(x, self.w.astype(x.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        t = (step.astype(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)
        return jnp.tanh(h + self.b.astype(x.dtype) * t)


CONV_EPS = ConvEps(jr.normal(jr.key(4), (3, 3, 1, 1)) * 0.4, jnp.asarray(2.0))
# strong enough that the guidance moves the output (MSE: sigma_n^2 s_n 2 / 64 ~ 0.1 .. 0.3 of
# the gap per step)
GUIDED = dict(t_star=0.1, num_steps=3, guide_scale=20.0)


def classifier(x, key=None):
    return jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ W


def _to64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@filter_jit
def _purify(pur, x, key):
    return pur(x, key)


# --------------------------------------------------------------------------------------------
# GDMP


# MSE guidance needs a few steps and iterations before the guidance path dominates the input
# gradient (each step's -grad through x_n and +grad through the reference nearly cancel while
# the chain is close to the identity); SSIM's does at once
@pytest.mark.parametrize("distance, settings", [
    pytest.param("mse", dict(num_steps=6, num_iterations=2, guide_scale=40.0),
                 marks=pytest.mark.slow),  # ~25 s; the SSIM row checks the same chain in CI
    ("ssim", dict(num_steps=3, num_iterations=1, guide_scale=10.0))])
def test_gdmp_exact_gradient_matches_float64_finite_differences_guidance_constant_does_not(
        distance, settings):
    with jax.enable_x64(True):
        exact = gdmp(CONV_EPS, SCHED, t_star=0.1, distance=distance, **settings)
        const = _to64(exact.replace(gradient="guidance_constant"))
        exact = _to64(exact)
        x64, u64 = X.astype(jnp.float64), U.astype(jnp.float64)
        # the internal chain: the public call checks for float32 images
        f = lambda pur, x: jnp.vdot(pur._purify(x, KEY), u64)
        vs = jr.normal(jr.key(20), (3, *X.shape), jnp.float64)
        h = 1e-6
        pts = jnp.concatenate([x64[None] + h * vs, x64[None] - h * vs])

        @jax.jit  # one compilation: both gradients and the finite-difference evaluations
        def run(exact, const):
            return (jax.grad(f, argnums=1)(exact, x64), jax.grad(f, argnums=1)(const, x64),
                    jax.vmap(lambda x: f(exact, x))(pts))

        g_exact, g_const, vals = run(exact, const)
        fd = (vals[:3] - vals[3:]) / (2 * h)
        ad_exact = jnp.einsum("k...,...->k", vs, g_exact)
        ad_const = jnp.einsum("k...,...->k", vs, g_const)
        err_full = float(jnp.linalg.norm(g_const - g_exact) / jnp.linalg.norm(g_exact))
    rel_exact = np.abs(ad_exact - fd) / np.abs(fd)
    rel_const = np.abs(ad_const - fd) / np.abs(fd)
    print(f"\nGDMP-{distance} gradient vs float64 central differences (3 directions), relative "
          f"error: exact {np.array2string(rel_exact, precision=2)}, guidance-as-constant "
          f"{np.array2string(rel_const, precision=2)}; guidance-as-constant vs exact over the "
          f"whole gradient {err_full:.3f}")
    assert g_exact.dtype == jnp.float64
    assert rel_exact.max() < 1e-5  # float64 central differences' own error at h = 1e-6
    assert rel_const.max() > 1e-2 and err_full > 0.1


def test_gdmp_without_guidance_is_diffpure_and_guidance_pulls_towards_the_input():
    plain = _purify(diffpure(CONV_EPS, SCHED, t_star=0.1, num_steps=3), X, KEY)
    pur = gdmp(CONV_EPS, SCHED, **GUIDED)
    on = _purify(pur, X, KEY)
    compiled = _purify.cache_size()
    off = _purify(pur.replace(guide_scale=0.0), X, KEY)
    assert _purify.cache_size() == compiled  # the guidance scale is traced: no recompilation
    np.testing.assert_allclose(off, plain, atol=1e-6)
    assert on.shape == X.shape and float(on.min()) >= 0.0 and float(on.max()) <= 1.0
    mse = lambda a: jnp.mean(jnp.square(a - X), axis=(1, 2, 3))
    assert bool(jnp.all(mse(on) < mse(plain)))  # every image is pulled back towards its input
    assert pur.nfe == 3 and pur.manifest()["guide_scale"] == 20.0


def test_ssim_properties():
    a = X
    b = jnp.clip(X + 0.1 * jr.normal(jr.key(30), X.shape), 0, 1)
    s = ssim(a, b)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)
    np.testing.assert_allclose(ssim(b, a), s, atol=1e-6)
    assert bool(jnp.all((s < 1.0) & (s > -1.0)))
    # per example: the SSIM of one image does not depend on the others
    np.testing.assert_allclose(ssim(a[:1], b[:1]), s[:1], atol=1e-6)


def test_gdmp_bad_input_raises():
    with pytest.raises(ValueError, match="guide_scale"):
        gdmp(EPS, t_star=0.1, guide_scale=-1.0)
    with pytest.raises(ValueError, match="guide_ptb"):
        gdmp(EPS, t_star=0.1, guide_scale=1.0, guide_ptb=0.0)
    with pytest.raises(ValueError, match="distance"):
        gdmp(EPS, t_star=0.1, guide_scale=1.0, distance="l1")
    with pytest.raises(ValueError, match="gradient"):
        gdmp(EPS, t_star=0.1, guide_scale=1.0, gradient="surrogate")
    with pytest.raises(ValueError, match="num_iterations"):
        gdmp(EPS, t_star=0.1, guide_scale=1.0, num_iterations=0)
    with pytest.raises(ValueError, match="t_star"):
        gdmp(EPS, t_star=0.0, guide_scale=1.0)
    with pytest.raises(ValueError, match="num_steps"):
        gdmp(EPS, t_star=0.01, guide_scale=1.0, num_steps=50)
    pur = gdmp(EPS, **GUIDED)
    with pytest.raises(ValueError, match="rank 4"):
        pur(X[0], KEY)
    with pytest.raises(ValueError, match="keys"):
        pur(X, jr.split(KEY, 3))
    with pytest.raises(ValueError, match="derived"):
        pur.replace(scales=jnp.zeros(3))


# --------------------------------------------------------------------------------------------
# DiffAttack


DEFENDED = DefendedModel(classifier, diffpure(CONV_EPS, SCHED, t_star=0.1, num_steps=3))


@filter_jit
def _value_and_grad(loss_fn, x, y, key):
    return jax.value_and_grad(lambda x_: jnp.sum(loss_fn(x_, y, key)))(x)


def test_diffattack_weight_zero_is_plain_ce_and_the_extra_term_is_where_it_should_be():
    x_adv = jnp.clip(X + 0.05 * jnp.sign(U), 0.0, 1.0)
    da0 = ja.diffattack_loss(DEFENDED, X, weight=0.0)
    da1 = ja.diffattack_loss(DEFENDED, X, weight=1.0)
    ce = ja.loss_from_logits(DEFENDED, "ce")
    v0, g0 = _value_and_grad(da0, x_adv, Y, KEY)
    v1, g1 = _value_and_grad(da1, x_adv, Y, KEY)  # the weight is traced: same compilation
    vce, gce = _value_and_grad(ce, x_adv, Y, KEY)
    assert _value_and_grad.cache_size() == 2
    np.testing.assert_allclose(v0, vce, rtol=1e-6)
    np.testing.assert_allclose(g0, gce, rtol=1e-5, atol=1e-7)
    assert bool(jnp.all(jnp.isfinite(g1))) and float(jnp.abs(g1 - gce).max()) > 0

    # the states: the start is the clean image diffused with the same noise, so its deviation is
    # abar_N * mean((2 x_adv - 2 x)^2) in closed form; the last is the output before clipping,
    # at least as far from the clean image as the clipped output
    pur = DEFENDED.purifier
    dev_fn = filter_jit(lambda p, x, r, k: p.reconstruction_deviation(x, r, k))
    out, dev = dev_fn(pur, x_adv, X, KEY)
    assert dev.shape == (pur.num_states, 4) == (4, 4)
    # the extra term is the mean deviation over the states (weight 1 minus weight 0)
    np.testing.assert_allclose(v1 - v0, jnp.sum(jnp.mean(dev, axis=0)), rtol=1e-4)
    abar = pur.chains[0].alphas_cumprod[-1]
    np.testing.assert_allclose(dev[0], abar * jnp.mean(4 * (x_adv - X) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(out, _purify(pur, x_adv, KEY), atol=1e-6)
    assert bool(jnp.all(dev[-1] >= jnp.mean(4 * (out - X) ** 2, axis=(1, 2, 3)) - 1e-6))
    # at the clean image the start deviation vanishes
    _, dev_clean = dev_fn(pur, X, X, KEY)
    np.testing.assert_allclose(dev_clean[0], 0.0, atol=1e-10)


def test_diffattack_sampled_states_weights():
    da = ja.diffattack_loss(DEFENDED, X, num_states=2)
    weights = filter_jit(lambda d, k: d._state_weights(k, 4, 4))
    w = weights(da, KEY)
    assert w.shape == (4, 1) and int(jnp.sum(w > 0)) == 2
    np.testing.assert_allclose(jnp.sum(w), 1.0)
    keys = jax.vmap(lambda i: jr.fold_in(KEY, i))(jnp.arange(6))
    wb = filter_jit(lambda d, k: d._state_weights(k, 4, 6))(da, keys)
    assert wb.shape == (4, 6)
    np.testing.assert_allclose(jnp.sum(wb, axis=0), 1.0)
    assert len({tuple(np.asarray(c > 0)) for c in wb.T}) > 1  # per-example draws differ
    w_all = ja.diffattack_loss(DEFENDED, X)._state_weights(KEY, 4, 4)
    np.testing.assert_allclose(w_all, 0.25)


def test_pgd_with_diffattack_loss_stays_in_the_ball_on_a_guided_purifier():
    # the UNet end to end; two guided steps without remat keep its one compilation small (the
    # remat path of the guided chain is the one the float64 gradient checks differentiate)
    defended = DefendedModel(classifier, gdmp(EPS, SCHED, t_star=0.1, num_steps=2,
                                              guide_scale=20.0, remat=False))
    da = ja.diffattack_loss(defended, X, base="dlr", num_states=2)
    eps = 0.1
    res = ja.pgd(defended, X, Y, KEY, eps=eps, num_steps=2, loss=da, random_start=True,
                 return_iterates=True)
    its = res.iterates
    assert its.shape == (3, *X.shape)  # x_0 and two steps
    assert float(jnp.abs(its - X[None]).max()) <= eps + 1e-6
    assert float(its.min()) >= 0.0 and float(its.max()) <= 1.0
    assert float(jnp.abs(res.x_adv - X).max()) <= eps + 1e-6
    assert bool(jnp.all(jnp.isfinite(res.loss)))


def test_diffattack_bad_input_raises():
    with pytest.raises(ValueError, match="gradient='exact'"):
        ja.diffattack_loss(DefendedModel(classifier, DEFENDED.purifier.replace(
            gradient="bpda")), X)
    with pytest.raises(ValueError, match="purifier"):
        ja.diffattack_loss(DefendedModel(classifier, None), X)
    with pytest.raises(ValueError, match="purifier"):
        ja.diffattack_loss(classifier, X)
    with pytest.raises(ValueError, match="weight"):
        ja.diffattack_loss(DEFENDED, X, weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        ja.diffattack_loss(DEFENDED, X, weight="big")
    with pytest.raises(ValueError, match="base"):
        ja.diffattack_loss(DEFENDED, X, base="l2")
    with pytest.raises(ValueError, match="num_states"):
        ja.diffattack_loss(DEFENDED, X, num_states=5)  # 3 steps + the start
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        ja.diffattack_loss(DEFENDED, X + 1.0)
    da = ja.diffattack_loss(DEFENDED, X)
    with pytest.raises(ValueError, match="clean images of shape"):
        ja.pgd(DEFENDED, X[:2], Y[:2], KEY, eps=0.1, loss=da)
    with pytest.raises(ValueError, match="another model"):
        ja.pgd(DefendedModel(classifier, DEFENDED.purifier), X, Y, KEY, eps=0.1, loss=da)
    with pytest.raises(ValueError, match="targeted"):
        ja.pgd(DEFENDED, X, Y, KEY, eps=0.1, loss=da, target=(Y + 1) % 10)
    with pytest.raises(ValueError, match="x_ref"):
        DEFENDED.purifier.reconstruction_deviation(X, X[:2], KEY)
    # multi-stage purifiers are scored stage by stage
    ms = multistage(EPS, SCHED, [(0.05, 2), (0.1, 3)])
    assert ja.diffattack_loss(DefendedModel(classifier, ms), X, num_states=7).num_states == 7
