"""``filter_jit``: jit a function of pytrees whose array leaves are traced and the rest static.

Models, purifiers and defended classifiers are pytrees: their parameters and noise schedules are
array leaves, their functions and sizes are static (``flax.struct`` fields with
``pytree_node=False``, or non-array leaves such as a plain Python function). ``jax.jit`` needs
every leaf of a traced argument to be an array, so passing such an object to a jitted function
needs a split. :func:`filter_jit` does it (like equinox's ``filter_jit``): every array leaf of the
arguments is traced, everything else is part of the compilation's cache key (hashed by value,
functions by identity). Hence a jitted attack over a defended model compiles once per
architecture and configuration, and new parameters of the same shapes reuse the compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf that :func:`filter_jit` traces."""
    return isinstance(x, _ARRAY_TYPES)


class _Static:
    """A static leaf: equal and hashed by value when it can be, else by identity."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
            return (0, self.value)
        except TypeError:
            return (1, id(self.value))

    def __eq__(self, other):
        if not isinstance(other, _Static):
            return NotImplemented
        a, b = self._key(), other._key()
        if a[0] != b[0]:
            return False
        if a[0] == 1:
            return a[1] == b[1]
        return type(self.value) is type(other.value) and bool(self.value == other.value)

    def __hash__(self):
        return hash(self._key())


def partition(tree) -> tuple[list, tuple]:
    """``(array leaves, static part)`` of a pytree; :func:`combine` inverts it."""
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [leaf if is_array(leaf) else None for leaf in leaves]
    static = tuple(None if is_array(leaf) else _Static(leaf) for leaf in leaves)
    return dynamic, (treedef, static)


def combine(dynamic: list, static: tuple):
    treedef, static_leaves = static
    leaves = [d if s is None else s.value for d, s in zip(dynamic, static_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def filter_jit(fun: Callable | None = None, *, donate: bool = False, **jit_kwargs):
    """``jax.jit`` over every array leaf of the arguments; other leaves are static.

    Python scalars are static (a new value compiles anew): pass ``jnp.asarray(eps)`` for a
    hyper-parameter that a sweep changes. ``wrapped.lower(*args, **kwargs)`` lowers without
    running, and ``wrapped.cache_size()`` is the number of compilations so far.

    Args:
      fun: the function (or use as ``@filter_jit(...)``).
      donate: donate the array leaves of the arguments.
      **jit_kwargs: passed to ``jax.jit`` (e.g. ``out_shardings``).
    """
    if fun is None:
        return functools.partial(filter_jit, donate=donate, **jit_kwargs)

    def inner(dynamic, static):
        args, kwargs = combine(dynamic, static)
        return fun(*args, **kwargs)

    jitted = jax.jit(inner, static_argnums=1, donate_argnums=(0,) if donate else (),
                     **jit_kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        return jitted(*partition((args, kwargs)))

    wrapped.lower = lambda *args, **kwargs: jitted.lower(*partition((args, kwargs)))
    wrapped.cache_size = jitted._cache_size
    return wrapped
