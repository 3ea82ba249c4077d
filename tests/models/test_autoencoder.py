"""The KL autoencoder (diffusers AutoencoderKL layout), its diffusers import, and the latent
diffusion pytrees: parity with diffusers on a small random configuration, shapes, the posterior
sample's moments, exports through ``jaxrob.models.load``, and bad input refused before any work.

Parameters come from ``random_variables`` (no init program to compile); every network here is
a few thousand parameters, so each compiled call takes a second or two.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _variables import random_variables

import jaxrob
from jaxrob.checkpoint import save_params
from jaxrob.models import (
    AUTOENCODER_CONFIGS,
    Autoencoder,
    AutoencoderKL,
    DiffusionModel,
    LatentDiffusionModel,
    autoencoder_config_from_diffusers,
    autoencoder_from_config,
    autoencoder_from_diffusers_state_dict,
    load,
    schedule_from_metadata,
    unet_from_metadata,
)

# A small diffusers AutoencoderKL: two levels (f = 2), shortcuts at the level change, two
# ResBlocks per encoder level (three per decoder level), mid attention.
DIFFUSERS_SMALL = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=2,
    latent_channels=4, norm_num_groups=4, sample_size=16,
)
# The jaxrob test network: MNIST-shaped, f = 4 (28 -> 14 -> 7), 7x7x3 codes.
AE = dict(block_out_channels=(4, 8, 8), layers_per_block=1, latent_channels=3, num_groups=4,
          in_ch=1, image_size=28)
UNET = {"name": "unet", "config": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1,
                                   "attn_resolutions": [], "dropout": 0.0, "num_groups": 4,
                                   "in_ch": 3, "image_size": 7}}
DIFFUSION = {"schedule": "linear", "num_steps": 100, "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture(scope="module")
def ae():
    module = autoencoder_from_config(AE)
    variables = random_variables(module, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
                                 seed=0)
    return Autoencoder(module, variables, scaling_factor=0.7, shift_factor=0.2)


@pytest.fixture(scope="module")
def ldm(ae):
    unet = unet_from_metadata(UNET)
    variables = random_variables(unet, jax.ShapeDtypeStruct((1, 7, 7, 3), jnp.float32),
                                 jax.ShapeDtypeStruct((1,), jnp.int32), seed=1)
    ddpm = DiffusionModel(unet, variables, schedule_from_metadata(DIFFUSION))
    return LatentDiffusionModel(ae, ddpm)


@pytest.fixture(scope="module")
def images():
    return jr.uniform(jr.key(0), (3, 28, 28, 1))


@pytest.fixture(scope="module")
def fns():
    """The compiled calls, shared by the tests (pytrees in, so any parameters reuse them)."""
    return {"encode": jax.jit(lambda m, x: m.encode(x)),
            "latent": jax.jit(lambda m, x, k: m.encode_latent(x, k)),
            "decode": jax.jit(lambda m, z: m.decode(z))}


# --------------------------------------------------------------------------- diffusers parity


@pytest.fixture(scope="module")
def diffusers_vae():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**DIFFUSERS_SMALL).eval()
    with torch.no_grad():  # move every weight off its init (GroupNorm 1/0, etc.)
        for p in vae.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.mark.torch
@pytest.mark.diffusers
def test_autoencoder_matches_diffusers_small(diffusers_vae):
    torch = pytest.importorskip("torch")
    cfg = autoencoder_config_from_diffusers(diffusers_vae.config)
    module = AutoencoderKL(**cfg)
    variables = autoencoder_from_diffusers_state_dict(diffusers_vae.state_dict(), module)
    x01 = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    x_t = torch.from_numpy(2.0 * x01.transpose(0, 3, 1, 2) - 1.0)
    with torch.no_grad():
        post = diffusers_vae.encode(x_t).latent_dist
        z_t = post.mean + 0.5 * torch.randn_like(post.mean)
        dec = diffusers_vae.decode(z_t).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)

    model = Autoencoder(AutoencoderKL(**cfg), variables, scaling_factor=1.0)
    mean, logvar = jax.jit(lambda m, x: m.encode(x))(model, jnp.asarray(x01))
    z = nhwc(z_t)
    out = jax.jit(lambda m, z: m.decode(z, clip=False))(model, jnp.asarray(z))
    assert mean.shape == (2, 8, 8, 4) and out.shape == x01.shape
    for got, ref in ((mean, post.mean), (logvar, post.logvar), (2 * out - 1, dec)):
        ref = nhwc(ref)
        assert np.abs(ref).max() > 0.1  # a non-trivial output
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-4)


@pytest.mark.torch
@pytest.mark.diffusers
def test_diffusers_import_errors_and_legacy_names(diffusers_vae):
    sd = {k: v.numpy() for k, v in diffusers_vae.state_dict().items()}
    module = AutoencoderKL(**autoencoder_config_from_diffusers(diffusers_vae.config))
    ref = autoencoder_from_diffusers_state_dict(sd, module)
    # older exports: query/key/value/proj_attn names, stored as 1x1 convs
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v[:, :, None, None] if (".attentions." in k and v.ndim == 2) else v
    got = autoencoder_from_diffusers_state_dict(legacy, module)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)

    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.2.conv2.bias"}
    extra = {**missing, "encoder.down_blocks.0.attentions.0.to_q.weight": np.zeros((8, 8))}
    with pytest.raises(ValueError, match=r"(?s)missing.*decoder\.up_blocks\.1\.resnets\.2\."
                                         r"conv2\.bias.*unexpected.*down_blocks\.0\.attentions"):
        autoencoder_from_diffusers_state_dict(extra, module)
    # one level fewer in the module: the state dict's deeper weights are left over, and listed
    with pytest.raises(ValueError, match=r"unexpected key"):
        autoencoder_from_diffusers_state_dict(sd, AutoencoderKL(
            **{**autoencoder_config_from_diffusers(diffusers_vae.config),
               "block_out_channels": (8,)}))


def test_diffusers_config_translation_and_sd_size():
    sd_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                  norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    cfg = autoencoder_config_from_diffusers(sd_cfg)
    assert cfg == {**AUTOENCODER_CONFIGS["sd"], "out_ch": 3, "use_quant_conv": True,
                   "use_post_quant_conv": True, "mid_attention": True, "image_size": None}
    module = AutoencoderKL(**cfg)
    shapes = jax.eval_shape(module.init, jr.key(0),
                            jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    # diffusers' AutoencoderKL of Stable Diffusion v1: 83,653,863 parameters
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 83_653_863
    assert module.latent_shape((512, 512, 3)) == (64, 64, 4)
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        autoencoder_config_from_diffusers({**sd_cfg, "up_block_types": ("UpBlock2D",) * 4})
    with pytest.raises(ValueError, match="latents_mean"):
        autoencoder_config_from_diffusers({**sd_cfg, "latents_mean": [0.0] * 4})


# --------------------------------------------------------------------------- shapes, sampling


def test_encode_decode_shapes_and_ranges(ae, ldm, images, fns):
    mean, logvar = fns["encode"](ae, images)
    assert mean.shape == logvar.shape == (3, 7, 7, 3)
    assert ae.latent_shape((28, 28, 1)) == ldm.latent_shape == (7, 7, 3)
    z = fns["latent"](ae, images, None)  # the posterior mean, scaled and shifted
    np.testing.assert_allclose(z, (mean - 0.2) * 0.7, rtol=1e-5, atol=1e-6)
    x = fns["decode"](ae, z)
    assert x.shape == images.shape and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # decode undoes the scaling: the same decoder output as the unscaled mean's
    unit = ae.replace(scaling_factor=1.0, shift_factor=0.0)  # same compiled call
    np.testing.assert_allclose(x, fns["decode"](unit, mean), atol=1e-5)
    # the LDM's eps-model runs on codes
    eps = jax.jit(lambda m, z, n: m(z, n))(ldm, z, jnp.array([0, 5, 99]))
    assert eps.shape == z.shape and ldm.schedule.num_steps == 100
    leaves = jax.tree.leaves(ldm)
    assert leaves and all(isinstance(v, jax.Array | float) for v in leaves)


def test_posterior_sample_moments_and_per_example_keys(ae, images, fns):
    mean, logvar = fns["encode"](ae, images)
    keys = jr.split(jr.key(3), 2000)
    z = jax.jit(jax.vmap(lambda k: ae.encode_latent(images, k)))(keys)  # (2000, 3, 7, 7, 3)
    want_mean = ((mean - 0.2) * 0.7)[None]
    want_std = (jnp.exp(0.5 * logvar) * 0.7)[None]
    assert float(want_std.min()) > 1e-3  # a real spread to measure
    # standard error of the mean std/sqrt(2000) ~ 0.022 std; of the std ~ 0.016 std
    np.testing.assert_array_less(jnp.abs(z.mean(0) - want_mean[0]), 0.11 * want_std[0])
    np.testing.assert_array_less(jnp.abs(z.std(0) / want_std[0] - 1.0), 0.08)
    # Gaussian: standardised draws have kurtosis 3 (pooled over every code entry)
    u = (z - want_mean) / want_std
    assert abs(float(jnp.mean(u**4)) - 3.0) < 0.1
    # a batch of keys: example i's code comes from its own key and image only
    k3 = jr.split(jr.key(4), 3)
    fwd = fns["latent"](ae, images, k3)
    back = fns["latent"](ae, images[::-1], k3[::-1])
    np.testing.assert_allclose(back, fwd[::-1], atol=1e-6)
    assert not np.allclose(fwd[0], fwd[1])


@pytest.mark.slow  # ~20 s CPU: two more encoder programs; the train_ldm smoke test runs them too
def test_scaling_factor_gives_unit_variance_codes(ae, images, fns):
    from jaxrob.parallel import make_mesh
    from jaxrob.training import autoencoder_loss, encode_dataset, latent_scaling_factor

    key, mesh = jr.key(7), make_mesh(1)
    s = latent_scaling_factor(ae, images, key, batch_size=4, mesh=mesh)
    scaled = ae.replace(scaling_factor=s, shift_factor=0.0)
    z, std = encode_dataset(scaled, images, key, batch_size=4, mesh=mesh)
    assert np.std(z.astype(np.float64)) == pytest.approx(1.0, rel=1e-4)
    # the draws are encode_latent's with per-example keys fold_in(key, i)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(3))
    np.testing.assert_allclose(z, fns["latent"](scaled, images, keys), rtol=1e-5, atol=1e-5)
    mean, logvar = fns["encode"](ae, images)
    np.testing.assert_allclose(std, jnp.exp(0.5 * logvar) * s, rtol=1e-5)
    # the training loss: per-pixel L1 of a posterior draw's reconstruction + weighted KL
    loss, parts = jax.jit(lambda p, x: autoencoder_loss(p, x, key, module=ae.module,
                                                        kl_weight=0.5))(
        ae.variables["params"], images)
    assert float(loss) == pytest.approx(float(parts["recon"] + 0.5 * parts["kl"] / 784),
                                        rel=1e-5)
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    assert float(parts["kl"]) == pytest.approx(float(kl.mean()), rel=1e-4)
    assert 0.0 < float(parts["mse"]) < 1.0


def test_exports_load_in_one_call(ae, ldm, images, fns, tmp_path):
    ae_meta = {"config": AE, "scaling_factor": 0.7, "shift_factor": 0.2}
    save_params(tmp_path / "ae", ae.variables, {"kind": "autoencoder", "autoencoder": ae_meta,
                                                "data": {"image_shape": [28, 28, 1]}})
    save_params(tmp_path / "ldm", {"autoencoder": ae.variables,
                                   "diffusion": ldm.diffusion.variables},
                {"kind": "ldm", "autoencoder": ae_meta, "model": UNET, "diffusion": DIFFUSION,
                 "data": {"image_shape": [28, 28, 1]}})
    ae2 = load(tmp_path / "ae")
    ldm2 = jaxrob.models.load(tmp_path / "ldm", kind="ldm")
    assert isinstance(ae2, Autoencoder) and isinstance(ldm2, LatentDiffusionModel)
    assert ldm2.image_shape == (28, 28, 1) and ldm2.num_params == ldm.num_params
    z = fns["latent"](ldm2, images, None)
    np.testing.assert_allclose(z, fns["latent"](ae, images, None), atol=1e-6)
    np.testing.assert_allclose(fns["decode"](ae2, z), fns["decode"](ae, z), atol=1e-6)
    fast = load(tmp_path / "ldm", fast_vjp=True)
    assert fast.autoencoder.module.fast_vjp and fast.diffusion.module.fast_vjp
    with pytest.raises(ValueError, match="expected a 'ddpm'"):
        load(tmp_path / "ldm", kind="ddpm")


# --------------------------------------------------------------------------- bad input


def test_bad_images_and_codes_are_refused(ae, ldm, images):
    with pytest.raises(ValueError, match=r"divisible by .* = 4"):
        ae.encode(jnp.zeros((1, 30, 30, 1)))
    with pytest.raises(ValueError, match="configured for 28x28"):
        ae.encode(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="1-channel"):
        ae.encode_latent(jnp.zeros((1, 28, 28, 3)))
    with pytest.raises(ValueError, match=r"values in \[0.0, 1.0\]"):
        ae.encode(images * 2.0)
    with pytest.raises(ValueError, match="3 keys"):
        ae.encode_latent(images, jr.split(jr.key(0), 2))
    with pytest.raises(ValueError, match="expected 3 channels"):
        ae.decode(jnp.zeros((1, 7, 7, 4)))
    with pytest.raises(ValueError, match="decodes 7x7 latent codes"):
        ldm.decode(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderKL(**{**AE, "image_size": None}).latent_shape((30, 30, 1))
    with pytest.raises(ValueError, match="multiples of num_groups"):
        autoencoder_from_config(AE, block_out_channels=(4, 6))
    with pytest.raises(ValueError, match="scaling_factor"):
        Autoencoder(ae.module, ae.variables, scaling_factor=0.0)


def test_mismatched_latent_diffusion_model_is_refused(ae, ldm):
    ddpm = ldm.diffusion
    for change, match in (({"in_ch": 4}, "takes 4-channel inputs"),
                          ({"image_size": 8}, "configured for 8x8"),
                          ({"ch_mult": (1, 2), "image_size": None}, "downsamples by 2")):
        wrong = ddpm.replace(module=ddpm.module.clone(**change))
        with pytest.raises(ValueError, match=match):
            LatentDiffusionModel(ae, wrong)
    with pytest.raises(ValueError, match="divisible"):
        LatentDiffusionModel(ae, ddpm, image_shape=(30, 30, 1))
    with pytest.raises(ValueError, match="no image_size"):
        LatentDiffusionModel(ae.replace(module=ae.module.clone(image_size=None)), ddpm)
    with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 1\)"):
        ldm.encode(jnp.zeros((1, 14, 14, 1)))


# --------------------------------------------------------------------------- committed exports


def test_committed_mnist_exports(data_dir, fns):
    import pathlib

    from jaxrob.data import load_dataset

    repo = pathlib.Path(__file__).resolve().parents[2]
    ae = load(repo / "checkpoints" / "mnist_vae", kind="autoencoder")
    ldm = load(repo / "checkpoints" / "mnist_ldm", kind="ldm")
    x = jnp.asarray(load_dataset("mnist", "test", data_dir=str(data_dir)).images[:3])
    x_hat = fns["decode"](ae, fns["latent"](ae, x, None))
    psnr = 10 * np.log10(1.0 / np.mean(np.square(np.asarray(x_hat - x)), axis=(1, 2, 3)))
    assert psnr.min() > 18.0, psnr  # the export measured 24.5 dB on the whole test set
    # the LDM holds that autoencoder, and its UNet runs on its 7x7x4 codes
    assert ldm.latent_shape == (7, 7, 4)
    jax.tree.map(np.testing.assert_array_equal, ldm.autoencoder.variables, ae.variables)
    assert float(ldm.autoencoder.scaling_factor) == float(ae.scaling_factor)
