"""Batching: deterministic order, independence from batch size, resuming, sharded placement."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxrob.data as jdata
from jaxrob.parallel import make_mesh


def _toy(n=103, name="toy"):
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 3, 1), dtype=np.float32)
    labels = rng.integers(0, 5, n).astype(np.int32)
    return jdata.ArrayDataset(images, labels, name, "train", 5)


def _all(batches, key="index"):
    return np.concatenate([b[key] for b in batches])


@pytest.mark.parametrize(
    "n,bs,drop,want",
    [
        (103, 10, True, 10),
        (103, 10, False, 11),
        (100, 10, False, 10),
        (0, 4, False, 0),
        (3, 4, True, 0),
    ],
)
def test_num_batches(n, bs, drop, want):
    assert jdata.num_batches(n, bs, drop) == want


def test_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    ds = _toy()
    a = _all(jdata.iterate_batches(ds, 8, seed=3, epoch=1, drop_remainder=False))
    b = _all(jdata.iterate_batches(ds, 8, seed=3, epoch=1, drop_remainder=False))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), np.arange(len(ds)))  # each example once
    np.testing.assert_array_equal(a, np.random.default_rng([3, 1]).permutation(len(ds)))
    other_epoch = _all(jdata.iterate_batches(ds, 8, seed=3, epoch=2, drop_remainder=False))
    other_seed = _all(jdata.iterate_batches(ds, 8, seed=4, epoch=1, drop_remainder=False))
    assert (a != other_epoch).any() and (a != other_seed).any()
    plain = _all(jdata.iterate_batches(ds, 8, seed=3, shuffle=False, drop_remainder=False))
    np.testing.assert_array_equal(plain, np.arange(len(ds)))


def test_order_does_not_depend_on_batch_size():
    ds = _toy()
    ref = _all(jdata.iterate_batches(ds, 1, seed=7, epoch=4))
    for bs in (2, 5, 16, 103):
        got = _all(jdata.iterate_batches(ds, bs, seed=7, epoch=4, drop_remainder=False))
        np.testing.assert_array_equal(got, ref)
        dropped = _all(jdata.iterate_batches(ds, bs, seed=7, epoch=4))
        np.testing.assert_array_equal(dropped, ref[: len(ds) // bs * bs])


def test_batch_contents_and_shapes():
    ds = _toy()
    batches = list(jdata.iterate_batches(ds, 10, seed=0, drop_remainder=False))
    assert [b["image"].shape[0] for b in batches] == [10] * 10 + [3]
    for b in batches:
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
        assert b["index"].dtype == np.int32
        np.testing.assert_array_equal(b["image"], ds.images[b["index"]])
        np.testing.assert_array_equal(b["label"], ds.labels[b["index"]])


def test_resume_mid_epoch():
    ds = _toy()
    full = list(jdata.iterate_batches(ds, 6, seed=11, epoch=2))
    for k in (0, 1, 9, len(full)):
        rest = list(jdata.iterate_batches(ds, 6, seed=11, epoch=2, start_batch=k))
        assert len(rest) == len(full) - k
        for r, f in zip(rest, full[k:], strict=True):
            np.testing.assert_array_equal(r["index"], f["index"])
            np.testing.assert_array_equal(r["image"], f["image"])


def test_index_refers_to_the_base_split_after_slicing(data_dir):
    full = jdata.load_dataset("kmnist", "test", data_dir=data_dir)
    ev = jdata.load_dataset("kmnist", "test[8000:]", data_dir=data_dir)
    for b in jdata.iterate_batches(ev, 250, seed=0):
        assert b["index"].min() >= 8000
        np.testing.assert_array_equal(b["image"], full.images[b["index"]])
        np.testing.assert_array_equal(b["label"], full.labels[b["index"]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0, seed=0), "batch_size"),
        (dict(batch_size=4, seed=-1), "seed"),
        (dict(batch_size=4, seed=0, epoch=-1), "epoch"),
        (dict(batch_size=4, seed=0, start_batch=26), "start_batch"),
        (dict(batch_size=200, seed=0), "no full batch"),
    ],
)
def test_bad_arguments_fail_at_call_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jdata.iterate_batches(_toy(), **kwargs)


@pytest.mark.parametrize("num_devices", [8, 4])
def test_sharded_batches_equal_host_batches(num_devices):
    assert len(jax.devices()) == 8
    mesh = make_mesh(num_devices)
    ds = _toy()
    sharding = NamedSharding(mesh, P("data"))
    host = list(jdata.iterate_batches(ds, 16, seed=5, epoch=1, start_batch=2))
    dev = list(jdata.sharded_batches(ds, 16, mesh, seed=5, epoch=1, start_batch=2))
    assert len(dev) == len(host) == 4
    for h, d in zip(host, dev, strict=True):
        assert set(d) == {"image", "label", "index", "mask"}
        for key in ("image", "label", "index", "mask"):
            assert isinstance(d[key], jax.Array)
            assert d[key].sharding.is_equivalent_to(sharding, d[key].ndim)
            assert len(d[key].addressable_shards) == num_devices
            assert d[key].addressable_shards[0].data.shape[0] == 16 // num_devices
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(np.asarray(d[key]), h[key])
        assert np.asarray(d["mask"]).all()


def test_sharded_last_batch_is_padded_and_masked():
    mesh = make_mesh(8)
    ds = _toy()
    dev = list(jdata.sharded_batches(ds, 24, mesh, seed=0, drop_remainder=False))
    assert [b["image"].shape[0] for b in dev] == [24] * 5  # 103 = 4 * 24 + 7
    last = dev[-1]
    mask = np.asarray(last["mask"])
    assert mask.sum() == 7 and mask[:7].all()
    idx = np.asarray(last["index"])
    np.testing.assert_array_equal(idx[7:], idx[6])  # padding repeats the last example
    seen = np.concatenate([np.asarray(b["index"])[np.asarray(b["mask"])] for b in dev])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(ds)))


def test_sharded_batches_errors():
    mesh = make_mesh(8)
    with pytest.raises(ValueError, match="does not divide over the 8 devices"):
        jdata.sharded_batches(_toy(), 12, mesh, seed=0)
    other = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="'data'"):
        jdata.sharded_batches(_toy(), 16, other, seed=0)
