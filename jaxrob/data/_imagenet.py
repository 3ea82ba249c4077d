"""An ImageNet(-layout) folder reader: torchvision's class order and eval preprocessing.

Two layouts of a split folder are read (the ImageNet validation set as users have it):

* one sub-folder per class, named by its WordNet id (``n01440764/ILSVRC2012_val_00000293.JPEG``,
  what ``torchvision.datasets.ImageFolder`` and ``torchvision.datasets.ImageNet`` read);
* a flat folder of images plus a labels file: either lines ``<file name> <wnid> ...``
  (whitespace, tab or comma separated, a header line allowed: Tiny-ImageNet's
  ``val_annotations.txt``, Kaggle's ``LOC_val_solution.csv``), or the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line, in file order) together
  with the devkit's ``meta.mat`` (``meta_file``), which maps those ids to wnids.

Class ``k`` is the ``k``-th of the sorted wnids (torchvision's index order, so the logits of
torchvision's pretrained models line up): the sub-folders in the first layout, the wnids of the
labelled images present (or ``wnids``) in the second. Examples are ordered by class, then file
name in the first layout (``ImageFolder``'s order) and by file name in the second, file names
compared with their digit runs as numbers (``val_2`` before ``val_10``); this order is the
``indices`` a split string slices. Only the selected examples' files are opened; with
``lazy=True`` each only when its row is first read (one process's share on several hosts).

Preprocessing is torchvision's evaluation transform: resize the shorter side to ``resize_size``
(the longer to ``int(resize_size * long / short)``, PIL bilinear), center crop ``image_size``
(top/left offset ``round((size - crop) / 2)``), RGB, values / 255.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from jaxrob.data._readers import ArrayDataset, LazyImages, parse_split, split_positions

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: _natural_key(p.name))


def _read_wnids(wnids) -> list[str] | None:
    if wnids is None:
        return None
    if isinstance(wnids, str | os.PathLike):
        p = pathlib.Path(wnids)
        if not p.is_file():
            raise FileNotFoundError(f"wnids: no such file {p}")
        wnids = p.read_text().split()
    wnids = [str(w) for w in wnids]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"wnids: expected distinct WordNet ids, got {len(wnids)} entries "
                         f"({len(set(wnids))} distinct)")
    return sorted(wnids)


def _devkit_wnids(meta_file: pathlib.Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the devkit's ``meta.mat`` (the 1000 leaf classes)."""
    if not meta_file.is_file():
        raise FileNotFoundError(f"meta_file: no devkit meta.mat at {meta_file}")
    from scipy.io import loadmat

    synsets = loadmat(str(meta_file), squeeze_me=True)["synsets"]
    return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # num_children == 0


def _flat_labels(folder: pathlib.Path, files: list[pathlib.Path], labels_file: pathlib.Path,
                 meta_file) -> list[str]:
    """The wnid of every file in ``files`` from the labels file."""
    lines = [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"labels_file {labels_file}: empty")
    if all(ln.isdigit() for ln in lines):  # the devkit's ground truth, in file order
        if meta_file is None:
            raise ValueError(
                f"labels_file {labels_file}: holds devkit ILSVRC2012_IDs (one integer a line); "
                f"pass meta_file=<devkit>/data/meta.mat to map them to wnids")
        if len(lines) != len(files):
            raise ValueError(f"labels_file {labels_file}: {len(lines)} labels for the "
                             f"{len(files)} images of {folder}")
        wnid_of_id = _devkit_wnids(pathlib.Path(meta_file))
        bad = sorted({int(ln) for ln in lines} - set(wnid_of_id))
        if bad:
            raise ValueError(f"labels_file {labels_file}: ILSVRC2012_IDs {bad[:5]} are not "
                             f"leaf classes of {meta_file}")
        return [wnid_of_id[int(ln)] for ln in lines]
    wnid_of = {}
    for ln in lines:
        parts = [p for p in re.split(r"[\s,]+", ln) if p]
        if len(parts) >= 2 and _WNID.match(parts[1]):
            wnid_of[pathlib.Path(parts[0]).stem] = parts[1]
    missing = [p.name for p in files if p.stem not in wnid_of]
    if missing:
        raise ValueError(f"labels_file {labels_file}: no '<file> <wnid>' line for "
                         f"{len(missing)} image(s) of {folder}, e.g. {missing[:3]}")
    return [wnid_of[p.stem] for p in files]


def imagenet_index(folder: str | os.PathLike, *, labels_file: str | os.PathLike | None = None,
                   meta_file: str | os.PathLike | None = None,
                   wnids: Sequence[str] | str | os.PathLike | None = None,
                   ) -> tuple[list[pathlib.Path], np.ndarray, list[str]]:
    """The files, labels and classes of an ImageNet-layout folder, in reading order.

    Args:
      folder: the split folder (wnid sub-folders, or a flat folder of images).
      labels_file: for a flat folder: ``<file> <wnid>`` lines or the devkit's ground truth.
      meta_file: the devkit's ``meta.mat`` (only with a devkit ground-truth labels file).
      wnids: the class list (a sequence or a file of whitespace-separated wnids; sorted here);
        None: the sub-folders, or the wnids of the labelled images.

    Returns:
      ``(files, labels, classes)``: paths in reading order, int32 labels (positions in
      ``classes``), the sorted wnids.

    Raises:
      FileNotFoundError: ``folder`` (or a named file) does not exist.
      ValueError: no images, a flat folder without a labels file, a wnid outside ``wnids``, a
        sub-folder that is not a wnid, or an image without a label.
    """
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} does not exist (expected one "
                                f"sub-folder per wnid, or a flat folder of images and a "
                                f"labels file)")
    classes = _read_wnids(wnids)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs and labels_file is None:
        not_wnid = [p.name for p in subdirs if not _WNID.match(p.name)]
        if not_wnid:
            raise ValueError(f"{folder}: sub-folders must be WordNet ids (n########), got "
                             f"{not_wnid[:5]}")
        found = [p.name for p in subdirs]
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{folder}: sub-folder(s) {unknown[:5]} are not among the "
                             f"{len(classes)} wnids given")
        index = {w: i for i, w in enumerate(classes)}
        files, labels = [], []
        for d in subdirs:
            imgs = _images_in(d)
            files += imgs
            labels += [index[d.name]] * len(imgs)
    else:
        files = _images_in(folder)
        if not files:
            raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no wnid "
                             f"sub-folders")
        if labels_file is None:
            raise ValueError(f"{folder}: a flat folder of images needs labels_file (lines "
                             f"'<file> <wnid>', or the devkit's ground truth with meta_file)")
        labels_file = pathlib.Path(labels_file).expanduser()
        if not labels_file.is_file():
            raise FileNotFoundError(f"labels_file: no such file {labels_file}")
        names = _flat_labels(folder, files, labels_file, meta_file)
        if classes is None:
            classes = sorted(set(names))
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{labels_file}: wnid(s) {unknown[:5]} are not among the "
                             f"{len(classes)} wnids given")
        index = {w: i for i, w in enumerate(classes)}
        labels = [index[w] for w in names]
    if not files:
        raise ValueError(f"{folder}: the wnid sub-folders hold no images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return files, np.asarray(labels, np.int32), classes


def resize_center_crop(image, image_size: int, resize_size: int) -> np.ndarray:
    """torchvision's ``Resize(resize_size)`` + ``CenterCrop(image_size)`` of a PIL image, RGB,
    as a uint8 (image_size, image_size, 3) array."""
    from PIL import Image

    im = image.convert("RGB")
    w, h = im.size
    if w <= h:
        size = (resize_size, int(resize_size * h / w))
    else:
        size = (int(resize_size * w / h), resize_size)
    if size != (w, h):
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return np.asarray(im.crop((left, top, left + image_size, top + image_size)), np.uint8)


def _decode(path: pathlib.Path, image_size: int, resize_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return resize_center_crop(im, image_size, resize_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: expected a decodable image ({type(e).__name__}: {e})") from None


def load_imagenet(
    folder: str | os.PathLike,
    split: str = "val",
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    labels_file: str | os.PathLike | None = None,
    meta_file: str | os.PathLike | None = None,
    wnids: Sequence[str] | str | os.PathLike | None = None,
    positions: Sequence[int] | np.ndarray | None = None,
    limit: int | None = None,
    name: str = "imagenet",
    lazy: bool = False,
) -> ArrayDataset:
    """An ImageNet-layout folder as an :class:`ArrayDataset`, decoding only the selected files.

    Args:
      folder: the split folder (see the module docstring for the two layouts).
      split: ``"<name>"`` or ``"<name>[start:stop]"`` (TFDS-style slice, as
        :func:`load_dataset`); the name only labels the dataset, the slice selects examples
        of the folder's reading order.
      image_size: the center crop (224 for the ResNet-50, 256 for guided-diffusion's ADM).
      resize_size: the shorter side before cropping; None: ``int(image_size / 0.875)``
        (torchvision's 256 for 224).
      labels_file: a flat folder's labels (``<file> <wnid>`` lines or the devkit's ground
        truth).
      meta_file: the devkit's ``meta.mat``, with a devkit ground-truth labels file.
      wnids: the class list (default: the sub-folders / the labelled wnids).
      positions: optional positions *within the slice* to decode (e.g. one process's share);
        the dataset then holds just those examples, their ``indices`` still global.
      limit: keep (and decode) only the first ``limit`` examples of the selection.
      name: the dataset's name in records.
      lazy: decode nothing here: the images are a :class:`jaxrob.data.LazyImages` that decodes
        a row when it is first read (the same values), so a process that reads only its
        share of every chunk (``run_chunks`` on several JAX processes) decodes only that share.

    Returns:
      float32 [0, 1] images ``(N, image_size, image_size, 3)`` (a NumPy array, or
      :class:`jaxrob.data.LazyImages` with ``lazy``), int32 labels (sorted-wnid index),
      ``indices`` = positions in the folder's reading order, ``num_classes`` = the number of
      wnids.

    Raises:
      FileNotFoundError: a missing folder or file.
      ValueError: bad sizes or split, an empty selection, or as :func:`imagenet_index`.
    """
    for what, v in (("image_size", image_size), ("resize_size", resize_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)
                              or v < 1):
            raise ValueError(f"{what}: expected a positive integer, got {v!r}")
    resize_size = int(image_size / 0.875) if resize_size is None else int(resize_size)
    if resize_size < image_size:
        raise ValueError(f"resize_size={resize_size} is smaller than the crop "
                         f"image_size={image_size}")
    parse_split(split)
    files, labels, classes = imagenet_index(folder, labels_file=labels_file,
                                            meta_file=meta_file, wnids=wnids)
    sel = split_positions(split, len(files))
    if positions is not None:
        pos = np.asarray(positions)
        if pos.ndim != 1 or (pos.size and (not np.issubdtype(pos.dtype, np.integer)
                                           or pos.min() < 0 or pos.max() >= len(sel))):
            raise ValueError(f"positions: expected 1-D integers in [0, {len(sel)}) (the "
                             f"slice {split!r}), got {pos.dtype} {pos.shape}")
        sel = sel[pos]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
            raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
        sel = sel[: int(limit)]

    def decode(i: int) -> np.ndarray:
        return _decode(files[int(sel[i])], image_size, resize_size) * np.float32(1 / 255)

    if lazy:
        images = LazyImages(decode, len(sel), (image_size, image_size, 3))
    else:
        images = np.empty((len(sel), image_size, image_size, 3), np.float32)
        for i in range(len(sel)):
            images[i] = decode(i)
    return ArrayDataset(images=images, labels=labels[sel].astype(np.int32), name=name,
                        split=split, num_classes=len(classes), indices=sel.astype(np.int32))
