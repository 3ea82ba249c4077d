"""DDPM train step: sharding invariance, compile-once, EMA, denoising metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_fixtures import TinyEps, synthetic_batch

import jaxrob.diffusion as jd
from jaxrob import training as jt
from jaxrob.parallel import make_mesh, shard_batch


class _Setup:
    """One compiled init and train step per mesh size, shared by the tests of this module."""

    cache: dict = {}

    @classmethod
    def get(cls, num_devices):
        if num_devices not in cls.cache:
            mesh = make_mesh(num_devices)
            model = TinyEps()
            tx, lr_fn = jt.make_optimizer(learning_rate=1e-2, warmup_steps=2,
                                          weight_decay=1e-4, grad_clip=1.0, total_steps=10)
            init = lambda: jt.init_ddpm_state(model, jax.random.key(0), (8, 8, 1), tx)
            step = jt.make_ddpm_train_step(model.apply, tx, jd.linear_schedule(100),
                                           ema_decay=0.9, lr_fn=lr_fn, mesh=mesh)
            cls.cache[num_devices] = (mesh, init, step)
        mesh, init, step = cls.cache[num_devices]
        return mesh, jt.init_on_mesh(init, mesh), step


def _run(num_devices, n, batch=None):
    mesh, state, step = _Setup.get(num_devices)
    out = []
    for i in range(n):
        b = synthetic_batch(i) if batch is None else batch
        state, m = step(state, shard_batch(b, mesh))
        out.append(m)
    return state, jax.device_get(out), step


def test_sharded_step_equals_single_device():
    assert len(jax.devices()) == 8
    s8, m8, _ = _run(8, 3)
    s1, m1, _ = _run(1, 3)
    for a, b in zip(m8, m1, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    for tree8, tree1 in [(s8.params, s1.params), (s8.ema_params, s1.ema_params)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     tree8, tree1)
    assert int(s8.step) == 3
    assert len(s8.params["Conv_0"]["kernel"].sharding.device_set) == 8


def test_train_step_compiles_once_and_donates():
    mesh, state, step = _Setup.get(8)
    old = state
    for i in range(5):
        state, metrics = step(state, shard_batch(synthetic_batch(i), mesh))
    jax.block_until_ready(state)
    assert step._cache_size() == 1
    assert old.params["Conv_0"]["kernel"].is_deleted()  # donated
    assert set(metrics) == {"loss", "grad_norm", "lr"}
    np.testing.assert_allclose(float(metrics["lr"]), 1e-2, rtol=1e-6)  # warm-up done at step 4


def test_ema_update():
    e = {"w": jnp.zeros(3)}
    p = {"w": jnp.ones(3)}
    np.testing.assert_allclose(jt.ema_update(e, p, jnp.int32(10**6), decay=0.9)["w"], 0.1,
                               rtol=1e-6)
    # warm-up: at step 0 the decay is min(0.9, 1/10) = 0.1
    np.testing.assert_allclose(jt.ema_update(e, p, jnp.int32(0), decay=0.9)["w"], 0.9,
                               rtol=1e-6)
    np.testing.assert_allclose(
        jt.ema_update(e, p, jnp.int32(0), decay=0.9, warmup=False)["w"], 0.1, rtol=1e-6)


def test_loss_decreases_on_fixed_batch():
    _, out, _ = _run(8, 30, batch=synthetic_batch(0))
    losses = [float(m["loss"]) for m in out]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_denoising_mse_properties():
    images = np.random.default_rng(0).uniform(size=(20, 8, 8, 1)).astype(np.float32)
    schedule = jd.linear_schedule(1000)
    zero_eps = lambda x, s: jnp.zeros_like(x)
    r = jt.denoising_mse(zero_eps, images, jax.random.key(1), schedule, 0.3, batch_size=8)
    # eps_hat = 0: eps-MSE is E[eps^2] ~ 1 and the one-step estimate is x_t / sqrt(abar)
    assert r["step"] == 299 and r["num_images"] == 20
    assert 0.8 < r["eps_mse"] < 1.2
    np.testing.assert_allclose(r["x0_mse"], r["noisy_mse"], rtol=1e-6)
    # independent of batch size and device count (per-example fold_in keys)
    r2 = jt.denoising_mse(zero_eps, images, jax.random.key(1), schedule, 0.3, batch_size=16,
                          mesh=make_mesh(1))
    np.testing.assert_allclose(r2["eps_mse"], r["eps_mse"], rtol=1e-6)
    # several levels in one compiled program == one level at a time
    both = jt.denoising_mse(zero_eps, images, jax.random.key(1), schedule, (0.1, 0.3),
                            batch_size=8)
    assert [b["step"] for b in both] == [99, 299]
    np.testing.assert_allclose(both[1]["eps_mse"], r["eps_mse"], rtol=1e-6)
    np.testing.assert_allclose(both[1]["x0_mse"], r["x0_mse"], rtol=1e-6)
    with pytest.raises(ValueError, match="t_star"):
        jt.denoising_mse(zero_eps, images, jax.random.key(1), schedule, 1.5)


@pytest.mark.parametrize("kw, match", [
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"warmup_steps": -5}, "warmup_steps"),
    ({"name": "rmsprop"}, "optimizer"),
    ({"lr_schedule": "linear"}, "lr schedule"),
])
def test_optimizer_rejects_nonsense(kw, match):
    with pytest.raises(ValueError, match=match):
        jt.make_optimizer(**{"learning_rate": 1e-3, **kw})


def test_bad_ema_decay():
    tx, _ = jt.make_optimizer(learning_rate=1e-3)
    with pytest.raises(ValueError, match="ema_decay"):
        jt.make_ddpm_train_step(TinyEps().apply, tx, jd.linear_schedule(10), ema_decay=1.5)
