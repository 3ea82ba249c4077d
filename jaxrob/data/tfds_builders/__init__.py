"""TFDS dataset builders that prepare local files without TensorFlow.

TFDS requires a builder's module to live inside a package. The modules here import
``tensorflow_datasets`` at import time; ``jaxrob.data`` imports them only when a TFDS function is
called, so this package costs nothing when TFDS is not installed.
"""
