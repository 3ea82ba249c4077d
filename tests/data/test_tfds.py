"""TFDS path: MNIST prepared offline without TensorFlow equals the IDX reader's data."""

import importlib.util
import sys

import numpy as np
import pytest

import jaxrob.data as jdata

# Needs the tfds extra; tests/conftest.py skips these without it (CI runs them in its extras pass).
pytestmark = pytest.mark.tfds


def _multiset(images_u8, labels):
    """Rows of (pixels, label) as sorted byte strings: order-free comparison."""
    rows = np.concatenate(
        [images_u8.reshape(len(labels), -1), labels.astype(np.uint8)[:, None]], axis=1
    )
    return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1])))[:, 0])


def _u8(images):
    return np.rint(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tfds_dir(data_dir, tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    out = tmp_path_factory.mktemp("tfds")
    prepared = jdata.prepare_mnist_tfds(data_dir, out)
    assert (prepared / "dataset_info.json").is_file()
    return out


def _check_split(tfds_dir, data_dir, split, n):
    ds = jdata.load_tfds_dataset("mnist", split, data_dir=tfds_dir)
    ref = jdata.load_dataset("mnist", split, data_dir=data_dir)
    assert ds.name == "tfds:mnist" and ds.num_classes == 10 and len(ds) == n
    assert ds.images.dtype == np.float32 and ds.images.shape == ref.images.shape
    np.testing.assert_array_equal(
        np.bincount(ds.labels, minlength=10), np.bincount(ref.labels, minlength=10)
    )
    # Same (image, label) pairs, in TFDS' own record order.
    np.testing.assert_array_equal(
        _multiset(_u8(ds.images), ds.labels), _multiset(_u8(ref.images), ref.labels)
    )
    rec = jdata.tfds_source("mnist", split, data_dir=tfds_dir)[0]
    assert rec["image"].shape == (28, 28, 1) and rec["image"].dtype == np.uint8
    np.testing.assert_array_equal(rec["image"], _u8(ds.images[0]))


def test_prepared_mnist_test_split_equals_idx_reader(tfds_dir, data_dir):
    _check_split(tfds_dir, data_dir, "test", 10000)
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules  # the whole path ran without TensorFlow


def test_prepared_mnist_train_split_labels_and_sampled_pixels(tfds_dir, data_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    ref = jdata.load_dataset("mnist", "train", data_dir=data_dir)
    # Labels of all 60000 records without decoding the PNGs (decoding all: the slow test).
    src = jdata.tfds_source(
        "mnist", "train", data_dir=tfds_dir, decoders={"image": tfds.decode.SkipDecoding()}
    )
    assert len(src) == 60000
    labels = np.asarray([r["label"] for r in src.__getitems__(list(range(len(src))))])
    np.testing.assert_array_equal(
        np.bincount(labels, minlength=10), np.bincount(ref.labels, minlength=10)
    )
    # A random sample of decoded records: each (image, label) is one of the IDX file's pairs.
    src = jdata.tfds_source("mnist", "train", data_dir=tfds_dir)
    pick = np.random.default_rng(0).choice(60000, 500, replace=False)
    recs = src.__getitems__(pick.tolist())
    got = _multiset(np.stack([r["image"] for r in recs]), np.array([r["label"] for r in recs]))
    pool = _multiset(_u8(ref.images), ref.labels)
    assert np.isin(got, pool).all() and len(np.unique(got)) == len(got)
    np.testing.assert_array_equal(np.sort(labels[pick]), np.sort([r["label"] for r in recs]))


@pytest.mark.slow
def test_prepared_mnist_train_split_equals_idx_reader(tfds_dir, data_dir):
    _check_split(tfds_dir, data_dir, "train", 60000)


def test_tfds_slicing_and_preparing_twice(tfds_dir, data_dir):
    full = jdata.load_tfds_dataset("mnist", "test", data_dir=tfds_dir)
    ev = jdata.load_tfds_dataset("mnist", "test[8000:]", data_dir=tfds_dir)
    assert len(ev) == 2000 and ev.split == "test[8000:]"
    np.testing.assert_array_equal(ev.indices, np.arange(8000, 10000))
    np.testing.assert_array_equal(ev.images, full.images[8000:])
    assert len(jdata.tfds_source("mnist", "test[8000:]", data_dir=tfds_dir)) == 2000
    # Already prepared: a no-op that returns the same directory.
    assert (jdata.prepare_mnist_tfds(data_dir, tfds_dir) / "dataset_info.json").is_file()


def test_tfds_errors(tmp_path, data_dir):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared.*prepare_mnist_tfds"):
        jdata.tfds_source("mnist", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        jdata.prepare_mnist_tfds(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="TFDS data directory"):
        jdata.load_tfds_dataset("mnist", "train", data_dir=None)


def test_missing_tfds_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r"jaxrob\[tfds\]"):
        jdata.tfds_source("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        jdata.prepare_mnist_tfds(tmp_path, tmp_path)
