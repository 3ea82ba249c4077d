"""Shared machinery for importing PyTorch state dicts into Flax variable trees.

Each model keeps its own key mapping next to its definition (``_unet.py``, ``_classifiers.py``);
this module does the parts they share: turning tensors into numpy arrays without importing torch,
reading checkpoint files (torch only imported lazily, inside the function that needs it), the
layout transposes, and a strict fill-and-verify of a Flax tree whose shapes come from
``jax.eval_shape(model.init, ...)``, so every mismatch is reported with the PyTorch key, the
expected shape and the shape found.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

StateDict = Mapping[str, Any]

# Flax leaf name -> PyTorch parameter suffix, per variable collection.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    # score_sde's NIN 1x1 projections and Fourier features: plain parameters ``W`` (in, out), ``b``
    ("params", "W"): "W",
    ("params", "b"): "b",
}
# Buffers PyTorch saves that have no Flax counterpart.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def to_numpy(value: Any) -> np.ndarray:
    """Return ``value`` (numpy array, torch tensor, jax array, list) as a float32 numpy array.

    torch tensors are recognised by their ``detach`` method, so torch is never imported here.
    """
    if hasattr(value, "detach"):  # torch.Tensor, possibly on an accelerator / requiring grad
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    return arr


def strip_prefix(state_dict: StateDict, prefix: str = "module.") -> dict[str, Any]:
    """Drop ``prefix`` (``nn.DataParallel``'s ``module.``) from every key that has it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from ``.npz``, ``.safetensors`` or a torch pickle (``.th``/``.pt``/...).

    A torch checkpoint that wraps the weights as ``{'state_dict': {...}, ...}`` is unwrapped.
    Torch files are read with ``torch.load(path, map_location='cpu', weights_only=True)``.

    Args:
      path: the checkpoint file.

    Returns:
      ``{key: float32 numpy array}``, keys as stored (prefixes not stripped).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ImportError: a torch file was given and PyTorch is not installed.
      ValueError: unknown suffix, or the file holds no state dict.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: no such checkpoint file (expected .npz, .safetensors "
            f"or a torch .th/.pt/.pth/.bin file)"
        )
    suffix = p.suffix.lower()
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as data:
            return {k: to_numpy(data[k]) for k in data.files}
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{p}: reading .safetensors needs the safetensors package") from e
        return {k: to_numpy(v) for k, v in load_file(p).items()}
    if suffix in (".th", ".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"{p}: reading a PyTorch checkpoint needs torch "
                f"(pip install 'jaxrob[torch]'), or use the .npz export"
            ) from e
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"{p}: expected a state dict (mapping of names to tensors) or "
                f"{{'state_dict': ...}}, got {type(obj).__name__}"
            )
        return {k: to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
    raise ValueError(
        f"{p}: expected suffix .npz, .safetensors, .th, .pt, .pth or .bin, got {p.suffix!r}"
    )


def torch_to_flax_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, 1-D conv OIW -> WIO, linear (out, in)
    -> (in, out)."""
    if leaf == "kernel" and arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    if leaf == "kernel" and arr.ndim == 3:
        return np.ascontiguousarray(arr.transpose(2, 1, 0))
    if leaf == "kernel" and arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    return arr


def flax_to_torch_shape(shape: Sequence[int], leaf: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf of ``shape`` (inverse of :func:`torch_to_flax_layout`)."""
    shape = tuple(shape)
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 3:
        return (shape[2], shape[1], shape[0])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def fill_from_state_dict(
    state_dict: StateDict,
    expected: Mapping[str, Any],
    module_keys: Callable[[tuple[str, ...]], Sequence[str]],
    *,
    what: str,
    extra_ignored: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Fill a Flax variables tree from a PyTorch state dict, verifying every key and shape.

    Args:
      state_dict: PyTorch names -> arrays/tensors.
      expected: the variables tree of shapes, e.g. ``jax.eval_shape(model.init, ...)``; its
        leaves only need ``.shape``. Collections other than ``params``/``batch_stats`` are
        not supported.
      module_keys: maps a Flax module path (tuple of submodule names, leaf excluded) to the
        candidate PyTorch module prefixes, most preferred first (aliases for renamed layers).
      what: the model's name, used in error messages.
      extra_ignored: predicate on state-dict keys that may be left unused.

    Returns:
      A variables dict with the same structure as ``expected`` holding float32 numpy arrays.

    Raises:
      ValueError: keys missing from the state dict, unused keys, or shape mismatches; all
        problems are listed in one message, each with expected vs got.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    flat, treedef = jax.tree_util.tree_flatten_with_path(expected)
    out_leaves = []
    for path, leaf_shape in flat:
        names = tuple(getattr(p, "key", str(p)) for p in path)
        collection, module_path, leaf = names[0], names[1:-1], names[-1]
        suffix = _LEAF_TO_TORCH.get((collection, leaf))
        if suffix is None:
            raise ValueError(f"{what}: cannot map Flax variable {'/'.join(names)} to PyTorch")
        candidates = [f"{m}.{suffix}" for m in module_keys(module_path)]
        key = next((c for c in candidates if c in sd), None)
        want = flax_to_torch_shape(leaf_shape.shape, leaf)
        if key is None:
            missing.append(f"{candidates[0]} (expected shape {want}, for {'/'.join(names)})")
            out_leaves.append(None)
            continue
        used.add(key)
        arr = to_numpy(sd[key])
        if tuple(arr.shape) != want:
            wrong.append(f"{key}: expected shape {want}, got {tuple(arr.shape)}")
            out_leaves.append(None)
            continue
        out_leaves.append(torch_to_flax_layout(arr, leaf))
    unused = sorted(k for k in sd if k not in used and not (extra_ignored and extra_ignored(k)))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} key(s) missing from the state dict: "
            + "; ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    if wrong:
        problems.append(
            f"{len(wrong)} shape mismatch(es): "
            + "; ".join(wrong[:10])
            + (" ..." if len(wrong) > 10 else "")
        )
    if unused:
        problems.append(
            f"{len(unused)} unexpected key(s) the {what} does not use: "
            + ", ".join(unused[:10])
            + (" ..." if len(unused) > 10 else "")
        )
    if problems:
        raise ValueError(
            f"{what}: state dict does not match the model configuration:\n  "
            + "\n  ".join(problems)
        )
    return jax.tree_util.tree_unflatten(treedef, out_leaves)
