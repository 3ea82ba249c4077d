"""Protective perturbations (AdvDM, SDS, PhotoGuard, Mist, end-to-end edit attacks) on toy models.

Toy stand-ins (tests/_protect_toys.py): a small nonlinear eps-model, ``eps = c x_t``, and an exact
linear "autoencoder" (2x2 space-to-depth + channel mixing) as the LDM's codec; 8x8 images.
"""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _attack_checks import norms
from _protect_toys import LinearEps, StraightThrough, images, schedule, toy_codec, toy_eps

import jaxrob.attacks as ja
import jaxrob.purify as jp
from jaxrob.attacks._protect import _draw, _protect

B, SIZE, C = 3, 8, 1
EPS, STEP, STEPS = 6 / 255, 2 / 255, 3


@pytest.fixture(scope="module")
def toys():
    codec = toy_codec(C)
    return dict(pdm=toy_eps(C, seed=0), ldm=toy_eps(4 * C, seed=2), codec=codec,
                x=images(B, SIZE, C, seed=0), x_target=images(B, SIZE, C, seed=1))


def _grad(f, x):
    return jax.grad(lambda x_: jnp.sum(f(x_)))(x)


@pytest.mark.parametrize("latent", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["pixel", "latent"])  # pixel: the same code with z = 2x - 1
def test_sds_gradient_is_advdm_gradient_with_unet_jacobian_stopped(toys, latent):
    # AdvDM's gradient with the eps-model's Jacobian replaced by the identity (a straight-
    # through eps-model) is (2 / D) sqrt(abar_n) J_enc^T (eps_hat - eps); SDS drops the
    # positive factor, so the two agree exactly up to it, example by example.
    ddpm = toys["ldm"] if latent else toys["pdm"]
    encode = toys["codec"].encode if latent else None
    x, key = toys["x"], jr.key(3)

    @jax.jit
    def both(x):
        g_sds = _grad(lambda v: ja.sds_loss(ddpm, v, key, encode_fn=encode), x)
        g_st = _grad(lambda v: ja.advdm_loss(StraightThrough(ddpm), v, key, encode_fn=encode),
                     x)
        z = encode(x) if latent else 2.0 * x - 1.0
        n, _ = _draw(key, z, ddpm.schedule)
        return (g_sds, g_st, n, ja.sds_loss(ddpm, x, key, encode_fn=encode),
                ja.advdm_loss(ddpm, x, key, encode_fn=encode))

    g_sds, g_st, n, v_sds, v_adv = jax.device_get(both(x))
    d = (toys["codec"].encode(x) if latent else x)[0].size
    factor = 2.0 * np.sqrt(np.asarray(ddpm.schedule.alphas_cumprod)[n]) / d
    np.testing.assert_allclose(g_st, g_sds * factor[:, None, None, None], rtol=1e-5, atol=1e-9)
    assert np.all(np.abs(g_sds).reshape(B, -1).max(1) > 0)
    np.testing.assert_allclose(v_sds, v_adv, rtol=1e-5)  # the value is AdvDM's loss


def test_sds_closed_form_on_a_linear_eps_model(toys):
    # eps_hat = c z_t: the full AdvDM gradient is c * (2 / D) sqrt(abar_n) times SDS's.
    c = 0.7
    ddpm = LinearEps(jnp.float32(c), schedule())
    encode, x, key = toys["codec"].encode, toys["x"], jr.key(5)

    @jax.jit
    def both(x):
        g_sds = _grad(lambda v: ja.sds_loss(ddpm, v, key, encode_fn=encode), x)
        g_adv = _grad(lambda v: ja.advdm_loss(ddpm, v, key, encode_fn=encode), x)
        return g_sds, g_adv, _draw(key, encode(x), ddpm.schedule)[0]

    g_sds, g_adv, n = jax.device_get(both(x))
    d = toys["codec"].encode(x)[0].size
    factor = c * 2.0 * np.sqrt(np.asarray(ddpm.schedule.alphas_cumprod)[n]) / d
    np.testing.assert_allclose(g_adv, g_sds * factor[:, None, None, None], rtol=1e-5, atol=1e-9)


def test_sds_never_differentiates_the_eps_model(toys):
    # the score-distillation gradient needs the eps-model forward only: one whose VJP raises
    # still gives SDS gradients (AdvDM's gradient would call it)
    inner = toys["pdm"]

    @jax.custom_vjp
    def eps_fwd_only(x_t, step):
        return inner(x_t, step)

    def bwd(res, g):
        raise AssertionError("the eps-model was differentiated")

    eps_fwd_only.defvjp(lambda x_t, step: (inner(x_t, step), None), bwd)
    class FwdOnly:
        schedule = inner.schedule

        def __call__(self, x_t, step):
            return eps_fwd_only(x_t, step)

    g = jax.jit(lambda v: _grad(lambda u: ja.sds_loss(FwdOnly(), u, jr.key(0)), v))(toys["x"])
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(AssertionError, match="differentiated"):
        jax.jit(jax.grad(lambda u: jnp.sum(ja.advdm_loss(FwdOnly(), u, jr.key(0)))))(toys["x"])


def _attacks(t):
    enc, dec = t["codec"].encode, t["codec"].decode
    kw = dict(eps=EPS, step_size=STEP, num_steps=STEPS, return_iterates=True)
    xt = t["x_target"]
    return {
        "advdm_pdm": lambda x, k: ja.advdm(t["pdm"], x, k, random_start=True, **kw),
        "advdm-_ldm": lambda x, k: ja.advdm(t["ldm"], x, k, encode_fn=enc, mode="-", **kw),
        "sds+_ldm": lambda x, k: ja.sds(t["ldm"], x, k, encode_fn=enc, mode="+", **kw),
        "sds-_target": lambda x, k: ja.sds(t["ldm"], x, k, encode_fn=enc, x_target=xt,
                                           target_rate=10.0, random_start=True, **kw),
        "photoguard": lambda x, k: ja.photoguard(enc, x, xt, k, **kw),
        "mist": lambda x, k: ja.mist(t["ldm"], enc, x, xt, k, rate=100.0, eot_samples=2, **kw),
        "sdedit_pdm": lambda x, k: ja.sdedit_attack(t["pdm"], x, k, strength=0.2, steps=2,
                                                    **kw),
        "pdm_pure": lambda x, k: ja.pdm_pure_attack(
            t["pdm"], t["ldm"], x, k, encode_fn=enc, decode_fn=dec, strength=0.2, steps=2,
            pdm_steps=2, x_target=xt, **kw),
    }


# one compilation each (~3-9 s on the loaded 2-core CPU): the default run keeps SDS with a
# target on an LDM (with a random start) and PhotoGuard; the other variants of the same loop
# (AdvDM runs by default in the two tests below) and the end-to-end attacks (edit_attack runs by
# default in the targeted test below) are marked slow for the CI budget
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [
    pytest.param("advdm_pdm", marks=_SLOW), pytest.param("advdm-_ldm", marks=_SLOW),
    pytest.param("sds+_ldm", marks=_SLOW), "sds-_target", "photoguard",
    pytest.param("mist", marks=_SLOW), pytest.param("sdedit_pdm", marks=_SLOW),
    pytest.param("pdm_pure", marks=_SLOW)])
def test_every_protective_attack_stays_in_the_ball_and_the_box(toys, name):
    # pixels at exactly 0 and 1 exercise the clip to [0, 1]
    x = toys["x"].at[:, 0, :, :].set(0.0).at[:, -1, :, :].set(1.0)
    res = _attacks(toys)[name](x, jr.key(7))
    its = np.asarray(res.iterates)
    assert its.shape == (STEPS + 1,) + x.shape
    for it in its:
        assert norms(it - np.asarray(x), "linf").max() <= EPS + 1e-6
        assert it.min() >= 0.0 and it.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(res.x_adv), its[-1])
    assert res.loss.shape == (B,) and np.all(np.isfinite(np.asarray(res.loss)))
    assert norms(its[-1] - np.asarray(x), "linf").max() > 0  # it moved


def test_photoguard_loss_falls_monotonically_on_a_linear_encoder(toys):
    # A linear encoder and a target far outside the ball: the gradient's signs are the same
    # everywhere in the ball, so every sign step goes downhill on the convex latent distance.
    codec = toy_codec(C, seed=4, spread=0.2)
    x = images(B, SIZE, C, seed=2, lo=0.3, hi=0.7)
    pattern = np.sign(np.random.default_rng(3).standard_normal(x.shape))
    x_target = jnp.asarray(np.clip(np.asarray(x) + 0.45 * pattern, 0, 1), jnp.float32)
    res = ja.photoguard(codec.encode, x, x_target, jr.key(0), eps=16 / 255, step_size=1 / 255,
                        num_steps=20, return_iterates=True)
    z_t = codec.encode(x_target)
    dist = np.stack([np.sum(np.square(np.asarray(codec.encode(it) - z_t)), axis=(1, 2, 3))
                     for it in res.iterates])  # (steps + 1, B)
    assert np.all(np.diff(dist, axis=0) <= 1e-5 * dist[:-1])
    assert np.all(dist[-1] < 0.9 * dist[0])
    np.testing.assert_allclose(np.asarray(res.loss), dist[-1], rtol=1e-5)


def test_advdm_plus_and_minus_take_opposite_first_steps(toys):
    # same key, same Monte-Carlo draw: one unclipped step of "+" is minus the step of "-"
    x = images(B, SIZE, C, seed=5, lo=0.3, hi=0.7)
    step = functools.partial(ja.advdm, toys["pdm"], x, jr.key(1), eps=EPS, step_size=STEP,
                             num_steps=1)
    d_plus = np.asarray(step(mode="+").x_adv - x)
    compiled = _protect.cache_size()
    d_minus = np.asarray(step(mode="-").x_adv - x)
    assert _protect.cache_size() == compiled  # the direction is traced: one compilation
    np.testing.assert_allclose(d_plus, -d_minus, atol=1e-7)
    np.testing.assert_allclose(np.abs(d_plus).max(axis=(1, 2, 3)), STEP, rtol=1e-5)


def test_protection_does_not_depend_on_the_batch(toys):
    # example i uses fold_in(key, indices[i]): attacked alone it gets the same result
    x, key = toys["x"], jr.key(11)
    # the settings of the +/- test above: the batch of 3 reuses its compilation
    run = functools.partial(ja.advdm, toys["pdm"], eps=EPS, step_size=STEP, num_steps=1)
    full = run(x, key)
    perm = np.array([2, 0, 1])  # the same examples in another order (and the same compilation)
    shuffled = run(x[perm], key, indices=perm)
    np.testing.assert_allclose(np.asarray(shuffled.x_adv), np.asarray(full.x_adv)[perm],
                               atol=1e-6)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(B, dtype=jnp.uint32))
    np.testing.assert_allclose(np.asarray(run(x, keys).x_adv), np.asarray(full.x_adv),
                               atol=1e-6)


def test_targeted_edit_attack_pulls_the_edit_toward_the_target(toys):
    # a fixed-key (deterministic) SDEdit of the PDM: exact gradients, distance goes down
    editor = jp.sdeditor(toys["pdm"], strength=0.3, steps=3, sampler="ddim")
    k_edit = jr.key(2)

    def edit_fn(x, key):  # each image edited alone with the fixed key, as inside the attack
        del key
        return jax.vmap(lambda xi: editor(xi[None], k_edit)[0])(x)

    x, xt = toys["x"], toys["x_target"]
    res = ja.edit_attack(edit_fn, x, jr.key(0), x_target=xt, eps=16 / 255, step_size=2 / 255,
                         num_steps=8)
    before = np.mean(np.square(np.asarray(edit_fn(x, None) - xt)), axis=(1, 2, 3))
    after = np.mean(np.square(np.asarray(edit_fn(res.x_adv, None) - xt)), axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(res.loss), after, rtol=1e-5)
    assert np.all(after < before)


class _Boom:
    """An eps-model / encoder that must never be called (errors come before any work)."""

    schedule = schedule()

    def __call__(self, *args):
        raise AssertionError("called")


def test_bad_protect_inputs_raise_before_any_work(toys):
    boom, x, xt, key = _Boom(), toys["x"], toys["x_target"], jr.key(0)
    cases = [
        (lambda: ja.advdm(boom, x, key, eps=-0.1), "eps"),
        (lambda: ja.advdm(boom, x, key, step_size=0.0), "step_size"),
        (lambda: ja.advdm(boom, x, key, num_steps=0), "num_steps"),
        (lambda: ja.advdm(boom, x, key, mode="up"), "mode"),
        (lambda: ja.advdm(boom, x, key, eot_samples=0), "eot_samples"),
        (lambda: ja.advdm(boom, x + 1.0, key), "x"),
        (lambda: ja.advdm(boom, x, jr.split(key, B + 1)), "key"),
        (lambda: ja.advdm(boom, x, key, indices=np.arange(B + 1)), "indices"),
        (lambda: ja.sds(boom, x, key, x_target=xt), "encode_fn"),
        (lambda: ja.sds(boom, x, key, encode_fn=boom, x_target=xt[:1]), "x_target"),
        (lambda: ja.photoguard(boom, x, xt[:, :4], key), "x_target"),
        (lambda: ja.mist(boom, boom, x, xt, key, rate=-1.0), "rate"),
        (lambda: ja.sdedit_attack(boom, x, key, strength=1.5), "strength"),
        (lambda: ja.sdedit_attack(boom, x, key, strength=-0.1), "strength"),
        (lambda: ja.pdm_pure_attack(boom, boom, x, key, encode_fn=boom, decode_fn=boom,
                                    strength=0.2, t_star=0.0), "t_star"),
        (lambda: ja.edit_attack(boom, x, key, eps=-1.0), "eps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
