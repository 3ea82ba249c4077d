"""jaxrob.data.load_imagenet: the two ImageNet folder layouts, torchvision's class order and
resize + center crop, reading only the requested slice; bad input.

Real data: a slice of the Tiny-ImageNet val set (same wnid / annotation conventions as ImageNet),
unpacked from its zip into a flat folder; the rest uses tiny synthetic folders built here.
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np
import pytest
from PIL import Image

from jaxrob.data import _imagenet as imagenet_module
from jaxrob.data import imagenet_index, load_imagenet, resize_center_crop

TINY_ZIP = "tiny_imagenet_200_val/tiny_imagenet_200_val_official10k.zip"
ROOT = "tiny-imagenet-200/"
N_TINY = 24  # val_0 .. val_23 unpacked


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    """A flat folder of val_0..val_23.JPEG, val_annotations.txt and the 200 official wnids."""
    zpath = data_dir / TINY_ZIP
    if not zpath.is_file():
        pytest.skip(f"{zpath} not found")
    out = tmp_path_factory.mktemp("tiny_val")
    (out / "images").mkdir()
    with zipfile.ZipFile(zpath) as zf:
        for i in range(N_TINY):
            (out / "images" / f"val_{i}.JPEG").write_bytes(
                zf.read(f"{ROOT}val/images/val_{i}.JPEG"))
        (out / "val_annotations.txt").write_bytes(zf.read(f"{ROOT}val/val_annotations.txt"))
        wnids = zf.read(f"{ROOT}wnids.txt").decode().split()[:200]  # PROVENANCE: 200 official
    (out / "wnids.txt").write_text("\n".join(wnids))
    return out


def _count_decodes(monkeypatch):
    calls = []
    real = imagenet_module._decode
    monkeypatch.setattr(imagenet_module, "_decode",
                        lambda path, *a: calls.append(path.name) or real(path, *a))
    return calls


def test_tiny_imagenet_flat_folder_with_annotations(tiny, monkeypatch):
    calls = _count_decodes(monkeypatch)
    ds = load_imagenet(tiny / "images", "val[4:10]", image_size=64, resize_size=64,
                       labels_file=tiny / "val_annotations.txt", wnids=tiny / "wnids.txt",
                       name="tiny_imagenet")
    # reading order val_0, val_1, ..., val_9 (digit runs compared as numbers), only the slice
    assert calls == [f"val_{i}.JPEG" for i in range(4, 10)]
    np.testing.assert_array_equal(ds.indices, np.arange(4, 10))
    assert ds.images.shape == (6, 64, 64, 3) and ds.images.dtype == np.float32
    assert ds.num_classes == 200 and ds.split == "val[4:10]"
    # labels: the index of the annotated wnid among the sorted wnids (torchvision's order)
    classes = sorted((tiny / "wnids.txt").read_text().split())
    ann = {ln.split("\t")[0]: ln.split("\t")[1]
           for ln in (tiny / "val_annotations.txt").read_text().splitlines() if ln.strip()}
    assert [classes[k] for k in ds.labels] == [ann[f"val_{i}.JPEG"] for i in range(4, 10)]
    assert ann["val_0.JPEG"] == "n03444034"  # PROVENANCE.md's first line
    # no resize at 64: the pixels are the JPEG's own (grayscale converted to RGB)
    for j, i in enumerate(range(4, 10)):
        with Image.open(tiny / "images" / f"val_{i}.JPEG") as im:
            want = np.asarray(im.convert("RGB"), np.float32) / 255
        np.testing.assert_allclose(ds.images[j], want, atol=1e-7)


def test_tiny_imagenet_upscaled_to_the_classifier_size(tiny):
    ds = load_imagenet(tiny / "images", "val[:2]", image_size=224,
                       labels_file=tiny / "val_annotations.txt", wnids=tiny / "wnids.txt")
    assert ds.images.shape == (2, 224, 224, 3)  # 64 -> 256 (shorter side) -> 224 crop
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    # without wnids the classes are the labelled images' wnids
    files, labels, classes = imagenet_index(tiny / "images",
                                            labels_file=tiny / "val_annotations.txt")
    assert len(files) == N_TINY and classes == sorted(classes) and len(classes) < 200
    assert [classes[k] for k in labels[:2]] == [sorted((tiny / "wnids.txt").read_text().split())[k]
                                                for k in ds.labels]


def _synthetic(root: pathlib.Path, spec: dict[str, list[str]], size=(20, 12)):
    colors = {}
    for c, (wnid, names) in enumerate(spec.items()):
        (root / wnid).mkdir(parents=True)
        for k, n in enumerate(names):
            color = (10 * c + k, 100 + c, 200 - k)
            Image.new("RGB", size, color).save(root / wnid / n)
            colors[(wnid, n)] = color
    return colors


def test_wnid_folders_in_torchvision_order(tmp_path, monkeypatch):
    spec = {"n02000000": ["b.png", "a.png"], "n01000000": ["img_10.png", "img_9.png"],
            "n03000000": ["x.png"]}
    colors = _synthetic(tmp_path / "val", spec)
    files, labels, classes = imagenet_index(tmp_path / "val")
    assert classes == ["n01000000", "n02000000", "n03000000"]
    assert [f.name for f in files] == ["img_9.png", "img_10.png", "a.png", "b.png", "x.png"]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2])
    calls = _count_decodes(monkeypatch)
    ds = load_imagenet(tmp_path / "val", "val[1:4]", image_size=8, resize_size=10)
    assert calls == ["img_10.png", "a.png", "b.png"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 1])
    np.testing.assert_array_equal(ds.indices, [1, 2, 3])
    # a constant image stays that constant colour through resize and crop
    np.testing.assert_allclose(ds.images[1], np.broadcast_to(
        np.asarray(colors[("n02000000", "a.png")], np.float32) / 255, (8, 8, 3)), atol=1e-6)
    # positions within the slice (one process's share): same examples, global indices
    part = load_imagenet(tmp_path / "val", "val[1:4]", image_size=8, resize_size=10,
                         positions=[2, 0])
    np.testing.assert_array_equal(part.indices, [3, 1])
    np.testing.assert_array_equal(part.images, ds.images[[2, 0]])
    # an explicit class list (e.g. all 1000 wnids) keeps the sorted-wnid labels
    _, labels, classes = imagenet_index(tmp_path / "val",
                                        wnids=["n09000000", *spec, "n00000001"])
    assert len(classes) == 5 and classes[0] == "n00000001"
    np.testing.assert_array_equal(labels, [1, 1, 2, 2, 3])


def test_resize_center_crop_closed_form():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # h 30 < w 40
    # shorter side already resize_size: a pure center crop, top round(6/2)=3, left 8
    out = resize_center_crop(Image.fromarray(arr), 24, 30)
    np.testing.assert_array_equal(out, arr[3:27, 8:32])
    # portrait: the shorter side (width) goes to resize_size, height int(s * h / w)
    big = resize_center_crop(Image.fromarray(arr.transpose(1, 0, 2)), 16, 20)
    assert big.shape == (16, 16, 3) and big.dtype == np.uint8
    gray = Image.fromarray(arr[..., 0])
    np.testing.assert_array_equal(resize_center_crop(gray, 24, 30)[..., 1], arr[3:27, 8:32, 0])


def test_devkit_ground_truth_with_meta_file(tmp_path):
    from scipy.io import savemat

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    # the devkit's meta.mat: synsets (ILSVRC2012_ID, WNID, words, gloss, num_children, ...);
    # ids 1..3 are leaves, id 4 an inner node
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    rows = [(1, "n03000000", "c", "", 0), (2, "n01000000", "a", "", 0),
            (3, "n02000000", "b", "", 0), (4, "n00001740", "entity", "", 2)]
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n3\n2\n")
    files, labels, classes = imagenet_index(flat, labels_file=gt, meta_file=tmp_path / "meta.mat")
    assert classes == ["n01000000", "n02000000", "n03000000"]  # sorted wnids, not devkit ids
    np.testing.assert_array_equal(labels, [2, 1, 0])
    gt.write_text("1\n4\n2\n")
    with pytest.raises(ValueError, match=r"ILSVRC2012_IDs \[4\] are not leaf classes"):
        imagenet_index(flat, labels_file=gt, meta_file=tmp_path / "meta.mat")


def test_devkit_ground_truth_needs_meta_file(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (1, 2):
        Image.new("RGB", (8, 8)).save(flat / f"ILSVRC2012_val_{i:08d}.JPEG", "JPEG")
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n361\n")
    with pytest.raises(ValueError, match="pass meta_file=.*meta.mat"):
        imagenet_index(flat, labels_file=gt)
    with pytest.raises(FileNotFoundError, match="meta_file: no devkit meta.mat"):
        imagenet_index(flat, labels_file=gt, meta_file=tmp_path / "meta.mat")


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageNet folder .*missing.* does not exist"):
        load_imagenet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_imagenet(tmp_path / "empty")
    _synthetic(tmp_path / "val", {"n01000000": ["a.png"], "n02000000": ["b.png"]})
    with pytest.raises(ValueError, match=r"sub-folder\(s\) \['n02000000'\] are not among"):
        imagenet_index(tmp_path / "val", wnids=["n01000000"])
    _synthetic(tmp_path / "bad", {"cats": ["a.png"]})
    with pytest.raises(ValueError, match=r"must be WordNet ids .*\['cats'\]"):
        imagenet_index(tmp_path / "bad")
    (tmp_path / "hollow" / "n01000000").mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no images"):
        imagenet_index(tmp_path / "hollow")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x_1.png")
    Image.new("RGB", (8, 8)).save(flat / "x_2.png")
    with pytest.raises(ValueError, match="needs labels_file"):
        imagenet_index(flat)
    (tmp_path / "labels.txt").write_text("x_1.png n01000000\n")
    with pytest.raises(ValueError, match=r"no '<file> <wnid>' line for 1 image.*x_2.png"):
        imagenet_index(flat, labels_file=tmp_path / "labels.txt")
    (tmp_path / "labels.txt").write_text("x_1.png n01000000\nx_2.png n05000000\n")
    with pytest.raises(ValueError, match=r"\['n05000000'\] are not among the 1 wnids"):
        imagenet_index(flat, labels_file=tmp_path / "labels.txt", wnids=["n01000000"])
    with pytest.raises(ValueError, match="resize_size=100 is smaller than the crop"):
        load_imagenet(tmp_path / "val", image_size=224, resize_size=100)
    with pytest.raises(ValueError, match="selects no examples"):
        load_imagenet(tmp_path / "val", "val[5:]")
    with pytest.raises(ValueError, match="positions: expected"):
        load_imagenet(tmp_path / "val", "val", image_size=8, positions=[2])
