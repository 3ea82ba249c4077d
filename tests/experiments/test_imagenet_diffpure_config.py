"""configs/imagenet_diffpure.py: DiffPure's ImageNet settings (guided-diffusion's ADM, torchvision's
ResNet-50, the ImageNet val folder), the clear errors when the real files are not there, the
ImageNet folder path of ``load_split``, and the CPU smoke variant.

Shapes only (``jax.eval_shape``) in the default run: the ADM import and forward pass are tested
in tests/models/test_adm.py, the ResNet in tests/models/test_resnet.py, the reader in
tests/data/test_imagenet.py; the smoke run itself is marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exp_helpers import load_config
from PIL import Image

import jaxrob
from experiments import _common as exp_common
from jaxrob.models import ADMUNet, Classifier, DiffusionModel, ResNet


def test_missing_files_fail_clearly(tmp_path):
    c = load_config("imagenet_diffpure")
    assert c.purifier.t_star == 0.15 and c.ddpm.model.name == "adm"
    assert c.ddpm.path.endswith("256x256_diffusion_uncond.pt")
    with pytest.raises(FileNotFoundError, match=r"ddpm\.path: .*256x256_diffusion_uncond\.pt"):
        exp_common.load_ddpm(c.ddpm, (256, 256, 3))
    assert c.classifier.source == "torchvision_resnet50" and c.classifier.input_size == 224
    c.classifier.path = str(tmp_path / "resnet50-0676ba61.pth")
    with pytest.raises(FileNotFoundError, match=r"classifier\.path: .*resnet50-0676ba61\.pth"):
        exp_common.load_classifier(c.classifier, c.data)
    c.data.imagenet_dir = str(tmp_path / "imagenet" / "val")
    with pytest.raises(FileNotFoundError, match=r"data\.imagenet_dir: no folder at .*imagenet/val"):
        exp_common.load_split(c.data, c.data.test_split)
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    c.data.labels_file = str(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(FileNotFoundError, match=r"data\.labels_file: no file at .*LOC_val_sol"):
        exp_common.load_split(c.data, c.data.test_split)
    # a guided-diffusion file with a Ho et al. UNet description is refused before any reading
    c.ddpm.model = {"name": "unet", "config": "cifar10"}
    with pytest.raises(ValueError, match="guided-diffusion checkpoints are ADMs"):
        exp_common.load_ddpm(c.ddpm, (256, 256, 3))


def test_imagenet_folder_is_read_at_the_configured_size(tmp_path):
    c = load_config("imagenet_diffpure")
    val = tmp_path / "val"
    for wnid, color in (("n01440764", (200, 10, 10)), ("n01443537", (10, 200, 10))):
        (val / wnid).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (300 + 10 * k, 280), color).save(val / wnid / f"img_{k}.JPEG")
    c.data.data_dir = str(tmp_path)
    c.data.imagenet_dir = "val"  # relative to the data directory
    ds = exp_common.load_split(c.data, c.data.test_split, num_images=3)
    # DiffPure's Resize(256) + CenterCrop(224), decoded when first read
    assert isinstance(ds.images, jaxrob.data.LazyImages) and ds.images.decoded.size == 0
    assert ds.images.shape == (3, 224, 224, 3) and ds.num_classes == 2
    np.testing.assert_allclose(ds.images[2], np.broadcast_to(
        np.asarray((10, 200, 10), np.float32) / 255, (224, 224, 3)), atol=2 / 255)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1])
    np.testing.assert_array_equal(ds.indices, [0, 1, 2])
    assert ds.name == "imagenet" and ds.split == "val[:512]"


def test_smoke_variant_builds_its_models(tmp_path):
    c = load_config("imagenet_diffpure", "smoke")
    assert (c.data.name, c.data.test_split, c.data.image_size) == ("tiny_imagenet", "val[:4]", 28)
    assert c.purifier.input_size == 32  # 28 -> 32 -> 28: DiffPure's 224 -> 256 -> 224 shrunk
    # robust_eval gives it the data's shape; an ADM's parameters do not depend on the size
    model, info = exp_common.load_ddpm(c.ddpm, (28, 28, 3))
    assert isinstance(model, DiffusionModel) and isinstance(model.module, ADMUNet)
    assert model.module.learn_sigma and model.module.output == "eps"
    assert info["source"] == "random" and model.schedule.num_steps == 1000
    purify = exp_common.make_purifier(c.purifier, model)
    x = jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32)
    assert jax.eval_shape(purify, x, jax.random.key(0)).shape == (2, 28, 28, 3)
    assert isinstance(purify, jaxrob.purify.Purifier) and purify.input_size == 32
    clf, info = exp_common.load_classifier(c.classifier, c.data)
    assert isinstance(clf, Classifier) and isinstance(clf.module, ResNet)
    assert clf.module.block == "basic" and info["source"] == "random"
    assert jax.eval_shape(clf, x).shape == (2, 200)
    # the full config: DiffPure's geometry, 224x224 data, the ADM at 256
    full = load_config("imagenet_diffpure")
    assert (full.data.image_size, full.data.resize_size) == (224, 256)
    assert full.purifier.input_size == 256
    # its classifier resizes inputs of another size to 224x224 (a shallow one here)
    full.classifier.update(source="random", num_classes=10)
    full.classifier.model.kwargs.stage_sizes = (1, 1, 1, 1)
    clf, _ = exp_common.load_classifier(full.classifier, full.data)
    assert clf.module.input_size == 224 and clf.module.block == "bottleneck"
    assert jax.eval_shape(clf, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)).shape == (
        1, 10)


def test_load_split_resizes_to_data_image_size(monkeypatch):
    # what the smoke does to its 64x64 Tiny-ImageNet images (-> 32), on a stand-in dataset
    import jaxrob.data

    rng = np.random.default_rng(0)
    raw = jaxrob.data.ArrayDataset(
        images=rng.uniform(size=(3, 8, 8, 3)).astype(np.float32),
        labels=np.arange(3, dtype=np.int32), name="tiny_imagenet", split="val[5:8]",
        num_classes=200, indices=np.arange(5, 8, dtype=np.int32))
    raw.images[0] = 0.25  # a constant image
    monkeypatch.setattr(jaxrob.data, "load_dataset", lambda name, split, data_dir=None: raw)
    c = load_config("imagenet_diffpure", "smoke")
    c.data.image_size = 16
    ds = exp_common.load_split(c.data, c.data.test_split, num_images=2)
    assert ds.images.shape == (2, 16, 16, 3) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.indices, [5, 6])
    np.testing.assert_array_equal(ds.labels, [0, 1])
    np.testing.assert_allclose(ds.images[0], 0.25, atol=1e-6)  # constants stay constant
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    np.testing.assert_allclose(ds.images[1].mean(), raw.images[1].mean(), atol=0.02)


# ~1 min on 2 idle CPU cores (PGD-EoT through the SDE purifier of a tiny ADM, plus the ResNet
# compile); test_smoke_variant_builds_its_models_and_data covers the config and loading path
@pytest.mark.slow
def test_imagenet_diffpure_smoke(data_dir, tmp_path):
    from experiments import robust_eval

    cfg = load_config("imagenet_diffpure", "smoke")
    cfg.data.data_dir = str(data_dir)
    res = robust_eval.run(cfg, tmp_path)
    (row,) = res["rows"]
    assert res["classifier"]["source"] == "random" and res["ddpm"]["source"] == "random"
    assert row["purifier"]["sampler"] == "sde"
    assert row["adv"]["one_shot"]["num_images"] == 4
    assert row["mean_linf"] <= 4 / 255 + 1e-6
