"""Readers for the local image datasets under the jaxrob data directory.

Every reader decodes the files it needs, checks them (magic numbers, shapes, dtypes, counts) and
returns ``uint8`` NHWC images and integer labels; :func:`load_dataset` turns them into an
:class:`ArrayDataset` of float32 images in [0, 1] and caches the decoded arrays in-process.

The data directory is the argument ``data_dir`` or, failing that, ``$JAXROB_DATA_DIR``. Its
layout is the one of ``shared/datasets`` (see each folder's ``PROVENANCE.md``)::

  mnist/derived/train-images-idx3-ubyte.gz          mnist/original_idx/{train-labels,t10k-*}.gz
  kmnist/kmnist-test-{imgs,labels}.npz
  cifar10/derived/cifar10_convnetjs_lossless.npz    cifar10/yoongikim_jpeg_q75/cifar10_*_jpg.zip
  cifar10/convnetjs_lossless_png/cifar10_labels.js
  tiny_imagenet_200_val/tiny_imagenet_200_val_official10k.zip

Split strings follow TFDS' slicing syntax: ``"test"``, ``"test[:8000]"``, ``"test[8000:]"``,
``"train[-1000:]"``, ``"train[10%:50%]"`` (percentages round to the nearest example).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import os
import pathlib
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from jaxrob._types import RowArray

DATA_DIR_ENV = "JAXROB_DATA_DIR"

# Uint8 images (N, H, W, C) and integer labels (N,), as a reader returns them.
RawSplit = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# The dataset container.


class _Decoded:
    """The rows of a :class:`LazyImages` source decoded so far (shared by its views)."""

    def __init__(self, decode: Callable[[int], np.ndarray], n: int, image_shape: tuple):
        self.decode, self.n, self.image_shape = decode, n, image_shape
        self.done = np.zeros((n,), bool)
        # np.empty: untouched rows take no memory (pages are committed when first written)
        self.rows = np.empty((n, *image_shape), np.float32)

    def get(self, rows: np.ndarray) -> np.ndarray:
        for p in np.unique(rows[~self.done[rows]]):
            img = np.asarray(self.decode(int(p)))
            if img.shape != self.image_shape or img.dtype != np.float32:
                raise ValueError(f"LazyImages: decode({int(p)}) returned {img.dtype} "
                                 f"{img.shape}, expected float32 {self.image_shape}")
            self.rows[p] = img
            self.done[p] = True
        return self.rows[rows]


class LazyImages(RowArray):
    """Float32 NHWC images decoded on first access (an array-like, not a NumPy array).

    Reading ``images[rows]`` (an int, a slice, integer positions or a boolean mask, optionally
    followed by indices of the other axes) decodes the rows not decoded before, keeps them, and
    returns a NumPy copy. So a process that reads only its own rows of every chunk (as
    :func:`jaxrob.evaluation.run_chunks` and :func:`jaxrob.parallel.put_rows` do on several JAX
    processes) decodes only its share of the dataset. ``np.asarray(images)`` decodes every
    row. :meth:`take` is a view that shares the decoded rows (:meth:`ArrayDataset.subset` of a
    lazy dataset uses it).

    Attributes:
      shape: ``(N, H, W, C)``.
      dtype: float32.
      ndim: 4.
      decoded: positions (in this view) of the rows decoded so far.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, decode: Callable[[int], np.ndarray], n: int,
                 image_shape: tuple[int, int, int]):
        """``decode(i)`` returns row ``i`` (``0 <= i < n``) as float32 ``image_shape``."""
        image_shape = tuple(int(v) for v in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1 or int(n) < 0:
            raise ValueError(f"LazyImages: expected n >= 0 and an (H, W, C) image shape, got "
                             f"n={n}, image_shape={image_shape}")
        self._source = _Decoded(decode, int(n), image_shape)
        self._rows = np.arange(int(n), dtype=np.int64)

    @classmethod
    def _view(cls, source: _Decoded, rows: np.ndarray) -> LazyImages:
        out = cls.__new__(cls)
        out._source, out._rows = source, rows
        return out

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (int(self._rows.shape[0]), *self._source.image_shape)

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    def __repr__(self) -> str:
        return (f"LazyImages(shape={self.shape}, dtype=float32, "
                f"decoded={int(self._source.done[self._rows].sum())})")

    @property
    def decoded(self) -> np.ndarray:
        return np.flatnonzero(self._source.done[self._rows])

    def take(self, sel) -> LazyImages:
        """The rows ``sel`` (a slice, positions or a boolean mask) as a lazy view."""
        rows = self._rows[sel]
        return LazyImages._view(self._source, np.atleast_1d(rows))

    def __getitem__(self, key) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(first, int | np.integer | slice):
            first = np.asarray(first)  # lists, JAX arrays
        rows = self._rows[first]
        scalar = np.ndim(rows) == 0
        out = self._source.get(np.atleast_1d(rows))
        if scalar:
            out = out[0]
        if rest:
            out = out[(*(() if scalar else (slice(None),)), *rest)]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An in-memory image classification split.

    Attributes:
      images: float32 NHWC array with values in [0, 1], or a :class:`LazyImages` whose rows
        are decoded on first access (``jaxrob.data.load_imagenet(..., lazy=True)``).
      labels: int32 array of shape (N,), values in ``[0, num_classes)``.
      name: the dataset's registry name (``"mnist"``, ``"cifar10_jpeg"``, ...).
      split: the split as requested, slice included (``"test[8000:]"``).
      num_classes: number of classes.
      indices: int32 array of shape (N,): the position of each example in the unsliced base
        split (``indices[0] == 8000`` for ``"test[8000:]"``). Batches carry these as their
        ``index``, so per-example keys (``fold_in(key, index)``) and stored per-example results
        name the same image whatever slice, batch size or device count produced them.
        Defaults to ``arange(N)``.

    Arrays returned by :func:`load_dataset` are read-only views of a shared in-process cache;
    copy them (or use :meth:`subset`, which gathers) before writing.
    """

    images: np.ndarray | LazyImages
    labels: np.ndarray
    name: str
    split: str
    num_classes: int
    indices: np.ndarray | None = None

    def __post_init__(self):
        images, labels = self.images, self.labels
        if isinstance(images, LazyImages):
            pass  # float32 NHWC by construction, decoded on first access
        elif not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(
                f"ArrayDataset.images: expected a float32 numpy array (N, H, W, C), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                f"{getattr(images, 'shape', '')}"
            )
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int32:
            raise ValueError(
                f"ArrayDataset.labels: expected an int32 numpy array (N,), got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                f"{getattr(labels, 'shape', '')}"
            )
        if len(labels) != len(images):
            raise ValueError(f"ArrayDataset: {len(images)} images but {len(labels)} labels")
        if self.indices is None:
            object.__setattr__(self, "indices", np.arange(len(images), dtype=np.int32))
        elif (
            not isinstance(self.indices, np.ndarray)
            or self.indices.shape != labels.shape
            or self.indices.dtype != np.int32
        ):
            raise ValueError(
                f"ArrayDataset.indices: expected int32 of shape {labels.shape}, "
                f"got {getattr(self.indices, 'dtype', type(self.indices))} "
                f"{getattr(self.indices, 'shape', '')}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.images.shape[1:]}, num_classes={self.num_classes})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> ArrayDataset:
        """The examples at ``indices`` (positions in this dataset), as a new dataset.

        Args:
          indices: a ``slice``, an integer array/sequence of positions, or a boolean mask of
            length ``len(self)``.

        Returns:
          An :class:`ArrayDataset` with the same name, split and classes, whose ``indices``
          still refer to the unsliced base split.
        """
        if isinstance(indices, slice):
            sel = indices
        else:
            sel = np.asarray(indices)
            if sel.dtype == bool:
                if sel.shape != (len(self),):
                    raise ValueError(
                        f"subset: boolean mask of shape {sel.shape}, expected ({len(self)},)"
                    )
            elif sel.ndim != 1 or (sel.size and not np.issubdtype(sel.dtype, np.integer)):
                raise ValueError(
                    f"subset: expected a slice, 1-D integer positions or a "
                    f"boolean mask, got {sel.dtype} of shape {sel.shape}"
                )
            else:
                sel = sel.astype(np.int64)
                if sel.size and (sel.min() < -len(self) or sel.max() >= len(self)):
                    raise IndexError(
                        f"subset: positions must lie in [0, {len(self)}), got "
                        f"range [{sel.min()}, {sel.max()}]"
                    )
        images = self.images
        return ArrayDataset(
            images=images.take(sel) if isinstance(images, LazyImages) else images[sel],
            labels=self.labels[sel],
            name=self.name,
            split=self.split,
            num_classes=self.num_classes,
            indices=self.indices[sel],
        )


# --------------------------------------------------------------------------------------------
# Data directory, files and validation helpers.


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory that holds the dataset files.

    Args:
      data_dir: explicit directory; takes precedence over the environment.

    Returns:
      The directory as an absolute path (``~`` expanded).

    Raises:
      ValueError: neither ``data_dir`` nor ``$JAXROB_DATA_DIR`` is set.
      NotADirectoryError: the chosen path is not an existing directory.
    """
    if data_dir is not None and str(data_dir) != "":
        source = "the data_dir argument"
        path = data_dir
    elif os.environ.get(DATA_DIR_ENV):
        source = f"${DATA_DIR_ENV}"
        path = os.environ[DATA_DIR_ENV]
    else:
        raise ValueError(
            f"no data directory: pass data_dir=... or set the environment "
            f"variable {DATA_DIR_ENV} to the folder that holds mnist/, kmnist/, "
            f"cifar10/, ... (e.g. shared/datasets)"
        )
    p = pathlib.Path(path).expanduser().resolve()
    if not p.is_dir():
        raise NotADirectoryError(
            f"data directory {p} (from {source}) is not an existing "
            f"directory; pass data_dir=... or set {DATA_DIR_ENV}"
        )
    return p


def _require_file(data_dir: pathlib.Path, rel: str) -> pathlib.Path:
    p = data_dir / rel
    if not p.is_file():
        raise FileNotFoundError(
            f"dataset file {p} not found (data directory {data_dir}, "
            f"chosen by the data_dir argument or ${DATA_DIR_ENV}); "
            f"expected <data_dir>/{rel}"
        )
    return p


def _check_array(arr: np.ndarray, path, what: str, shape: tuple, dtype=np.uint8) -> None:
    """Raise ValueError unless ``arr`` has ``shape`` (None = any size) and ``dtype``."""
    ok = (
        arr.ndim == len(shape)
        and all(s is None or s == a for s, a in zip(shape, arr.shape, strict=True))
        and arr.dtype == dtype
    )
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(
            f"{path}: {what}: expected {np.dtype(dtype)} of shape {want}, got "
            f"{arr.dtype} of shape {arr.shape}"
        )


def _check_labels(labels: np.ndarray, path, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: expected labels in [0, {num_classes}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )


def read_idx_gz(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
    """Decode a gzip-compressed IDX file of unsigned bytes (the MNIST format).

    The IDX header is two zero bytes, a type byte (0x08 = uint8), the number of dimensions,
    then one big-endian uint32 per dimension; the data follow.

    Args:
      path: the ``.gz`` file.
      ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
      A ``uint8`` array with the shape given in the header.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: not gzip, truncated or corrupt, a wrong magic number, or a payload whose
        length disagrees with the header.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{path}: expected a gzip-compressed IDX file, but it cannot be "
            f"decompressed ({type(e).__name__}: {e}); the file is corrupt or "
            f"truncated"
        ) from None
    want_magic = 0x0800 | ndim
    if len(data) < 4 + 4 * ndim:
        raise ValueError(
            f"{path}: expected an IDX header of {4 + 4 * ndim} bytes, got a file "
            f"of {len(data)} bytes"
        )
    (magic,) = struct.unpack(">I", data[:4])
    if magic != want_magic:
        raise ValueError(
            f"{path}: expected IDX magic number {want_magic} (0x{want_magic:08x}: "
            f"uint8, {ndim} dims), got {magic} (0x{magic:08x})"
        )
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    payload = len(data) - 4 - 4 * ndim
    if payload != int(np.prod(dims)):
        raise ValueError(
            f"{path}: IDX header says shape {dims} = {int(np.prod(dims))} bytes, "
            f"but {payload} bytes of data follow (truncated or corrupt)"
        )
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_npz_array(path: pathlib.Path, key: str) -> np.ndarray:
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(
            f"{path}: expected a numpy .npz archive with {key!r}, but it cannot "
            f"be read ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: expected a numpy .npz archive with {key!r}, got a single {type(z).__name__}"
        )
    with z:
        if key not in z.files:
            raise ValueError(f"{path}: expected an array named {key!r}, found {z.files}")
        try:
            return z[key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(
                f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e})"
            ) from None


def _open_zip(path: pathlib.Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{path}: expected a zip archive of JPEG images, but it cannot be "
            f"opened ({type(e).__name__}: {e})"
        ) from None


def _decode_image(data: bytes, where: str, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB" if shape[2] == 3 else "L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"{where}: expected a decodable image, got an error ({type(e).__name__}: {e})"
        ) from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != shape:
        raise ValueError(f"{where}: expected an image of shape {shape}, got {arr.shape}")
    return arr


def _read_zip_member(zf: zipfile.ZipFile, zpath, name: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise ValueError(f"{zpath}: expected a member {name!r}, which is missing") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(
            f"{zpath}: member {name!r} cannot be read ({type(e).__name__}: {e})"
        ) from None


# --------------------------------------------------------------------------------------------
# Readers: (split, data_dir) -> (uint8 NHWC images, labels).

MNIST_FILES = {
    "train": (
        "mnist/derived/train-images-idx3-ubyte.gz",
        "mnist/original_idx/train-labels-idx1-ubyte.gz",
    ),
    "test": (
        "mnist/original_idx/t10k-images-idx3-ubyte.gz",
        "mnist/original_idx/t10k-labels-idx1-ubyte.gz",
    ),
}


def _read_mnist(split: str, data_dir: pathlib.Path) -> RawSplit:
    img_rel, lab_rel = MNIST_FILES[split]
    img_path, lab_path = _require_file(data_dir, img_rel), _require_file(data_dir, lab_rel)
    images = read_idx_gz(img_path, ndim=3)
    labels = read_idx_gz(lab_path, ndim=1)
    _check_array(images, img_path, "IDX images", (None, 28, 28))
    if len(images) != len(labels):
        raise ValueError(
            f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels"
        )
    _check_labels(labels, lab_path, 10)
    return images[..., None], labels


def _read_kmnist(split: str, data_dir: pathlib.Path) -> RawSplit:
    img_path = _require_file(data_dir, f"kmnist/kmnist-{split}-imgs.npz")
    lab_path = _require_file(data_dir, f"kmnist/kmnist-{split}-labels.npz")
    images = _load_npz_array(img_path, "arr_0")
    labels = _load_npz_array(lab_path, "arr_0")
    _check_array(images, img_path, "arr_0", (None, 28, 28))
    _check_array(labels, lab_path, "arr_0", (len(images),))
    _check_labels(labels, lab_path, 10)
    return images[..., None], labels


CIFAR10_LOSSLESS_FILE = "cifar10/derived/cifar10_convnetjs_lossless.npz"


def _read_cifar10_lossless(split: str, data_dir: pathlib.Path) -> RawSplit:
    path = _require_file(data_dir, CIFAR10_LOSSLESS_FILE)
    images = _load_npz_array(path, f"{split}_x")
    labels = _load_npz_array(path, f"{split}_y")
    _check_array(images, path, f"{split}_x", (None, 32, 32, 3))
    _check_array(labels, path, f"{split}_y", (len(images),))
    _check_labels(labels, path, 10)
    return images, labels


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_JPEG_FILES = {
    s: f"cifar10/yoongikim_jpeg_q75/cifar10_{s}_jpg.zip" for s in ("train", "test")
}
CIFAR10_LABELS_JS = "cifar10/convnetjs_lossless_png/cifar10_labels.js"


def _read_cifar10_labels_js(data_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Official CIFAR-10 labels: all 50000 train, and test 0..999."""
    path = _require_file(data_dir, CIFAR10_LABELS_JS)
    text = path.read_text(errors="replace")
    m = re.search(r"\[([\d,\s]*)\]", text)
    try:
        labels = np.asarray(json.loads("[" + m.group(1) + "]"), np.int64) if m else None
    except ValueError:
        labels = None
    if labels is None or labels.shape != (51000,):
        got = "no parsable [...] list" if labels is None else f"{labels.shape[0]} labels"
        raise ValueError(
            f"{path}: expected 'var labels=[...]' with 51000 labels (50000 train "
            f"then test 0..999), got {got}"
        )
    _check_labels(labels, path, 10)
    return labels[:50000], labels[50000:]


def cifar10_jpeg_member_order(
    split: str, known_labels: np.ndarray, per_class: int
) -> list[tuple[str, int]]:
    """The zip members of the JPEG CIFAR-10 ``split`` in jaxrob's order, with their labels.

    A member ``<split>/<class>/<NNNN>.jpg`` is the NNNN-th image of its class in official batch
    order, so the official labels give the official order: official image ``i`` of label ``c`` is
    member ``NNNN = #{j < i : label_j = c}``. With all 50000 train labels this recovers the full
    official train order. Only test labels 0..999 are known, so test examples 0..999 are the
    official test images 0..999 and the remaining 9000 follow round robin over the classes (the
    first remaining image of each class in class order, then the second, ...) — every prefix
    stays close to class-balanced, but beyond 999 the order is not the official one.

    Args:
      split: ``"train"`` or ``"test"`` (only used for the member paths).
      known_labels: official labels of the first ``len(known_labels)`` images of the split.
      per_class: images per class in the split (5000 train, 1000 test).

    Returns:
      A list of (member name, label) of length ``10 * per_class``.
    """
    seen = np.zeros(10, np.int64)
    order = []
    for c in np.asarray(known_labels):
        order.append((int(seen[c]), int(c)))
        seen[c] += 1
    if (seen > per_class).any():
        raise ValueError(
            f"cifar10_jpeg {split}: labels give {seen.tolist()} images per class, "
            f"more than the {per_class} per class of the zip"
        )
    # Round robin over classes: the r-th remaining image of every class, for r = 0, 1, ...
    rest = sorted(
        (k - int(seen[c]), c, k) for c in range(10) for k in range(int(seen[c]), per_class)
    )
    order.extend((k, c) for _, c, k in rest)
    return [(f"{split}/{CIFAR10_CLASSES[c]}/{k:04d}.jpg", c) for k, c in order]


def _read_cifar10_jpeg(split: str, data_dir: pathlib.Path) -> RawSplit:
    zpath = _require_file(data_dir, CIFAR10_JPEG_FILES[split])
    train_labels, test_labels = _read_cifar10_labels_js(data_dir)
    per_class = {"train": 5000, "test": 1000}[split]
    members = cifar10_jpeg_member_order(
        split, train_labels if split == "train" else test_labels, per_class
    )
    with _open_zip(zpath) as zf:
        jpgs = {n for n in zf.namelist() if n.endswith(".jpg")}
        expected = {n for n, _ in members}
        if jpgs != expected:
            extra, missing = sorted(jpgs - expected), sorted(expected - jpgs)
            raise ValueError(
                f"{zpath}: expected the {len(expected)} members "
                f"{split}/<class>/<0000..{per_class - 1:04d}>.jpg; "
                f"{len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(extra)} unexpected (e.g. {extra[:3]})"
            )
        images = np.empty((len(members), 32, 32, 3), np.uint8)
        for i, (name, _) in enumerate(members):
            images[i] = _decode_image(
                _read_zip_member(zf, zpath, name), f"{zpath}:{name}", (32, 32, 3)
            )
    labels = np.asarray([c for _, c in members], np.int64)
    return images, labels


TINY_IMAGENET_FILE = "tiny_imagenet_200_val/tiny_imagenet_200_val_official10k.zip"
_TINY_ROOT = "tiny-imagenet-200/"


def _read_tiny_imagenet(split: str, data_dir: pathlib.Path) -> RawSplit:
    del split  # only "val"
    zpath = _require_file(data_dir, TINY_IMAGENET_FILE)
    with _open_zip(zpath) as zf:
        wnids = _read_zip_member(zf, zpath, _TINY_ROOT + "wnids.txt").decode().split()
        if len(wnids) < 200 or len(set(wnids[:200])) != 200:
            raise ValueError(
                f"{zpath}: wnids.txt: expected at least 200 distinct wnids, got "
                f"{len(wnids)} ({len(set(wnids[:200]))} distinct in the first 200)"
            )
        class_of = {w: i for i, w in enumerate(wnids[:200])}
        ann = _read_zip_member(zf, zpath, _TINY_ROOT + "val/val_annotations.txt").decode()
        wnid_of = {}
        for line in ann.splitlines():
            parts = line.strip().split("\t")
            if len(parts) >= 2:
                wnid_of[parts[0]] = parts[1]
        n = 10000
        images = np.empty((n, 64, 64, 3), np.uint8)
        labels = np.empty((n,), np.int64)
        for i in range(n):
            fname = f"val_{i}.JPEG"
            wnid = wnid_of.get(fname)
            if wnid not in class_of:
                raise ValueError(
                    f"{zpath}: val_annotations.txt: expected {fname} to have one "
                    f"of the first 200 wnids of wnids.txt, got {wnid!r}"
                )
            labels[i] = class_of[wnid]
            member = f"{_TINY_ROOT}val/images/{fname}"
            images[i] = _decode_image(
                _read_zip_member(zf, zpath, member), f"{zpath}:{member}", (64, 64, 3)
            )
    return images, labels


def _read_digits(split: str, data_dir: pathlib.Path | None) -> RawSplit:
    del data_dir  # bundled with scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.float64)  # (1797, 8, 8), integer values 0..16
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target
    )
    idx = idx_train if split == "train" else idx_test
    # Values 0..16 -> [0, 1]; returned in 16ths, see DatasetSpec.max_value.
    return images[idx][..., None].astype(np.uint8), d.target[idx]


# --------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`load_dataset` knows about one registered dataset.

    Attributes:
      name: registry name.
      reader: ``(split, data_dir) -> (uint8 images NHWC, int labels)``.
      splits: available base splits and their example counts.
      num_classes: number of classes.
      image_shape: (height, width, channels).
      description: one line on source and exactness.
      max_value: raw pixel value that maps to 1.0.
      needs_data_dir: False for data bundled with a Python package.
      unavailable_splits: splits that exist upstream but not here, and why.
    """

    name: str
    reader: Callable[[str, pathlib.Path | None], RawSplit]
    splits: Mapping[str, int]
    num_classes: int
    image_shape: tuple[int, int, int]
    description: str
    max_value: float = 255.0
    needs_data_dir: bool = True
    unavailable_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "digits",
        _read_digits,
        {"train": 1437, "test": 360},
        10,
        (8, 8, 1),
        "scikit-learn load_digits (UCI optdigits), values/16; train/test = "
        "train_test_split(test_size=0.2, random_state=0, stratify=y)",
        max_value=16.0,
        needs_data_dir=False,
    ),
    "mnist": DatasetSpec(
        "mnist",
        _read_mnist,
        {"train": 60000, "test": 10000},
        10,
        (28, 28, 1),
        "MNIST from IDX .gz files, pixel-exact",
    ),
    "kmnist": DatasetSpec(
        "kmnist",
        _read_kmnist,
        {"test": 10000},
        10,
        (28, 28, 1),
        "Kuzushiji-MNIST official test npz (train on 'test[:8000]', evaluate on 'test[8000:]')",
        unavailable_splits={
            "train": (
                "only the 60000 KMNIST train *labels* (kmnist-train-labels.npz) are in the data "
                "directory, not the train images; train on 'test[:8000]' and evaluate on "
                "'test[8000:]' instead"
            )
        },
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        _read_cifar10_lossless,
        {"train": 4000, "test": 1000},
        10,
        (32, 32, 3),
        "CIFAR-10 LOSSLESS subset: official test 0..999 and train 0..3999 in official order; "
        "the other 46000 train / 9000 test images exist here only as JPEG ('cifar10_jpeg')",
    ),
    "cifar10_jpeg": DatasetSpec(
        "cifar10_jpeg",
        _read_cifar10_jpeg,
        {"train": 50000, "test": 10000},
        10,
        (32, 32, 3),
        "CIFAR-10 as lossy JPEG quality 75 (~30.5 dB PSNR): a different domain from 'cifar10'; "
        "train in official order, test 0..999 official then round robin over classes",
    ),
    "tiny_imagenet": DatasetSpec(
        "tiny_imagenet",
        _read_tiny_imagenet,
        {"val": 10000},
        200,
        (64, 64, 3),
        "Tiny-ImageNet-200 official val_0..9999, classes = first 200 wnids of wnids.txt, "
        "grayscale converted to RGB",
        unavailable_splits={
            "train": "the Tiny-ImageNet train images are not in the data directory; only 'val' is",
            "test": "Tiny-ImageNet test labels are not public; use 'val'",
        },
    ),
}


# --------------------------------------------------------------------------------------------
# Split strings.

_SPLIT_RE = re.compile(
    r"^(?P<base>[A-Za-z_][\w]*)"
    r"(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$"
)


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """Split ``"test[8000:]"`` into its base name and slice bounds (``"test", "8000", None``).

    Raises:
      ValueError: ``split`` is not ``name`` or ``name[start:stop]`` with integer or percent
        bounds.
    """
    m = _SPLIT_RE.match(split.replace(" ", "")) if isinstance(split, str) else None
    if m is None:
        raise ValueError(
            f"split: expected 'name' or 'name[start:stop]' with integer or percent "
            f"bounds (e.g. 'test', 'test[:8000]', 'test[8000:]', 'train[10%:]'), "
            f"got {split!r}"
        )
    return m.group("base"), m.group("start"), m.group("stop")


def _bound(b: str | None, n: int, default: int) -> int:
    if b is None:
        return default
    if b.endswith("%"):
        pct = int(b[:-1])
        if not -100 <= pct <= 100:
            raise ValueError(f"split: percent bounds must lie in [-100%, 100%], got {b}")
        # Round half away from zero, like TFDS' default "closest" rounding.
        v = int(np.floor(abs(pct) * n / 100 + 0.5)) * (1 if pct >= 0 else -1)
    else:
        v = int(b)
    return v


def split_positions(split: str, n: int) -> np.ndarray:
    """Positions in a base split of ``n`` examples selected by the slice in ``split``.

    Args:
      split: a split string (``"test"``, ``"test[8000:]"``, ``"train[:10%]"``).
      n: number of examples in the base split.

    Returns:
      int32 positions in increasing order (Python slice semantics, negative bounds count from
      the end).

    Raises:
      ValueError: a malformed split string, or a slice that selects no examples.
    """
    _, start, stop = parse_split(split)
    lo, hi, _ = slice(_bound(start, n, 0), _bound(stop, n, n)).indices(n)
    if hi <= lo:
        raise ValueError(f"split {split!r} selects no examples of a split with {n} examples")
    return np.arange(lo, hi, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Loading with an in-process cache.


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {sorted(DATASETS)}")
    return DATASETS[name]


def _check_base_split(spec: DatasetSpec, base: str, split: str) -> None:
    if base in spec.splits:
        return
    valid = sorted(spec.splits)
    if base in spec.unavailable_splits and spec.unavailable_splits[base]:
        raise ValueError(
            f"{spec.name}: split {split!r} is not available: "
            f"{spec.unavailable_splits[base]} (valid splits: {valid})"
        )
    raise ValueError(
        f"{spec.name}: unknown split {split!r}; valid splits: {valid}, "
        f"optionally sliced as 'name[start:stop]'"
    )


@functools.lru_cache(maxsize=8)
def _load_base(name: str, split: str, data_dir: str) -> ArrayDataset:
    spec = DATASETS[name]
    raw_images, raw_labels = spec.reader(split, pathlib.Path(data_dir) if data_dir else None)
    want = spec.splits[split]
    if raw_images.shape != (want, *spec.image_shape) or raw_labels.shape != (want,):
        raise ValueError(
            f"{name} {split}: expected images {(want, *spec.image_shape)} and "
            f"labels ({want},), got {raw_images.shape} and {raw_labels.shape}"
        )
    images = np.multiply(raw_images, np.float32(1.0 / spec.max_value), dtype=np.float32)
    labels = raw_labels.astype(np.int32)
    indices = np.arange(want, dtype=np.int32)
    for a in (images, labels, indices):
        a.flags.writeable = False
    return ArrayDataset(
        images=images,
        labels=labels,
        name=name,
        split=split,
        num_classes=spec.num_classes,
        indices=indices,
    )


def load_dataset(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> ArrayDataset:
    """Load a registered dataset split as float32 NHWC images in [0, 1] and int32 labels.

    Decoded base splits are cached in-process (keyed on name, base split and data directory;
    up to 8 of them), so slicing the same split again or reloading it is free. The cached
    arrays are read-only.

    Args:
      name: a key of :data:`DATASETS`: ``digits``, ``mnist``, ``kmnist``, ``cifar10``
        (lossless 5000-image subset), ``cifar10_jpeg`` (full, JPEG q75, a different domain)
        or ``tiny_imagenet``.
      split: a base split (``"train"``, ``"test"``, ``"val"``), optionally sliced TFDS-style:
        ``"test[:8000]"``, ``"test[8000:]"``, ``"train[-1000:]"``, ``"train[10%:]"``.
      data_dir: directory holding the dataset files; default ``$JAXROB_DATA_DIR``. Not needed
        for ``digits``.

    Returns:
      An :class:`ArrayDataset` whose ``indices`` are positions in the unsliced base split.

    Raises:
      ValueError: unknown name or split (the message lists the valid ones), a split that is
        not available here, no data directory configured, or a file that is corrupt or does
        not hold what the dataset needs.
      FileNotFoundError: a dataset file is missing.
    """
    spec = _spec(name)
    base, _, _ = parse_split(split)
    _check_base_split(spec, base, split)
    dir_key = str(resolve_data_dir(data_dir)) if spec.needs_data_dir else ""
    full = _load_base(name, base, dir_key)
    if split.replace(" ", "") == base:
        return full
    pos = split_positions(split, len(full))
    sl = slice(int(pos[0]), int(pos[-1]) + 1)  # contiguous: views, no copy
    return ArrayDataset(
        images=full.images[sl],
        labels=full.labels[sl],
        name=name,
        split=split,
        num_classes=full.num_classes,
        indices=full.indices[sl],
    )


def clear_cache() -> None:
    """Drop every decoded split held by :func:`load_dataset`'s in-process cache."""
    _load_base.cache_clear()
