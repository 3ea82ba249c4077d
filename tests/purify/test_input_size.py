"""Purifier(input_size=...): DiffPure's ImageNet geometry (224 -> 256, purify, 256 -> 224).

The resize is PyTorch's ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
(DiffPure's ``eval_sde_adv.py``), checked against a NumPy transcription of PyTorch's formula
(always; float64, so to 5e-5) and against PyTorch itself (``torch`` marker; 2e-6 at 224 <->
256, torch 2.13 CPU); the purifier runs its model at
``input_size``, returns the input's size, and gradients flow through both resizes.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jaxrob.diffusion as jd
from jaxrob.purify import DefendedModel, diffpure, multistage, resize_images

SCHED = jd.linear_schedule(1000)
X = jr.uniform(jr.key(0), (2, 14, 14, 3), minval=0.05, maxval=0.95)
SEEN = []  # the spatial sizes the eps-model is traced at


def eps_fn(x_t, step):
    SEEN.append(tuple(x_t.shape[1:3]))
    # mixes neighbouring pixels, so the output depends on the resize
    return 0.3 * jnp.tanh(x_t + 0.5 * jnp.roll(x_t, 1, axis=1) - 0.2 * jnp.roll(x_t, 1, axis=2))


def torch_bilinear(x, size):
    """NumPy transcription of PyTorch's upsample_bilinear2d, align_corners=False, no
    antialias: source coordinate ``(d + 0.5) * in / out - 0.5`` clamped at 0, the upper
    neighbour clamped to the last pixel; rows then columns."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    x = np.asarray(x, np.float64)
    r0, r1, lr = axis(x.shape[1], size[0])
    c0, c1, lc = axis(x.shape[2], size[1])
    rows = x[:, r0] * (1 - lr)[None, :, None, None] + x[:, r1] * lr[None, :, None, None]
    return rows[:, :, c0] * (1 - lc)[None, None, :, None] + rows[:, :, c1] * lc[None, None, :, None]


@pytest.mark.parametrize("shape, size", [((14, 14), (16, 16)), ((16, 16), (14, 14)),
                                         ((28, 28), (32, 32)), ((32, 32), (28, 28)),
                                         ((5, 7), (9, 4)), ((224, 224), (256, 256)),
                                         ((256, 256), (224, 224))])
def test_resize_is_pytorch_bilinear_align_corners_false(shape, size):
    x = jr.uniform(jr.key(1), (2, *shape, 3))
    got = resize_images(x, size)
    assert got.shape == (2, *size, 3)
    # float32 source coordinates (JAX's and PyTorch's alike) vs float64 here: ~3e-5 at 256
    np.testing.assert_allclose(got, torch_bilinear(x, size), atol=5e-5)
    assert resize_images(x, shape) is x  # its own size: untouched


@pytest.mark.torch
def test_resize_equals_torch_interpolate():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.array(jr.uniform(jr.key(2), (2, 224, 224, 3)))
    for a, size in ((x, (256, 256)), (np.array(resize_images(x, (256, 256))), (224, 224))):
        want = F.interpolate(torch.from_numpy(a).permute(0, 3, 1, 2), size=size,
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(resize_images(a, size), want, atol=2e-6)


@pytest.mark.parametrize("gradient", ["exact", "bpda"])
def test_purifier_runs_the_model_at_input_size_and_returns_the_input_size(gradient):
    pur = diffpure(eps_fn, SCHED, t_star=0.1, num_steps=3, sampler="ddpm", gradient=gradient,
                   input_size=16)
    plain = diffpure(eps_fn, SCHED, t_star=0.1, num_steps=3, sampler="ddpm", gradient=gradient)
    SEEN.clear()
    key = jr.key(3)
    out = pur(X, key)
    assert out.shape == X.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert SEEN and set(SEEN) == {(16, 16)}
    # = up, the plain purifier at 16, down (the same key, so the same noise)
    want = resize_images(plain(resize_images(X, (16, 16)), key), (14, 14))
    np.testing.assert_allclose(out, want, atol=1e-6)
    # per-example keys (vmapped) too
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(2))
    assert pur(X, keys).shape == X.shape
    # an input already at input_size is not resized: the plain purifier's result, bitwise
    x16 = resize_images(X, (16, 16))
    np.testing.assert_array_equal(pur(x16, key), plain(x16, key))
    m = pur.manifest()
    assert m["input_size"] == 16 and "input_size" not in plain.manifest()
    assert pur.replace(eta=0.0).input_size == 16  # kept by replace


@pytest.mark.parametrize("sampler", ["ddpm", "sde"])
def test_gradients_flow_through_both_resizes(sampler):
    pur = diffpure(eps_fn, SCHED, t_star=0.1, num_steps=3, sampler=sampler, input_size=16)
    w = jr.normal(jr.key(4), X.shape)
    g = jax.grad(lambda x: jnp.sum(pur(x, jr.key(5)) * w))(X)
    assert g.shape == X.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).max()) > 0
    # BPDA: the identity backward in the input's space
    bpda = diffpure(eps_fn, SCHED, t_star=0.1, num_steps=3, sampler=sampler, gradient="bpda",
                    input_size=16)
    gb = jax.grad(lambda x: jnp.sum(bpda(x, jr.key(5)) * w))(X)
    np.testing.assert_allclose(gb, w, atol=1e-6)
    # through a defended classifier, as the attacks see it
    defended = DefendedModel(lambda x, k: x.reshape(x.shape[0], -1)[:, :10], pur)
    gd = jax.grad(lambda x: jnp.sum(defended(x, jr.key(6))))(X)
    assert bool(jnp.all(jnp.isfinite(gd))) and float(jnp.abs(gd).max()) > 0


def test_multistage_and_reconstruction_deviation_with_input_size():
    pur = multistage(eps_fn, SCHED, [(0.05, 2), (0.1, 2)], input_size=16)
    assert pur(X, jr.key(7)).shape == X.shape
    out, dev = pur.reconstruction_deviation(X, X, jr.key(7))
    assert out.shape == X.shape and dev.shape == (pur.num_states, 2)
    np.testing.assert_allclose(out, pur(X, jr.key(7)), atol=1e-5)
    x_t, states = diffpure(eps_fn, SCHED, t_star=0.1, num_steps=2,
                           input_size=16).trajectory(X, jr.key(8))
    assert x_t.shape == (2, 16, 16, 3) and states.shape == (2, 2, 16, 16, 3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "256"])
def test_bad_input_size_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="input_size"):
        diffpure(eps_fn, SCHED, t_star=0.1, num_steps=2, input_size=bad)
