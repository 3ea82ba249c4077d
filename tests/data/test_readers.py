"""Local dataset readers on the real files: shapes, ranges, histograms, slicing, file errors."""

import gzip
import shutil
import struct
import zipfile

import numpy as np
import pytest

import jaxrob.data as jdata
from jaxrob.data import _readers

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TEST_HIST = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
CIFAR_TRAIN_HIST = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]


def _check_basic(ds, n, shape, num_classes):
    assert len(ds) == n
    assert ds.images.shape == (n, *shape) and ds.images.dtype == np.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
    assert ds.num_classes == num_classes
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.images.max() == 1.0 and ds.images.min() == 0.0
    assert 0 <= ds.labels.min() and ds.labels.max() < num_classes
    np.testing.assert_array_equal(ds.indices, np.arange(n))


@pytest.mark.parametrize(
    "name,split,n,shape,hist",
    [
        ("mnist", "train", 60000, (28, 28, 1), MNIST_TRAIN_HIST),
        ("mnist", "test", 10000, (28, 28, 1), MNIST_TEST_HIST),
        ("kmnist", "test", 10000, (28, 28, 1), [1000] * 10),
        ("cifar10", "test", 1000, (32, 32, 3), CIFAR_TEST_HIST),
        ("cifar10", "train", 4000, (32, 32, 3), CIFAR_TRAIN_HIST),
        ("cifar10_jpeg", "test", 10000, (32, 32, 3), [1000] * 10),
        ("tiny_imagenet", "val", 10000, (64, 64, 3), [50] * 200),
    ],
)
def test_real_splits(data_dir, name, split, n, shape, hist):
    ds = jdata.load_dataset(name, split, data_dir=data_dir)
    _check_basic(ds, n, shape, len(hist))
    assert ds.name == name and ds.split == split
    assert np.bincount(ds.labels, minlength=len(hist)).tolist() == hist


def test_known_label_orders(data_dir):
    mnist = jdata.load_dataset("mnist", "train", data_dir=data_dir)
    assert mnist.labels[:5].tolist() == [5, 0, 4, 1, 9]
    mnist_test = jdata.load_dataset("mnist", "test", data_dir=data_dir)
    assert mnist_test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    cifar_test = jdata.load_dataset("cifar10", "test", data_dir=data_dir)
    assert cifar_test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    cifar_train = jdata.load_dataset("cifar10", "train", data_dir=data_dir)
    assert cifar_train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_mnist_pixels_are_exact_bytes(data_dir):
    ds = jdata.load_dataset("mnist", "test", data_dir=data_dir)
    raw = _readers.read_idx_gz(data_dir / "mnist/original_idx/t10k-images-idx3-ubyte.gz", ndim=3)
    np.testing.assert_array_equal(np.rint(ds.images[..., 0] * 255).astype(np.uint8), raw)


def test_cifar10_jpeg_is_a_separate_lossy_domain_aligned_with_the_official_order(data_dir):
    spec = jdata.DATASETS["cifar10_jpeg"]
    assert "JPEG" in spec.description and "JPEG" not in jdata.DATASETS["cifar10"].description[:30]
    jpeg = jdata.load_dataset("cifar10_jpeg", "test[:1000]", data_dir=data_dir)
    lossless = jdata.load_dataset("cifar10", "test", data_dir=data_dir)
    assert jpeg.name != lossless.name
    # The first 1000 JPEG test images are the official test images 0..999: same labels, and
    # JPEG-q75 error (~30.5 dB PSNR); a wrong pairing would give ~10 dB.
    np.testing.assert_array_equal(jpeg.labels, lossless.labels)
    mse = ((jpeg.images - lossless.images) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(1.0 / mse)
    assert 28 < np.median(psnr) < 33 and psnr.min() > 20
    assert (mse > 0).all()  # lossy: never silently the lossless pixels
    # Beyond 999 the test order is round robin over classes, so prefixes stay balanced.
    full = jdata.load_dataset("cifar10_jpeg", "test", data_dir=data_dir)
    assert np.bincount(full.labels[1000:2000], minlength=10).tolist() == [100] * 10


def test_cifar10_jpeg_member_order():
    members = _readers.cifar10_jpeg_member_order("test", np.array([1, 0, 1]), per_class=2)
    names = [m for m, _ in members]
    assert names[:3] == [
        "test/automobile/0000.jpg",
        "test/airplane/0000.jpg",
        "test/automobile/0001.jpg",
    ]
    assert len(set(names)) == len(names) == 20
    assert [c for _, c in members[:3]] == [1, 0, 1]
    # Then round robin over the remaining images of each class.
    assert names[3:6] == ["test/airplane/0001.jpg", "test/bird/0000.jpg", "test/cat/0000.jpg"]
    assert names[11:14] == ["test/truck/0000.jpg", "test/bird/0001.jpg", "test/cat/0001.jpg"]
    with pytest.raises(ValueError, match="per class"):
        _readers.cifar10_jpeg_member_order("test", np.array([0, 0, 0]), per_class=2)


@pytest.mark.slow
def test_cifar10_jpeg_train_full_decode(data_dir):
    jpeg = jdata.load_dataset("cifar10_jpeg", "train", data_dir=data_dir)
    _check_basic(jpeg, 50000, (32, 32, 3), 10)
    assert np.bincount(jpeg.labels).tolist() == [5000] * 10
    lossless = jdata.load_dataset("cifar10", "train", data_dir=data_dir)
    np.testing.assert_array_equal(jpeg.labels[:4000], lossless.labels)


def test_tiny_imagenet_classes_and_grayscale(data_dir):
    ds = jdata.load_dataset("tiny_imagenet", "val", data_dir=data_dir)
    with zipfile.ZipFile(data_dir / _readers.TINY_IMAGENET_FILE) as zf:
        wnids = zf.read("tiny-imagenet-200/wnids.txt").decode().split()
    assert ds.labels[0] == wnids.index("n03444034")  # val_0.JPEG n03444034
    gray = (ds.images[..., 0] == ds.images[..., 1]).all(axis=(1, 2)) & (
        ds.images[..., 1] == ds.images[..., 2]
    ).all(axis=(1, 2))
    assert gray.sum() >= 168  # the 168 'L' JPEGs, replicated to RGB


def test_digits_split_is_fixed_and_stratified(monkeypatch):
    monkeypatch.delenv("JAXROB_DATA_DIR", raising=False)  # bundled: no data dir needed
    train = jdata.load_dataset("digits", "train")
    test = jdata.load_dataset("digits", "test")
    _check_basic(train, 1437, (8, 8, 1), 10)
    _check_basic(test, 360, (8, 8, 1), 10)
    np.testing.assert_allclose(train.images * 16, np.rint(train.images * 16))  # values / 16
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20 %
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10) + counts, full)


def test_kmnist_train_is_explained_and_test_slices(data_dir):
    with pytest.raises(ValueError, match="labels.*test\\[:8000\\]"):
        jdata.load_dataset("kmnist", "train", data_dir=data_dir)
    full = jdata.load_dataset("kmnist", "test", data_dir=data_dir)
    tr = jdata.load_dataset("kmnist", "test[:8000]", data_dir=data_dir)
    ev = jdata.load_dataset("kmnist", "test[8000:]", data_dir=data_dir)
    assert (len(tr), len(ev)) == (8000, 2000)
    assert tr.split == "test[:8000]" and ev.split == "test[8000:]"
    np.testing.assert_array_equal(ev.indices, np.arange(8000, 10000))
    np.testing.assert_array_equal(ev.images, full.images[8000:])
    np.testing.assert_array_equal(np.concatenate([tr.labels, ev.labels]), full.labels)


@pytest.mark.parametrize(
    "split,start,stop",
    [
        ("test[10%:]", 1000, 10000),
        ("test[:25%]", 0, 2500),
        ("test[-100:]", 9900, 10000),
        ("test[100:-9800]", 100, 200),
        ("test[:]", 0, 10000),
    ],
)
def test_split_slicing(data_dir, split, start, stop):
    full = jdata.load_dataset("mnist", "test", data_dir=data_dir)
    ds = jdata.load_dataset("mnist", split, data_dir=data_dir)
    np.testing.assert_array_equal(ds.indices, np.arange(start, stop))
    np.testing.assert_array_equal(ds.labels, full.labels[start:stop])


@pytest.mark.parametrize("split", ["test[5:5]", "test[::2]", "test[a:]", "test[1:2", "te st]"])
def test_bad_split_strings(data_dir, split):
    with pytest.raises(ValueError, match="split"):
        jdata.load_dataset("mnist", split, data_dir=data_dir)


def test_unknown_names_and_splits_list_valid_ones(data_dir):
    with pytest.raises(ValueError, match="cifar10_jpeg.*digits.*kmnist.*mnist.*tiny_imagenet"):
        jdata.load_dataset("imagenet", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"\['test', 'train'\]"):
        jdata.load_dataset("mnist", "validation", data_dir=data_dir)
    with pytest.raises(ValueError, match="only 'val'"):
        jdata.load_dataset("tiny_imagenet", "train", data_dir=data_dir)


def test_cache_and_read_only(data_dir):
    a = jdata.load_dataset("cifar10", "test", data_dir=data_dir)
    b = jdata.load_dataset("cifar10", "test", data_dir=str(data_dir))
    assert a is b
    assert not a.images.flags.writeable
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 0.5
    sub = a.subset(np.array([5, 1, 5]))
    assert sub.images.flags.writeable
    np.testing.assert_array_equal(sub.indices, [5, 1, 5])


def test_array_dataset_subset_and_validation():
    images = np.random.default_rng(0).random((10, 2, 2, 1), dtype=np.float32)
    ds = jdata.ArrayDataset(images, np.arange(10, dtype=np.int32) % 3, "toy", "train", 3)
    assert len(ds) == 10 and ds.image_shape == (2, 2, 1)
    s1 = ds.subset(slice(4, None))
    s2 = s1.subset(np.array([True, False] * 3))
    np.testing.assert_array_equal(s2.indices, [4, 6, 8])  # composed positions in the base
    np.testing.assert_array_equal(s2.images, images[[4, 6, 8]])
    with pytest.raises(IndexError):
        ds.subset([10])
    with pytest.raises(ValueError, match="boolean mask"):
        ds.subset(np.ones(3, bool))
    with pytest.raises(ValueError, match="float32"):
        jdata.ArrayDataset(images.astype(np.float64), ds.labels, "toy", "train", 3)
    with pytest.raises(ValueError, match="int32"):
        jdata.ArrayDataset(images, ds.labels.astype(np.int64), "toy", "train", 3)
    with pytest.raises(ValueError, match="9 labels"):
        jdata.ArrayDataset(images, ds.labels[:9], "toy", "train", 3)


def test_resolve_data_dir(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("JAXROB_DATA_DIR", str(data_dir))
    assert jdata.resolve_data_dir() == data_dir.resolve()
    assert jdata.resolve_data_dir(tmp_path) == tmp_path.resolve()  # argument wins
    monkeypatch.delenv("JAXROB_DATA_DIR")
    with pytest.raises(ValueError, match="data_dir=.*JAXROB_DATA_DIR"):
        jdata.resolve_data_dir()
    with pytest.raises(ValueError, match="JAXROB_DATA_DIR"):
        jdata.load_dataset("mnist", "test")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not an existing directory"):
        jdata.resolve_data_dir(f)
    with pytest.raises(NotADirectoryError):
        jdata.resolve_data_dir(tmp_path / "missing")


# ---- broken copies of the files in a temporary data directory -----------------------------


def _idx_gz(path, magic, dims, payload: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims)
    path.write_bytes(gzip.compress(header + payload))


def _mnist_test_copy(data_dir, tmp_path):
    for rel in _readers.MNIST_FILES["test"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, tmp_path / rel)
    return tmp_path / _readers.MNIST_FILES["test"][0]


def test_missing_file_names_path_and_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz.*JAXROB_DATA_DIR"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="kmnist-test-imgs.npz"):
        jdata.load_dataset("kmnist", "test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar10_convnetjs_lossless.npz"):
        jdata.load_dataset("cifar10", "test", data_dir=tmp_path)


def test_truncated_gzip(data_dir, tmp_path):
    img = _mnist_test_copy(data_dir, tmp_path)
    img.write_bytes(img.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="gzip.*(corrupt|truncated)"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    img.write_bytes(b"not a gzip file at all")
    with pytest.raises(ValueError, match="cannot be decompressed"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)


def test_bad_idx_contents(data_dir, tmp_path):
    img = _mnist_test_copy(data_dir, tmp_path)
    _idx_gz(img, 0x0801, (10000,), bytes(10000))  # a labels file where images belong
    with pytest.raises(ValueError, match="magic number 2051"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    _idx_gz(img, 0x0803, (10000, 28, 28), bytes(100))  # header promises more than follows
    with pytest.raises(ValueError, match="truncated or corrupt"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    _idx_gz(img, 0x0803, (100, 28, 27), bytes(100 * 28 * 27))
    with pytest.raises(ValueError, match=r"expected uint8 of shape \(N, 28, 28\)"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    _idx_gz(img, 0x0803, (10000, 28, 28), bytes(10000 * 28 * 28))
    lab = tmp_path / _readers.MNIST_FILES["test"][1]
    _idx_gz(lab, 0x0801, (10000,), bytes([12]) * 10000)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)
    _idx_gz(img, 0x0803, (100, 28, 28), bytes(100 * 28 * 28))
    _idx_gz(lab, 0x0801, (100,), bytes(100))
    with pytest.raises(ValueError, match=r"expected images \(10000, 28, 28, 1\)"):
        jdata.load_dataset("mnist", "test", data_dir=tmp_path)


def test_bad_npz(tmp_path):
    d = tmp_path / "kmnist"
    d.mkdir()
    np.savez(d / "kmnist-test-labels.npz", np.zeros(10000, np.uint8))
    (d / "kmnist-test-imgs.npz").write_bytes(b"garbage, not a zip")
    with pytest.raises(ValueError, match="kmnist-test-imgs.npz.*cannot be read"):
        jdata.load_dataset("kmnist", "test", data_dir=tmp_path)
    np.savez(d / "kmnist-test-imgs.npz", images=np.zeros((10000, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="'arr_0'"):
        jdata.load_dataset("kmnist", "test", data_dir=tmp_path)
    np.savez(d / "kmnist-test-imgs.npz", np.zeros((10000, 28, 28), np.float32))
    with pytest.raises(ValueError, match="expected uint8 .* got float32"):
        jdata.load_dataset("kmnist", "test", data_dir=tmp_path)
    c = tmp_path / "cifar10/derived"
    c.mkdir(parents=True)
    np.savez(
        c / "cifar10_convnetjs_lossless.npz",
        test_x=np.zeros((1000, 32, 32), np.uint8),
        test_y=np.zeros(1000, np.uint8),
    )
    with pytest.raises(ValueError, match=r"test_x: expected uint8 of shape \(N, 32, 32, 3\)"):
        jdata.load_dataset("cifar10", "test", data_dir=tmp_path)


def test_bad_jpeg_zip(data_dir, tmp_path):
    rel_js = _readers.CIFAR10_LABELS_JS
    (tmp_path / rel_js).parent.mkdir(parents=True)
    shutil.copy(data_dir / rel_js, tmp_path / rel_js)
    zpath = tmp_path / _readers.CIFAR10_JPEG_FILES["test"]
    zpath.parent.mkdir(parents=True)
    zpath.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="expected a zip archive"):
        jdata.load_dataset("cifar10_jpeg", "test", data_dir=tmp_path)
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("test/airplane/0000.jpg", b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="expected the 10000 members"):
        jdata.load_dataset("cifar10_jpeg", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="expected a decodable image"):
        _readers._decode_image(b"\xff\xd8 not really a jpeg", "x.jpg", (32, 32, 3))
