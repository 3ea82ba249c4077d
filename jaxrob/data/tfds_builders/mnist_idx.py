"""A TensorFlow-free builder for TFDS' ``mnist`` that reads local IDX ``.gz`` files.

TFDS' own ``mnist`` builder needs TensorFlow to open gzip files, to parse IDX and to PNG-encode
numpy images, and it checks the download's sha256 against upstream gzip wrappers that differ from
ours. This subclass keeps the registered builder's name, version and features, so what it writes
is read back by ``tfds.data_source('mnist', ...)`` exactly like a copy prepared with TensorFlow,
but it reads the IDX files with jaxrob's own reader and hands TFDS PIL images, whose encoding
needs no TensorFlow.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import mnist as _tfds_mnist

from jaxrob.data._readers import read_idx_gz

# Split -> (images, labels) file names, as in the upstream release and TFDS' checksums.tsv.
MNIST_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class MnistFromIdx(_tfds_mnist.MNIST, skip_registration=True):
    """TFDS ``mnist`` prepared from IDX files given by path (no download, no TensorFlow).

    Set ``idx_paths`` (split -> (images path, labels path)) on the instance before calling
    ``download_and_prepare``.
    """

    name = "mnist"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The four MNIST IDX .gz files, passed as idx_paths."

    idx_paths: dict[str, tuple[pathlib.Path, pathlib.Path]] | None = None

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        if self.idx_paths is None:
            raise ValueError("MnistFromIdx: set idx_paths before download_and_prepare")
        return [
            tfds.core.SplitGenerator(name=split, gen_kwargs={"image_path": img, "label_path": lab})
            for split, (img, lab) in self.idx_paths.items()
        ]

    def _generate_examples(self, image_path, label_path):
        images = read_idx_gz(image_path, ndim=3)
        labels = read_idx_gz(label_path, ndim=1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"{image_path}, {label_path}: expected (N, 28, 28) images and N "
                f"labels, got {images.shape} and {labels.shape}"
            )
        for i in range(len(labels)):
            yield i, {"image": Image.fromarray(images[i]), "label": int(labels[i])}
