"""The one pytree convention of jaxrob's objects: frozen dataclasses with static fields.

``@pytree_dataclass`` makes a frozen dataclass a pytree whose fields are leaves (sub-pytrees)
unless marked ``static_field()``: arrays (parameters, schedules) are traced by ``jax.jit`` /
:func:`jaxrob._jit.filter_jit`, static fields (modules, sizes, option strings) are part of the
compilation's cache key. Unflattening bypasses ``__init__``/``__post_init__`` (JAX rebuilds
objects with tracers or placeholders as leaves), so validation in ``__post_init__`` runs only when
a user constructs the object.
"""

from __future__ import annotations

import dataclasses

import jax


def static_field(**kwargs):
    """A dataclass field that is static (not a pytree leaf)."""
    metadata = {**kwargs.pop("metadata", {}), "static": True}
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_dataclass(cls=None, *, eq: bool = False):
    """Register a frozen dataclass as a pytree (fields leaves unless ``static_field()``).

    ``eq=False`` (default) keeps identity equality and hashing, so an object holding arrays can
    still be hashed; the compiled functions never hash such objects (:mod:`jaxrob._jit` splits
    them into traced leaves and static parts).
    """
    if cls is None:
        return lambda c: pytree_dataclass(c, eq=eq)
    cls = dataclasses.dataclass(frozen=True, eq=eq)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten_with_keys(obj):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data)
        return children, tuple(getattr(obj, n) for n in meta)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, v in zip(data, children, strict=True):
            object.__setattr__(obj, n, v)
        for n, v in zip(meta, aux, strict=True):
            object.__setattr__(obj, n, v)
        return obj

    def replace(self, **changes):
        """A copy with some fields replaced (no validation re-run for pytree leaves)."""
        return dataclasses.replace(self, **changes)

    if "replace" not in cls.__dict__:
        cls.replace = replace
    jax.tree_util.register_pytree_with_keys(
        cls, flatten_with_keys, unflatten,
        flatten_func=lambda obj: (tuple(getattr(obj, n) for n in data),
                                  tuple(getattr(obj, n) for n in meta)))
    return cls
