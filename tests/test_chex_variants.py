"""Core primitives give the same results with and without ``jax.jit`` (chex variants).

``chex.variants`` runs each test twice, once through ``jax.jit`` and once eagerly, so a
primitive that only works traced (or only eagerly) fails here; ``chex.assert_trees_all_close``
compares whole pytrees (records, attack results) leaf by leaf.
"""

import chex
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _variables import random_variables

import jaxrob.attacks as ja
import jaxrob.diffusion as jd
from jaxrob.models import DiffusionModel, unet_from_config
from jaxrob.purify import DefendedModel, diffpure

S = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (4, 8, 8, 1), minval=0.05, maxval=0.95)
W = jr.normal(jr.key(2), (64, 10)) * 0.5


def _classifier(x, key=None):
    return jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ W


def _ddpm():
    m = unet_from_config("digits", ch=8, ch_mult=(1, 2), num_groups=4, dropout=0.0,
                         attn_resolutions=(), fast_vjp=True)
    return DiffusionModel(m, random_variables(m, X, jnp.zeros((4,), jnp.int32), seed=1), S)


class PrimitiveVariants(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_sample_is_the_closed_form(self):
        x0 = jr.uniform(jr.key(3), (2, 4, 4, 1), minval=-1, maxval=1)
        noise = jr.normal(jr.key(4), x0.shape)
        n = jnp.array([10, 700])
        out = self.variant(lambda a, b: jd.q_sample(a, n, b, S))(x0, noise)
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(n)][:, None, None, None]
        want = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(noise)
        chex.assert_shape(out, x0.shape)
        chex.assert_trees_all_close(out, want, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_purifier_replays_its_key(self):
        pur = diffpure(_ddpm(), t_star=0.1, num_steps=2)
        f = self.variant(lambda x, k: pur(x, k))
        a, b = f(X, jr.key(5)), f(X, jr.key(5))
        chex.assert_trees_all_equal(a, b)
        chex.assert_trees_all_close(a, pur(X, jr.key(5)), atol=1e-6)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_pgd_stays_in_the_ball(self):
        defended = DefendedModel(_classifier, diffpure(_ddpm(), t_star=0.1, num_steps=2))
        y = jnp.argmax(_classifier(X), -1)
        res = self.variant(lambda x: ja.pgd(defended, x, y, jr.key(6), eps=0.05,
                                            num_steps=1))(X)
        chex.assert_tree_all_finite(res.loss)
        chex.assert_shape(res.x_adv, X.shape)
        assert float(jnp.max(jnp.abs(res.x_adv - X))) <= 0.05 + 1e-6
        assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_ddim_eta0_is_deterministic(self):
        x = jr.normal(jr.key(7), (2, 2, 2, 1))
        eps, z = jr.normal(jr.key(8), x.shape), jr.normal(jr.key(9), x.shape)
        step = self.variant(lambda noise: jd.ddim_step(x, 300, eps, noise, S, eta=0.0))
        chex.assert_trees_all_close(step(z), step(-z), atol=1e-6)
