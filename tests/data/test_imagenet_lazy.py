"""jaxrob.data.load_imagenet(..., lazy=True): images decoded when their rows are first read.

The point is several JAX processes: ``run_chunks`` places every chunk with ``put_rows``, and
each process reads only the rows that its own devices hold, so with a lazy dataset each process
decodes only those rows. Simulated here on one process (``jax.process_count`` and
``jax.make_array_from_callback`` patched so that only one simulated process's devices read
their rows), and with two real local JAX processes (slow).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.random as jr
import numpy as np
import pytest
from PIL import Image

from jaxrob.data import ArrayDataset, LazyImages, load_imagenet
from jaxrob.data import _imagenet as imagenet_module
from jaxrob.evaluation import run_chunks
from jaxrob.parallel import data_sharding, make_mesh

REPO = pathlib.Path(__file__).resolve().parents[2]
SPLIT = "val[1:11]"  # 10 of the folder's 12 images
SIZES = dict(image_size=8, resize_size=10)


def make_folder(root: pathlib.Path) -> pathlib.Path:
    """Three wnid folders of 4 random-noise PNGs (12 images, 21 x 15)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / f"n0{c + 1}000000"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (15, 21, 3), dtype=np.uint8)).save(
                d / f"img_{i}.png")
    return root


def _count_decodes(monkeypatch):
    calls = []
    real = imagenet_module._decode
    monkeypatch.setattr(imagenet_module, "_decode",
                        lambda path, *a: calls.append(f"{path.parent.name}/{path.name}")
                        or real(path, *a))
    return calls


def test_lazy_images_decode_each_row_once_on_first_read(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "val")
    eager = load_imagenet(folder, SPLIT, **SIZES)
    calls = _count_decodes(monkeypatch)
    ds = load_imagenet(folder, SPLIT, lazy=True, **SIZES)
    assert calls == []  # nothing decoded yet
    assert isinstance(ds, ArrayDataset) and isinstance(ds.images, LazyImages)
    assert ds.images.shape == eager.images.shape == (10, 8, 8, 3)
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4 and len(ds.images) == 10
    np.testing.assert_array_equal(ds.labels, eager.labels)
    np.testing.assert_array_equal(ds.indices, eager.indices)
    im = ds.images
    # every kind of row index, bit for bit the eager array's rows
    np.testing.assert_array_equal(im[[3, 1]], eager.images[[3, 1]])
    assert len(calls) == 2
    np.testing.assert_array_equal(im[1], eager.images[1])  # decoded already
    np.testing.assert_array_equal(im[2:5], eager.images[2:5])  # 2, 4 new
    assert len(calls) == 4
    np.testing.assert_array_equal(im[-1], eager.images[-1])
    mask = np.zeros(10, bool)
    mask[[0, 9]] = True
    np.testing.assert_array_equal(im[mask], eager.images[mask])
    np.testing.assert_array_equal(im[[0], 2:4, 1], eager.images[[0], 2:4, 1])
    np.testing.assert_array_equal(im[5, 0, 0], eager.images[5, 0, 0])
    np.testing.assert_array_equal(im[jax.numpy.asarray([6])], eager.images[[6]])
    np.testing.assert_array_equal(im.decoded, [0, 1, 2, 3, 4, 5, 6, 9])
    assert len(calls) == 8
    # a subset is a lazy view sharing the decoded rows
    sub = ds.subset(slice(6, 9))
    assert isinstance(sub.images, LazyImages) and sub.images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(sub.images.decoded, [0])
    np.testing.assert_array_equal(sub.images[:], eager.images[6:9])
    np.testing.assert_array_equal(sub.indices, eager.indices[6:9])
    assert len(calls) == 10 and im.decoded.size == 10
    # the whole array, decoded once per row in all
    np.testing.assert_array_equal(np.asarray(im), eager.images)
    assert len(calls) == len(set(calls)) == 10
    with pytest.raises(IndexError):
        im[10]


def _simulate_process(monkeypatch, p: int, num_processes: int, mesh):
    """This process acts as process ``p`` of ``num_processes``: the mesh's devices are split
    evenly among them in order, and a placed array reads (through the callback that
    ``put_rows`` gives ``jax.make_array_from_callback``) only the rows of ``p``'s devices; the
    other processes' rows are zeros."""
    real = jax.make_array_from_callback
    devices = list(mesh.devices.flat)
    per = len(devices) // num_processes
    own_devices = set(devices[p * per:(p + 1) * per])

    def key(index):
        return tuple((s.start, s.stop, s.step) for s in index)

    def simulated(shape, sharding, callback):
        m = sharding.devices_indices_map(shape)
        own = {key(i): np.asarray(callback(i)) for d, i in m.items() if d in own_devices}
        dtype = next(iter(own.values())).dtype
        return real(shape, sharding, lambda i: own.get(key(i), np.zeros(shape, dtype)[i]))

    monkeypatch.setattr(jax, "process_count", lambda: num_processes)
    monkeypatch.setattr(jax, "make_array_from_callback", simulated)
    return own_devices


def _images_of(batch, keys):
    return {"x": batch["x"]}


@pytest.mark.parametrize("num_processes", [2, 4])
def test_each_simulated_process_decodes_only_the_rows_it_places(tmp_path, monkeypatch,
                                                                 num_processes):
    folder = make_folder(tmp_path / "val")
    eager = load_imagenet(folder, SPLIT, **SIZES)
    n, batch = len(eager), 8
    mesh = make_mesh(8)
    # the rows each process's devices hold: chunks [0, 8) and [8, 10), the second padded to 8
    # by repeating row 9; a padded position is read (and so decoded) but not kept
    held = data_sharding(mesh).devices_indices_map((batch,))
    chunks = [(np.arange(0, 8), 8), (np.minimum(np.arange(8, 16), n - 1), 2)]
    union = np.zeros_like(eager.images)
    kept_sets = []
    for p in range(num_processes):
        with monkeypatch.context() as m:
            calls = _count_decodes(m)
            own_devices = _simulate_process(m, p, num_processes, mesh)
            pos = [np.arange(batch)[held[d][0]] for d in own_devices]
            want = np.unique(np.concatenate([rows[q] for rows, _ in chunks for q in pos]))
            kept = np.unique(np.concatenate([rows[q[q < k]] for rows, k in chunks
                                             for q in pos]))
            ds = load_imagenet(folder, SPLIT, lazy=True, **SIZES)
            run = run_chunks(_images_of, {"x": ds.images, "index": ds.indices},
                             key=jr.key(0), batch_size=batch, mesh=mesh, progress=False)
        # decoded: exactly the rows its devices hold (padding included), each once
        np.testing.assert_array_equal(ds.images.decoded, want)
        assert len(calls) == want.size == len(set(calls))
        # the rows it places in the record are the eager array's, bit for bit (the other
        # processes' rows come from them: zeros in this simulation)
        np.testing.assert_array_equal(run.records["x"][kept], eager.images[kept])
        union[kept] = run.records["x"][kept]
        kept_sets.append(kept)
    # the processes' kept rows partition the slice; together they give the eager array
    np.testing.assert_array_equal(np.sort(np.concatenate(kept_sets)), np.arange(n))
    np.testing.assert_array_equal(union, eager.images)


def _linear(x, keys):
    return x.reshape(x.shape[0], -1)[:, :3] - 0.5


def test_evaluate_robustness_on_lazy_images_records_the_eager_ones(tmp_path, monkeypatch):
    from jaxrob.evaluation import evaluate_robustness

    folder = make_folder(tmp_path / "val")
    eager = load_imagenet(folder, SPLIT, **SIZES)
    calls = _count_decodes(monkeypatch)
    ds = load_imagenet(folder, SPLIT, lazy=True, **SIZES)
    kw = dict(key=jr.key(0), batch_size=8, mesh=make_mesh(8), progress=False, self_check=0)
    got = evaluate_robustness(_linear, None, ds.images, ds.labels, ds.indices, **kw)
    want = evaluate_robustness(_linear, None, eager.images, eager.labels, eager.indices, **kw)
    for k in ("index", "label", "pred_clean"):
        np.testing.assert_array_equal(got["per_example"][k], want["per_example"][k])
    assert got["clean"] == want["clean"]
    # every row decoded once, by the chunks (the checks before them decode nothing)
    assert len(calls) == len(set(calls)) == len(eager)


# ----------------------------------------------------------------------------- two processes

_WORKER = r"""
import json, sys
import jax
import jax.random as jr
import numpy as np
from jaxrob.parallel import initialize_distributed, make_mesh
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from jaxrob.data import _imagenet as mod, load_imagenet
from jaxrob.evaluation import run_chunks
calls = []
real = mod._decode
mod._decode = lambda path, *a: calls.append(path.name) or real(path, *a)
ds = load_imagenet(sys.argv[3], "val[1:11]", image_size=8, resize_size=10, lazy=True)
run = run_chunks(lambda b, k: {"x": b["x"]}, {"x": ds.images, "index": ds.indices},
                 key=jr.key(0), batch_size=8, mesh=make_mesh(), progress=False)
np.save(sys.argv[4] + ".npy", run.records["x"])
json.dump({"decoded": ds.images.decoded.tolist(), "calls": calls,
           "local_devices": len(jax.local_devices()), "devices": len(jax.devices())},
          open(sys.argv[4] + ".json", "w"))
"""


@pytest.mark.slow
def test_two_real_processes_each_decode_only_their_rows(tmp_path):
    """2 JAX processes x 4 host devices: each decodes only the rows of its 4 devices (chunks
    [0, 8) and [8, 10) padded: process 0 holds 0-3, 8, 9; process 1 4-7, 9) and both gather
    the whole record, equal to the eager single-process array bit for bit."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from multihost_check import free_port, worker_env
    finally:
        sys.path.pop(0)
    folder = make_folder(tmp_path / "val")
    eager = load_imagenet(folder, SPLIT, **SIZES)
    address = f"127.0.0.1:{free_port()}"
    env = worker_env(4)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(folder),
                               str(tmp_path / f"p{i}")], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [g["local_devices"] for g in got] == [4, 4] and got[0]["devices"] == 8
    assert got[0]["decoded"] == [0, 1, 2, 3, 8, 9] and got[1]["decoded"] == [4, 5, 6, 7, 9]
    assert [len(g["calls"]) for g in got] == [6, 5]
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"p{i}.npy"), eager.images)
