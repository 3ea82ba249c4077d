"""torchvision's ImageNet ResNet in Flax: parity with torchvision's own resnet.py, import errors,
the export round trip and the one-call ``.pth`` load.

The reference is torchvision's ``models/resnet.py`` itself (see ``_torchvision_resnet``), on random
weights with randomised BatchNorm affine parameters and running statistics (eval mode). CI runs
a small bottleneck ResNet (stages (2, 1, 1, 1): a stride-1 and three stride-2 projections and an
identity block); the full ResNet-50 at 224x224 is marked slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrob
from jaxrob.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    ResNet,
    convert_torchvision_resnet,
    load_torchvision_resnet,
    resnet_from_torchvision_state_dict,
)
from jaxrob.models._torch_import import flax_to_torch_shape

SMALL = {"block": "bottleneck", "stage_sizes": (2, 1, 1, 1)}


@jax.jit
def _logits(model, x):  # one compilation per module configuration, shared by the tests
    return model(x)


def _to_torch_input(x_BHWC):
    x = (x_BHWC - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _fake_state_dict(module: ResNet, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-named state dict of ``module``'s shapes, from the Flax tree (no torch)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}
    rng = np.random.default_rng(seed)
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = [p.key for p in path]
        mods = [f"{h}.{i}" if s and i.isdigit() else n
                for n in names[1:-1] for h, s, i in [n.rpartition("_")]]
        shape = flax_to_torch_shape(leaf.shape, names[-1])
        value = rng.uniform(0.5, 1.5, shape) if names[-1] == "var" else rng.normal(0, 0.1, shape)
        sd[".".join([*mods, suffix[names[-1]]])] = value.astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def small_sd():
    return _fake_state_dict(ResNet(num_classes=10, **SMALL))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- parity (torch)


@pytest.mark.torch
def test_small_resnet_matches_torchvision(images):
    import torch
    from _torchvision_resnet import randomise_, torchvision_resnet

    tv, _ = torchvision_resnet()
    ref_model = randomise_(tv.ResNet(tv.Bottleneck, list(SMALL["stage_sizes"]), num_classes=10))
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(_to_torch_input(images))).numpy()
    module, variables = resnet_from_torchvision_state_dict(ref_model.state_dict(), SMALL)
    assert module == ResNet(num_classes=10, **SMALL) and "batch_stats" in variables
    out = np.asarray(_logits(Classifier(module, variables), jnp.asarray(images)))
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_pth_file_loads_in_one_call(tmp_path, small_sd, images):
    import torch

    path = tmp_path / "resnet_small.pth"
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in small_sd.items()}, path)
    clf = load_torchvision_resnet(path, SMALL)
    ref_module, ref_vars = resnet_from_torchvision_state_dict(small_sd, SMALL)
    assert isinstance(clf, Classifier) and clf.module == ref_module
    assert clf.num_params == sum(v.size for k, v in small_sd.items() if "running" not in k)
    np.testing.assert_array_equal(np.asarray(clf.variables["batch_stats"]["bn1"]["var"]),
                                  ref_vars["batch_stats"]["bn1"]["var"])


@pytest.mark.torch
def test_input_size_resize_is_torchs_bilinear_interpolate():
    # ResNet(input_size=...) resizes with jax.image.resize(bilinear, antialias=False): DiffPure's
    # F.interpolate(mode="bilinear", align_corners=False), both ways between 224 and 256
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(3).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    for src, dst in ((256, 224), (224, 256)):
        xs = x[:, :src, :src]
        want = F.interpolate(torch.from_numpy(xs.transpose(0, 3, 1, 2)), size=(dst, dst),
                             mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = jax.image.resize(jnp.asarray(xs), (1, dst, dst, 3), "bilinear", antialias=False)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.slow  # ~1 min of XLA compilation; test_small_resnet_matches_torchvision covers it
@pytest.mark.torch
def test_full_resnet50_matches_torchvision_at_224():
    import torch
    from _torchvision_resnet import randomise_, torchvision_resnet

    tv, where = torchvision_resnet()
    ref_model = randomise_(tv.resnet50(), seed=3)
    x = np.random.default_rng(2).uniform(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(_to_torch_input(x))).numpy()
    module, variables = resnet_from_torchvision_state_dict(ref_model.state_dict(), "resnet50")
    clf = Classifier(module, variables)
    assert clf.num_params == 25_557_032 == sum(p.numel() for p in ref_model.parameters())
    out = np.asarray(jax.jit(lambda m, x: m(x))(clf, jnp.asarray(x)))
    err = float(np.abs(out - ref).max())
    print(f"ResNet-50 224x224 batch 2 vs {where}: max abs error {err:.3g}, "
          f"max |logit| {np.abs(ref).max():.3g}")
    assert out.shape == (2, 1000) and err < 1e-4


# ----------------------------------------------------------------------------- export, errors


def test_export_round_trip_through_load(tmp_path, small_sd, images):
    src = tmp_path / "small.npz"
    np.savez(src, **small_sd)
    export = convert_torchvision_resnet(src, tmp_path / "export", SMALL)
    clf = jaxrob.models.load(export)
    direct = load_torchvision_resnet(src, SMALL)
    assert isinstance(clf, Classifier) and clf.module == direct.module
    a = np.asarray(_logits(clf, jnp.asarray(images)))
    b = np.asarray(_logits(direct, jnp.asarray(images)))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 10) and np.isfinite(a).all()
    # per-example: the logits of one image do not depend on the other (eval-mode BN)
    np.testing.assert_allclose(np.asarray(_logits(direct, jnp.asarray(images[::-1]))), b[::-1],
                               atol=1e-5)


def test_missing_and_extra_keys_are_listed(small_sd):
    sd = dict(small_sd)
    del sd["layer2.0.downsample.1.running_var"], sd["fc.bias"]
    sd["layer1.0.se.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        resnet_from_torchvision_state_dict(sd, SMALL)
    msg = str(e.value)
    assert "2 key(s) missing" in msg and "layer2.0.downsample.1.running_var" in msg
    assert "fc.bias" in msg and "layer1.0.se.weight" in msg


def test_shape_mismatch_is_named(small_sd):
    sd = dict(small_sd)
    sd["layer3.0.conv2.weight"] = np.zeros((256, 128, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"layer3\.0\.conv2\.weight: expected shape "
                                         r"\(256, 256, 3, 3\), got \(256, 128, 3, 3\)"):
        resnet_from_torchvision_state_dict(sd, SMALL)


def test_another_architecture_is_refused(small_sd):
    basic = _fake_state_dict(ResNet(block="basic", stage_sizes=(2, 2, 2, 2), num_classes=5))
    with pytest.raises(ValueError, match=r"holds resnet18 \(basic blocks, stages \(2, 2, 2, 2\)\)"
                                         r", expected bottleneck blocks, stages \(3, 4, 6, 3\)"):
        resnet_from_torchvision_state_dict(basic, "resnet50")
    with pytest.raises(ValueError, match=r"stages \(2, 1, 1, 1\).*expected.*\(3, 4, 6, 3\)"):
        resnet_from_torchvision_state_dict(small_sd, "resnet50")
    wrn = {"conv1.weight": np.zeros((16, 3, 3, 3)), "block1.layer.0.bn1.weight": np.zeros(16)}
    with pytest.raises(ValueError, match="not a torchvision ResNet state dict"):
        resnet_from_torchvision_state_dict(wrn, "resnet50")
    with pytest.raises(ValueError, match="arch: expected one of"):
        resnet_from_torchvision_state_dict(small_sd, "resnet51")


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        load_torchvision_resnet(tmp_path / "resnet50-0676ba61.pth")


def test_resnet50_shapes_and_parameter_count():
    # torchvision's resnet50: 25,557,032 parameters; eval_shape only (no compilation)
    shapes = jax.eval_shape(ResNet().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert n == 25_557_032
    out = jax.eval_shape(ResNet().apply, shapes, jax.ShapeDtypeStruct((2, 224, 224, 3),
                                                                      jnp.float32))
    assert out.shape == (2, 1000)
