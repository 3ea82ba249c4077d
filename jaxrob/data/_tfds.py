"""TensorFlow Datasets as an optional source: random-access reading and TF-free MNIST preparing.

``tensorflow-datasets`` is an optional extra (``pip install 'jaxrob[tfds]'``, which also brings
``importlib_resources`` and ``array_record``); TensorFlow is never needed. Reading goes through
``tfds.data_source`` (array_record files, decoded by PIL), and MNIST is prepared offline from the
IDX ``.gz`` files by :mod:`jaxrob.data.tfds_builders.mnist_idx`.

TFDS stores records in its own hashed-key order (MNIST train starts with labels 4, 1, 0, not the
IDX file's 5, 0, 4), so a TFDS split holds the same examples as the local reader's split but in a
different order; :func:`load_tfds_dataset` names its datasets ``"tfds:<name>"`` to keep the two
apart.
"""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

from jaxrob.data._readers import MNIST_FILES, ArrayDataset, parse_split, split_positions

_INSTALL_HINT = (
    "pip install 'jaxrob[tfds]' (tensorflow-datasets, importlib_resources, "
    "array_record; TensorFlow is not needed)"
)


def _import_tfds():
    """Import ``tensorflow_datasets`` or raise an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"this function needs tensorflow-datasets, which is not installed: {_INSTALL_HINT}"
        ) from e
    return tfds


def _tfds_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(
            "data_dir: expected the TFDS data directory (where prepared datasets "
            "live, e.g. the one given to prepare_mnist_tfds), got nothing"
        )
    return pathlib.Path(data_dir).expanduser().resolve()


def tfds_source(name: str, split: str, *, data_dir: str | os.PathLike, decoders=None):
    """A random-access TFDS data source of a prepared dataset; never downloads.

    Args:
      name: TFDS dataset name (``"mnist"``).
      split: TFDS split, slicing allowed (``"train"``, ``"test[8000:]"``).
      data_dir: TFDS data directory the dataset was prepared in.
      decoders: optional TFDS decoders, e.g. ``{"image": tfds.decode.SkipDecoding()}`` to get
        the encoded image bytes (reading labels only is then several times faster).

    Returns:
      A sequence-like source (``len(src)``, ``src[i]`` -> dict of numpy features, e.g.
      ``image`` uint8 (28, 28, 1) and ``label``), read without TensorFlow.

    Raises:
      ImportError: tensorflow-datasets is not installed.
      FileNotFoundError: the dataset is not prepared in ``data_dir``.
      ValueError: unknown dataset name or split.
    """
    tfds = _import_tfds()
    root = _tfds_dir(data_dir)
    builder = tfds.builder(name, data_dir=str(root))
    if not builder.is_prepared():
        hint = (
            " (prepare it offline with jaxrob.data.prepare_mnist_tfds)" if name == "mnist" else ""
        )
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {root}: expected "
            f"{builder.data_dir}/dataset_info.json{hint}"
        )
    return tfds.data_source(
        name, split=split, data_dir=str(root), download=False, decoders=decoders
    )


@functools.lru_cache(maxsize=4)
def _load_tfds_base(name: str, split: str, data_dir: str) -> ArrayDataset:
    src = tfds_source(name, split, data_dir=data_dir)
    info = src.dataset_info
    if not info.supervised_keys or len(info.supervised_keys) != 2:
        raise ValueError(
            f"TFDS {name}: expected (image, label) supervised_keys, got {info.supervised_keys!r}"
        )
    image_key, label_key = info.supervised_keys
    n = len(src)
    records = (
        src.__getitems__(list(range(n)))
        if hasattr(src, "__getitems__")
        else [src[i] for i in range(n)]
    )
    images = np.stack([np.asarray(r[image_key]) for r in records])
    labels = np.asarray([r[label_key] for r in records])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"TFDS {name} {split}: expected uint8 images (N, H, W, C), got "
            f"{images.dtype} {images.shape}"
        )
    images = np.multiply(images, np.float32(1 / 255), dtype=np.float32)
    labels = labels.astype(np.int32)
    indices = np.arange(n, dtype=np.int32)
    for a in (images, labels, indices):
        a.flags.writeable = False
    return ArrayDataset(
        images=images,
        labels=labels,
        name=f"tfds:{name}",
        split=split,
        num_classes=int(info.features[label_key].num_classes),
        indices=indices,
    )


def load_tfds_dataset(name: str, split: str, *, data_dir: str | os.PathLike) -> ArrayDataset:
    """Read a prepared TFDS image classification split into an :class:`ArrayDataset`.

    Decoded base splits are cached in-process (up to 4), like :func:`load_dataset`.

    Args:
      name: TFDS dataset name with ``(image, label)`` supervised keys and uint8 images.
      split: a base split, optionally sliced (``"test[:8000]"``, ``"train[10%:]"``; same
        semantics as :func:`load_dataset`).
      data_dir: TFDS data directory the dataset was prepared in.

    Returns:
      An :class:`ArrayDataset` named ``"tfds:<name>"``, in TFDS' record order; ``indices`` are
      positions in that order.

    Raises:
      ImportError: tensorflow-datasets is not installed.
      FileNotFoundError: the dataset is not prepared in ``data_dir``.
      ValueError: unknown name or split, or features that are not uint8 images + labels.
    """
    base, _, _ = parse_split(split)
    full = _load_tfds_base(name, base, str(_tfds_dir(data_dir)))
    if split.replace(" ", "") == base:
        return full
    pos = split_positions(split, len(full))
    sl = slice(int(pos[0]), int(pos[-1]) + 1)
    return ArrayDataset(
        images=full.images[sl],
        labels=full.labels[sl],
        name=full.name,
        split=split,
        num_classes=full.num_classes,
        indices=full.indices[sl],
    )


def _find_mnist_idx(idx_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """Split -> (images, labels) paths: in ``idx_dir`` itself or in a jaxrob data dir layout."""
    from jaxrob.data._readers import DATA_DIR_ENV

    flat = {
        s: (idx_dir / pathlib.PurePath(i).name, idx_dir / pathlib.PurePath(lab).name)
        for s, (i, lab) in MNIST_FILES.items()
    }
    layout = {s: (idx_dir / i, idx_dir / lab) for s, (i, lab) in MNIST_FILES.items()}
    for candidate in (flat, layout):
        if all(p.is_file() for pair in candidate.values() for p in pair):
            return candidate
    want = sorted(p.name for pair in flat.values() for p in pair)
    raise FileNotFoundError(
        f"MNIST IDX files not found under {idx_dir}: expected the four "
        f"files {want} in that folder, or a jaxrob data directory "
        f"(${DATA_DIR_ENV}) holding "
        f"{sorted(p for pair in MNIST_FILES.values() for p in pair)}"
    )


def prepare_mnist_tfds(idx_dir: str | os.PathLike, data_dir: str | os.PathLike) -> pathlib.Path:
    """Prepare TFDS ``mnist`` (array_record) from local IDX ``.gz`` files, without TensorFlow.

    Nothing is downloaded and no checksum is checked against upstream (the IDX files are
    validated by :func:`jaxrob.data.read_idx_gz` instead). A dataset already prepared in
    ``data_dir`` is left as it is. Afterwards ``tfds.data_source('mnist', data_dir=data_dir)``
    and :func:`tfds_source` read it, with or without TensorFlow.

    Args:
      idx_dir: a folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``, or a jaxrob data
        directory (whose ``mnist/`` files are used).
      data_dir: TFDS data directory to write into.

    Returns:
      The prepared dataset's directory (``<data_dir>/mnist/<version>``).

    Raises:
      ImportError: tensorflow-datasets (or one of its optional needs) is not installed.
      FileNotFoundError: IDX files missing.
      ValueError: corrupt IDX files.
    """
    tfds = _import_tfds()
    for module in ("importlib_resources", "array_record"):
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"prepare_mnist_tfds needs {module}: {_INSTALL_HINT}") from e
    from jaxrob.data.tfds_builders.mnist_idx import MnistFromIdx

    idx_dir = pathlib.Path(idx_dir).expanduser().resolve()
    paths = _find_mnist_idx(idx_dir)
    root = _tfds_dir(data_dir)
    builder = MnistFromIdx(data_dir=str(root), file_format="array_record")
    builder.idx_paths = paths
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(idx_dir))
    )
    return pathlib.Path(builder.data_dir)
