"""SDEdit (pixel = diffpure wrapped, latent through a codec), PDM-Pure, JPEG and crop-and-resize.

Toy stand-ins (tests/_protect_toys.py): a small nonlinear eps-model on a 100-step linear schedule
and an exact linear "autoencoder"; 8x8 images.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _protect_toys import images, toy_codec, toy_eps

import jaxrob._keys as tags
import jaxrob.diffusion as jd
import jaxrob.purify as jp
from jaxrob._jit import filter_jit

B, SIZE, C = 3, 8, 1
# editors and purifiers are pytrees: one compilation per structure (eager scans are slow)
_apply = filter_jit(lambda f, x, key: f(x, key))


@pytest.fixture(scope="module")
def toys():
    return dict(pdm=toy_eps(C, seed=0), ldm=toy_eps(4 * C, seed=2), codec=toy_codec(C),
                x=images(B, SIZE, C, seed=0))


def test_sdedit_at_strength_zero_returns_its_input(toys):
    x, key = toys["x"], jr.key(0)
    assert jp.sdedit(toys["pdm"], x, 0.0, key) is x
    codec = toys["codec"]
    out = jp.sdedit(toys["ldm"], x, 0, key, encode_fn=codec.encode, decode_fn=codec.decode)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)  # exact codec
    assert jp.sdeditor(toys["pdm"], strength=0.0).nfe == 0


def test_pixel_sdedit_is_diffpure_with_t_star_strength(toys):
    # the pixel editor holds diffpure's purifier itself: same leaves, same static options
    for sampler in ("ddpm", "ddim"):
        editor = jp.sdeditor(toys["pdm"], strength=0.3, steps=4, sampler=sampler)
        want = jp.diffpure(toys["pdm"], t_star=0.3, num_steps=4, sampler=sampler)
        got_leaves, got_def = jax.tree.flatten(editor.purifier)
        want_leaves, want_def = jax.tree.flatten(want)
        assert got_def == want_def and editor.nfe == 4 and not editor.latent
        for a, b in zip(got_leaves, want_leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _to01(z):
    return jd.from_model_space(z, clip=False)


@pytest.mark.parametrize("sampler", [pytest.param("ddpm", marks=pytest.mark.slow), "ddim"])
def test_latent_sdedit_with_the_pixel_codec_is_the_pixel_sdedit(toys, sampler):
    # the latent path with encode = 2x - 1, decode = (z + 1) / 2 runs the same chain with the
    # same keys as the pixel path (the purifier)
    x, keys = toys["x"], jr.split(jr.key(2), B)
    kw = dict(steps=3, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0)
    pixel = _apply(jp.sdeditor(toys["pdm"], strength=0.4, **kw), x, keys)
    latent = _apply(jp.sdeditor(toys["pdm"], strength=0.4, encode_fn=jd.to_model_space,
                                decode_fn=_to01, **kw), x, keys)
    np.testing.assert_allclose(np.asarray(latent), np.asarray(pixel), atol=1e-6)
    # each example is edited with its own key alone: permuting the batch permutes the edits
    # (same shapes, so the same compilation)
    perm = np.array([2, 0, 1])
    latent_perm = _apply(jp.sdeditor(toys["pdm"], strength=0.4, encode_fn=jd.to_model_space,
                                     decode_fn=_to01, **kw), x[perm], keys[perm])
    np.testing.assert_allclose(np.asarray(latent_perm), np.asarray(latent)[perm], atol=1e-6)
    assert float(latent.min()) >= 0 and float(latent.max()) <= 1


def test_sdeditor_bookkeeping(toys):
    codec = toys["codec"]
    edit = jp.sdeditor(toys["ldm"], strength=0.5, steps=3, encode_fn=codec.encode,
                       decode_fn=codec.decode)
    assert edit.latent and edit.nfe == 3 and edit.chain.num_steps == 3
    assert edit.manifest() == {"strength": 0.5, "steps": 3, "sampler": "ddpm", "eta": 0.0,
                               "latent": True, "nfe": 3}


def test_pdm_pure_defaults_are_the_papers(toys):
    pure = jp.pdm_pure(toys["pdm"])
    assert pure.stages == ((0.1, 10),) and pure.sampler == "ddpm" and pure.gradient == "exact"


@pytest.mark.slow  # ~5-15 s (two chains compiled); the attacks' tests run PurifyThenEdit too
def test_pdm_pure_then_edit_keys(toys):
    codec, x, key = toys["codec"], toys["x"], jr.key(4)
    pure = jp.pdm_pure(toys["pdm"], num_steps=2)
    edit = jp.sdeditor(toys["ldm"], strength=0.2, steps=2, encode_fn=codec.encode,
                       decode_fn=codec.decode)

    @filter_jit
    def both(pure, edit, x):
        got = jp.PurifyThenEdit(pure, edit)(x, key)
        want = edit(pure(x, jr.fold_in(key, tags.PROTECT_PURIFY)),
                    jr.fold_in(key, tags.PROTECT_EDIT))
        return got, want

    got, want = both(pure, edit, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(x))


def test_jpeg_and_crop_resize_baselines():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.uniform(0, 1, (2, 16, 16, 3)), axis=1), axis=2)
    x = jnp.asarray(smooth / smooth.max(axis=(1, 2, 3), keepdims=True), jnp.float32)
    hi = jp.jpeg(x, quality=95)
    lo = jp.jpeg(x, quality=10)
    assert hi.shape == x.shape and hi.dtype == np.float32 and 0 <= hi.min() <= hi.max() <= 1
    err = lambda a: float(np.abs(a - np.asarray(x)).mean())
    assert err(hi) < 0.03 and err(lo) > err(hi)
    gray = jp.jpeg(x[..., :1], quality=65)
    assert gray.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(np.asarray(jp.crop_resize(x, crop=0.0)), np.asarray(x), atol=1e-6)
    const = jnp.full((1, 10, 10, 1), 0.25, jnp.float32)
    np.testing.assert_allclose(np.asarray(jp.crop_resize(const)), 0.25, atol=1e-6)
    cropped = jp.crop_resize(x, crop=0.2)
    assert cropped.shape == x.shape and not np.allclose(np.asarray(cropped), np.asarray(x))


class _Boom:
    schedule = jd.linear_schedule(100)

    def __call__(self, *args):
        raise AssertionError("called")


def test_bad_sdedit_inputs_raise_before_any_work(toys):
    x, key, boom = toys["x"], jr.key(0), _Boom()
    for s in (-0.1, 1.5, float("nan"), "half", True, None):
        with pytest.raises(ValueError, match="strength"):
            jp.sdedit(boom, x, s, key)
    with pytest.raises(ValueError, match="encode_fn"):
        jp.sdedit(boom, x, 0.2, key, encode_fn=boom)
    with pytest.raises(ValueError, match="steps"):
        jp.sdedit(boom, x, 0.2, key, steps=0)
    with pytest.raises(ValueError, match="sampler"):
        jp.sdedit(boom, x, 0.2, key, sampler="sde")
    with pytest.raises(ValueError, match="x"):
        jp.sdedit(boom, x * 2.0, 0.2, key)
    with pytest.raises(ValueError, match="key"):
        jp.sdedit(boom, x, 0.2, jr.split(key, B + 1))
    with pytest.raises(ValueError, match="quality"):
        jp.jpeg(x, quality=0)
    with pytest.raises(ValueError, match="crop"):
        jp.crop_resize(x, crop=1.0)
