"""ADDT: the mixing ratio, RBGM, CGPO and the sharded fine-tuning step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables
from training_fixtures import TinyEps, synthetic_batch

import jaxrob.diffusion as jd
from jaxrob import _keys as tags
from jaxrob import training as jt
from jaxrob.models import Classifier, unet_from_config
from jaxrob.parallel import make_mesh, replicated, shard_batch

SCHEDULE = jd.linear_schedule(100)


def _slices(a):
    """(B, H, W, C) -> (B, C, H*W): one row per (image, channel)."""
    a = np.asarray(a)
    return np.moveaxis(a, -1, 1).reshape(a.shape[0], a.shape[-1], -1)


# ---------------------------------------------------------------------------- RBGM


def test_rbgm_is_a_permutation_of_the_fresh_sample_in_the_gradients_rank_order():
    grad = jr.normal(jr.key(0), (3, 6, 5, 2)) * jnp.arange(1.0, 3.0).reshape(1, 1, 1, 2)
    key = jr.key(1)
    out = jax.jit(jt.rbgm)(grad, key)
    fresh = jt.normal_noise(key, grad.shape)  # one key: the batch's sample at once
    for o, f, g in zip(_slices(out).reshape(6, -1), _slices(fresh).reshape(6, -1),
                       _slices(grad).reshape(6, -1), strict=True):
        np.testing.assert_array_equal(np.sort(o), np.sort(f))  # exactly the fresh values
        np.testing.assert_array_equal(np.argsort(o), np.argsort(g))  # in the gradient's order
    # (B,) keys: example i's sample from its own key, independent of the rest of the batch
    keys = tags.example_keys(jr.key(2), jnp.arange(3))
    out_b = jt.rbgm(grad, keys)
    for i in range(3):
        np.testing.assert_array_equal(out_b[i], jt.rbgm(grad[i:i + 1], keys[i])[0])
        f = np.sort(_slices(jt.normal_noise(keys[i], grad.shape[1:])[None]), axis=-1)
        np.testing.assert_array_equal(np.sort(_slices(out_b[i:i + 1]), axis=-1), f)
    # no gradient flows through the mapping
    g = jax.grad(lambda x: jnp.sum(jt.rbgm(x, key) * x))(grad)
    np.testing.assert_array_equal(g, jt.rbgm(grad, key))


def test_rbgm_marginal_is_standard_normal():
    stats = pytest.importorskip("scipy.stats")
    # a strongly structured gradient: ramps, a constant channel (all ties) and a spike
    ramp = jnp.broadcast_to(jnp.arange(64.0).reshape(1, 8, 8, 1), (2, 8, 8, 1))
    grad = jnp.concatenate([ramp, jnp.zeros_like(ramp), ramp.at[:, 3, 3].set(1e6)], -1)
    keys = jr.split(jr.key(3), 300)
    out = np.asarray(jax.vmap(lambda k: jt.rbgm(grad, k))(keys)).ravel()
    assert out.size == 300 * grad.size
    assert stats.kstest(out, "norm").pvalue > 1e-3
    assert stats.normaltest(out).pvalue > 1e-3
    np.testing.assert_allclose([out.mean(), out.std()], [0.0, 1.0], atol=0.01)
    # per pixel it is not: the gradient's largest entry always holds its slice's maximum
    per_draw = np.asarray(jax.vmap(lambda k: jt.rbgm(grad, k))(keys))
    assert np.all(per_draw[:, :, 3, 3, 2] == per_draw[..., 2].max(axis=(2, 3)))


# ---------------------------------------------------------------------------- ratio


@pytest.mark.parametrize("kw", [{}, {"lambda_unit": 1.0, "lambda_min": 0.05, "lambda_max": 0.2},
                                {"lambda_unit": 0.0, "lambda_min": 0.1, "lambda_max": 0.1}])
def test_ratio_stays_in_bounds_for_every_step(kw):
    lo, hi = kw.get("lambda_min", 0.0), kw.get("lambda_max", 0.3)
    for schedule in (jd.linear_schedule(1000), jd.cosine_schedule(1000)):
        abar = schedule.alphas_cumprod
        r = np.asarray(jt.addt_ratio(abar, **kw))
        assert r.shape == (1000,) and np.isfinite(r).all()
        assert r.min() >= lo and r.max() <= hi
        assert np.all(np.diff(r) <= 0)  # less signal, less perturbation
        unit = kw.get("lambda_unit", 0.03)
        a = np.asarray(abar, np.float64)
        np.testing.assert_allclose(r, np.clip(unit * np.sqrt(a / (1 - a)), lo, hi), rtol=1e-5)
    np.testing.assert_allclose(jt.addt_ratio(jnp.array([1.0, 0.0]), **kw), [hi, lo])
    # the reference's default: 0.3 for early steps, 0 at the end of the chain
    r = jt.addt_ratio(jd.linear_schedule(1000).alphas_cumprod)
    assert float(r[0]) == pytest.approx(0.3) and float(r[-1]) < 1e-3


# ---------------------------------------------------------------------------- CGPO


def _linear_problem():
    """eps_fn = 0 and a 2-class linear classifier: for label 0 the CE's input gradient always
    points along w1 - w0, whatever x is."""
    images = jr.uniform(jr.key(4), (3, 4, 4, 2), minval=0.2, maxval=0.8)
    w = jr.normal(jr.key(5), (32, 2))
    logits_fn = lambda x, key=None: x.reshape(x.shape[0], -1) @ w
    eps_fn = lambda x, s: jnp.zeros_like(x)
    direction = (w[:, 1] - w[:, 0]).reshape(1, 4, 4, 2)
    return images, logits_fn, eps_fn, jnp.broadcast_to(direction, images.shape)


def test_cgpo_follows_the_classifier_gradient():
    images, logits_fn, eps_fn, direction = _linear_problem()
    n, labels, key = jnp.array([5, 40, 90]), jnp.zeros(3, jnp.int32), jr.key(6)
    kw = dict(schedule=SCHEDULE)
    delta = jt.cgpo_delta(eps_fn, logits_fn, images, n, None, labels, key, num_iters=3, **kw)
    assert delta.shape == images.shape and delta.dtype == jnp.float32
    for d, g in zip(_slices(delta).reshape(6, -1), _slices(direction).reshape(6, -1),
                    strict=True):
        np.testing.assert_array_equal(np.argsort(d), np.argsort(g))
    # the last iteration's RBGM sample, in that order
    last = jt.normal_noise(jr.fold_in(jr.fold_in(key, tags.ADDT_MAP), 2), images.shape)
    np.testing.assert_array_equal(np.sort(_slices(delta), -1), np.sort(_slices(last), -1))
    # so it correlates with the loss's ascent direction more than a Gaussian delta does
    gauss = jt.cgpo_delta(eps_fn, logits_fn, images, n, None, labels, key, num_iters=0, **kw)
    corr = lambda d: np.sum(np.asarray(d * direction), axis=(1, 2, 3))
    assert np.all(corr(delta) > corr(gauss)) and np.all(corr(delta) > 0)
    # pgd_linf: signed steps of 2*4/255 up to the 2*8/255 ball (diffusion space), in the box
    # (a zero forward noise keeps x0_hat bounded: at large n a random one makes x0_hat huge,
    # the softmax saturates and the gradient can underflow to exactly 0)
    zero = jnp.zeros_like(images)
    lin = jt.cgpo_delta(eps_fn, logits_fn, images, n, zero, labels, key, num_iters=1,
                        mapping="pgd_linf", **kw)
    np.testing.assert_allclose(lin, 8 / 255 * np.sign(direction), rtol=1e-6)
    lin = jt.cgpo_delta(eps_fn, logits_fn, images, n, zero, labels, key, num_iters=4,
                        mapping="pgd_linf", linf_eps=0.5, linf_step=0.25, **kw)
    x0 = jd.to_model_space(images)
    expect = np.clip(np.sign(direction), -1 - x0, 1 - x0)  # the box binds before the ball
    np.testing.assert_allclose(lin, expect, rtol=1e-6, atol=1e-6)


def test_cgpo_zero_iterations_is_the_plain_gaussian_delta():
    images, logits_fn, eps_fn, _ = _linear_problem()
    n, labels = jnp.array([5, 40, 90]), jnp.zeros(3, jnp.int32)
    keys = tags.example_keys(jr.key(7), jnp.arange(3))
    args = (eps_fn, logits_fn, images, n, None, labels, keys)
    plain = jax.vmap(lambda k: jt.normal_noise(jr.fold_in(k, tags.ADDT_DELTA), (4, 4, 2)))(keys)
    for kw in [{"num_iters": 0}, {"mapping": "gaussian"}, {"mapping": "gaussian", "num_iters": 0}]:
        np.testing.assert_array_equal(jt.cgpo_delta(*args, schedule=SCHEDULE, **kw), plain)
    assert not np.allclose(jt.cgpo_delta(*args, schedule=SCHEDULE, num_iters=1), plain)
    zero = jt.cgpo_delta(*args, schedule=SCHEDULE, num_iters=0, mapping="pgd_linf")
    np.testing.assert_array_equal(zero, 0.0)


def test_cgpo_sends_no_gradient_to_the_models():
    images, _, _, _ = _linear_problem()
    n, labels = jnp.array([5, 40, 90]), jnp.zeros(3, jnp.int32)

    def f(theta):
        eps_fn = lambda x, s: theta[0] * x
        logits_fn = lambda x, key=None: theta[1] * x.reshape(3, -1)[:, :2]
        d = jt.cgpo_delta(eps_fn, logits_fn, images, n, jnp.zeros_like(images), labels,
                          jr.key(8), schedule=SCHEDULE, num_iters=2)
        return jnp.sum(d * jnp.arange(d.size, dtype=jnp.float32).reshape(d.shape))

    np.testing.assert_array_equal(jax.grad(f)(jnp.array([0.5, 2.0])), 0.0)


# ---------------------------------------------------------------------------- train step


class _TinyClassifier(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


def _unet():
    # the smallest UNet of the family (one level, no attention): the step's compile dominates
    return unet_from_config("digits", ch=8, ch_mult=(1,), num_res_blocks=1, num_groups=4,
                            dropout=0.0, attn_resolutions=())


def _classifier():
    module = _TinyClassifier()
    return Classifier(module, random_variables(module, jnp.zeros((1, 8, 8, 1)), seed=9))


class _Setup:
    """The compiled ADDT steps per (model, mesh size, options) and one initial state per model,
    shared by the tests (compiling the step is most of their time)."""

    cache: dict = {}
    # the UNet compiles ~4x slower than the 2-conv TinyEps (about 35 s vs 10 s per step on the
    # loaded 2-core CPU), so only the test that is about the model's loss uses it
    models = {"unet": _unet(), "tiny": TinyEps()}
    # SGD: Adam's first update is +-lr for any gradient well above its eps, so a parameter
    # whose gradient is ~0 (rounding noise) would move by +-lr depending on the device count
    tx, lr_fn = jt.make_optimizer(name="sgd", learning_rate=1e-2, momentum=0.0)
    host_states: dict = {}

    @classmethod
    def state(cls, name, mesh):
        if name not in cls.host_states:
            # random variables from eval_shape: a jitted module.init compiles for minutes
            variables = random_variables(cls.models[name], jnp.zeros((1, 8, 8, 1)),
                                         jnp.zeros((1,), jnp.int32))
            state = jt.create_train_state(variables, cls.tx, jr.key(0))
            cls.host_states[name] = jax.device_get(state)
        return jax.device_put(cls.host_states[name], replicated(mesh))

    @classmethod
    def get(cls, name, num_devices, **kw):
        k = (name, num_devices, tuple(sorted(kw.items())))
        if k not in cls.cache:
            mesh = make_mesh(num_devices)
            step = jt.make_addt_train_step(cls.models[name].apply, cls.tx, SCHEDULE,
                                           _classifier(), lr_fn=cls.lr_fn, mesh=mesh, **kw)
            cls.cache[k] = (mesh, step)
        mesh, step = cls.cache[k]
        return mesh, cls.state(name, mesh), step


def _batch(i):
    return synthetic_batch(i, batch=8, hw=8, channels=1, num_classes=3)


def test_sharded_addt_step_equals_single_device():
    assert len(jax.devices()) == 8
    out = {}
    for nd in (8, 1):
        mesh, state, step = _Setup.get("tiny", nd, num_iters=2)
        metrics = []
        for i in range(2):
            state, m = step(state, shard_batch(_batch(i), mesh))
            metrics.append(jax.device_get(m))
        out[nd] = (state, metrics, step)
    (s8, m8, step8), (s1, m1, _) = out[8], out[1]
    for a, b in zip(m8, m1, strict=True):
        assert set(a) == {"loss", "grad_norm", "delta_rms", "ratio", "lr"}
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    for tree8, tree1 in [(s8.params, s1.params), (s8.ema_params, s1.ema_params)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     tree8, tree1)
    assert int(s8.step) == 2
    assert len(s8.params["Conv_0"]["kernel"].sharding.device_set) == 8
    assert step8._cache_size() == 1
    # RBGM keeps delta standard normal: its RMS is ~1 (8 * 64 values)
    assert 0.8 < float(m8[0]["delta_rms"]) < 1.2


def test_zero_iterations_is_plain_finetuning_on_the_mixed_target():
    """K = 0: one update on || eps_theta(q_sample(x0, n, mixed)) - mixed ||^2 with
    mixed = sqrt(1 - r^2) eps + r delta and delta ~ N(0, I), written out here from the
    documented randomness (``mapping="gaussian"`` draws the same delta: see
    test_cgpo_zero_iterations_is_the_plain_gaussian_delta)."""
    mesh, state, step = _Setup.get("unet", 1, num_iters=0)
    model, tx = _Setup.models["unet"], _Setup.tx
    batch = _batch(0)

    @jax.jit
    def manual(state, images01):
        k_ex, k_drop = jr.split(state.step_key())
        keys = tags.example_keys(k_ex, jnp.arange(8))
        n = jax.vmap(lambda k: jr.randint(jr.fold_in(k, tags.ADDT_POSITION), (), 0, 100))(keys)
        eps = jax.vmap(lambda k: jt.normal_noise(jr.fold_in(k, tags.ADDT_NOISE),
                                                 (8, 8, 1)))(keys)
        delta = jax.vmap(lambda k: jt.normal_noise(
            jr.fold_in(jr.fold_in(k, tags.ADDT_CGPO), tags.ADDT_DELTA), (8, 8, 1)))(keys)
        abar = SCHEDULE.alphas_cumprod[n][:, None, None, None]
        r = jnp.clip(0.03 * jnp.sqrt(abar) / jnp.sqrt(1 - abar), 0.0, 0.3)
        mixed = jnp.sqrt(1 - r**2) * eps + r * delta
        x_t = jnp.sqrt(abar) * (2 * images01 - 1) + jnp.sqrt(1 - abar) * mixed

        def loss(p):
            out = model.apply({"params": p}, x_t, SCHEDULE.model_steps[n], train=True,
                              rngs={"dropout": k_drop})
            return jnp.mean((out - mixed) ** 2)

        value, grads = jax.value_and_grad(loss)(state.params)
        updates, _ = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        ema = jt.ema_update(state.ema_params, params, state.step, decay=0.9999, power=0.75)
        return value, params, ema

    value, params, ema = manual(state, jnp.asarray(batch["image"]))
    new, metrics = step(state, shard_batch(batch, mesh))
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    for a, b in [(new.params, params), (new.ema_params, ema)]:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    # the EMA's power-3/4 warm-up: decay 0 at the first update, so it equals the params up to
    # the rounding of ema + (params - ema)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                 new.ema_params, new.params)
    assert float(metrics["delta_rms"]) == pytest.approx(1.0, abs=0.2)


def test_step_runs_the_other_options():
    """pgd_linf and share_noise (and no EMA) on the 2-conv TinyEps: finite metrics, the
    pgd_linf ratio is the clipped sqrt(snr) and its delta stays in the Linf ball."""
    model = TinyEps()
    tx, _ = jt.make_addt_optimizer(learning_rate=1e-3)
    mesh = make_mesh(1)
    init = lambda: jt.init_ddpm_state(model, jr.key(0), (8, 8, 1), tx)
    batch = shard_batch(synthetic_batch(0, batch=4), mesh)
    for kw in [{"mapping": "pgd_linf"}, {"share_noise": True, "ema_decay": None}]:
        state = jt.init_on_mesh(init, mesh)
        kernel = np.asarray(state.params["Conv_0"]["kernel"])
        step = jt.make_addt_train_step(model.apply, tx, SCHEDULE, _classifier(), num_iters=2,
                                       mesh=mesh, **kw)
        new, m = step(state, batch)
        assert all(np.isfinite(float(v)) for v in m.values()), (kw, m)
        assert int(new.step) == 1
        assert not np.allclose(new.params["Conv_0"]["kernel"], kernel)
        if kw.get("mapping") == "pgd_linf":
            assert 0.0 < float(m["ratio"]) <= 10.0 and float(m["delta_rms"]) <= 2 * 8 / 255
        else:
            np.testing.assert_array_equal(new.ema_params["Conv_0"]["kernel"], kernel)


def test_addt_optimizer_defaults():
    tx, lr_fn = jt.make_addt_optimizer()
    assert float(lr_fn(0)) == pytest.approx(2e-4) and float(lr_fn(10**6)) == pytest.approx(2e-4)
    params = {"b": jnp.ones(3), "w": jnp.ones((2, 2))}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # zero gradient: only the decoupled weight decay moves the params, biases too (torch AdamW)
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(u, -2e-4 * 1e-6, rtol=1e-5)


def test_ema_power_warmup():
    e, p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(jt.ema_update(e, p, jnp.int32(0), decay=0.9999, power=0.75)["w"],
                               1.0)
    d1 = 1 - 2.0**-0.75
    np.testing.assert_allclose(jt.ema_update(e, p, jnp.int32(1), decay=0.9999, power=0.75)["w"],
                               1 - d1, rtol=1e-6)
    np.testing.assert_allclose(
        jt.ema_update(e, p, jnp.int32(10**9), decay=0.9999, power=0.75)["w"], 1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    ({"lambda_min": 0.4, "lambda_max": 0.3}, "lambda_min <= lambda_max"),
    ({"lambda_max": 1.5}, "lambda_max"),
    ({"lambda_min": -0.1}, "lambda_min"),
    ({"lambda_unit": -1.0}, "lambda_unit"),
    ({"num_iters": -1}, "num_iters"),
    ({"num_iters": 2.5}, "num_iters"),
    ({"mapping": "fgsm"}, "mapping"),
    ({"linf_eps": 0.0}, "linf_eps"),
])
def test_bad_cgpo_options_raise(kw, match):
    images, logits_fn, eps_fn, _ = _linear_problem()
    args = (eps_fn, logits_fn, images, jnp.array([1, 2, 3]), None, jnp.zeros(3, jnp.int32),
            jr.key(0))
    with pytest.raises(ValueError, match=match):
        jt.cgpo_delta(*args, schedule=SCHEDULE, **kw)
    tx, _ = jt.make_addt_optimizer()
    with pytest.raises(ValueError, match=match):
        jt.make_addt_train_step(_unet().apply, tx, SCHEDULE, logits_fn, **kw)
    ratio_kw = {k: v for k, v in kw.items() if k.startswith("lambda")}
    if ratio_kw:
        with pytest.raises(ValueError, match=match):
            jt.addt_ratio(0.5, **ratio_kw)


def test_bad_shapes_and_keys_raise():
    images, logits_fn, eps_fn, _ = _linear_problem()
    n, labels = jnp.array([1, 2, 3]), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="noise"):
        jt.cgpo_delta(eps_fn, logits_fn, images, n, jnp.zeros((3, 4, 4, 1)), labels, jr.key(0),
                      schedule=SCHEDULE)
    with pytest.raises(ValueError, match="key"):
        jt.cgpo_delta(eps_fn, logits_fn, images, n, None, labels, jr.split(jr.key(0), 2),
                      schedule=SCHEDULE)
    with pytest.raises(ValueError, match="rank 4"):
        jt.rbgm(jnp.zeros((3, 16)), jr.key(0))
    tx, _ = jt.make_addt_optimizer()
    with pytest.raises(ValueError, match="ema_power"):
        jt.make_addt_train_step(_unet().apply, tx, SCHEDULE, logits_fn, ema_power=0.0)
