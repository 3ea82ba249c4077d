"""Datasets: local file readers, deterministic batching, and TensorFlow Datasets (optional).

:func:`load_imagenet` reads an ImageNet-layout folder (wnid sub-folders, or a flat folder and a
labels file) in torchvision's class order with its resize + center-crop, decoding only the
requested slice (``lazy=True``: each image when its row is first read, a
:class:`LazyImages`, so each JAX process decodes only the rows it places).
"""

from jaxrob.data._imagenet import imagenet_index as imagenet_index
from jaxrob.data._imagenet import load_imagenet as load_imagenet
from jaxrob.data._imagenet import resize_center_crop as resize_center_crop
from jaxrob.data._pipeline import epoch_order as epoch_order
from jaxrob.data._pipeline import iterate_batches as iterate_batches
from jaxrob.data._pipeline import num_batches as num_batches
from jaxrob.data._pipeline import sharded_batches as sharded_batches
from jaxrob.data._readers import CIFAR10_CLASSES as CIFAR10_CLASSES
from jaxrob.data._readers import DATASETS as DATASETS
from jaxrob.data._readers import ArrayDataset as ArrayDataset
from jaxrob.data._readers import DatasetSpec as DatasetSpec
from jaxrob.data._readers import LazyImages as LazyImages
from jaxrob.data._readers import clear_cache as clear_cache
from jaxrob.data._readers import load_dataset as load_dataset
from jaxrob.data._readers import read_idx_gz as read_idx_gz
from jaxrob.data._readers import resolve_data_dir as resolve_data_dir
from jaxrob.data._tfds import load_tfds_dataset as load_tfds_dataset
from jaxrob.data._tfds import prepare_mnist_tfds as prepare_mnist_tfds
from jaxrob.data._tfds import tfds_source as tfds_source
