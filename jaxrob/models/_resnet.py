"""torchvision's ImageNet ResNets (ResNet-18 ... 152, ResNet-50 v1.5) in Flax, and their import.

:class:`ResNet` follows the layout of ``torchvision.models.resnet`` (so its state dicts import key
for key): a 7x7/2 stem conv, BN, ReLU, 3x3/2 max pool (padding 1); four stages of basic or
bottleneck blocks with 64/128/256/512 planes, stride 2 at the start of stages 2-4 (in a
bottleneck on its 3x3 conv, "v1.5"), a 1x1 conv + BN projection (``downsample.0/1``) wherever the
shape changes; global average pool; ``fc``. BatchNorm runs in eval mode on its running
statistics (``batch_stats``) unless ``train=True``. It takes [0, 1] NHWC RGB images and applies
the ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225) inside, as
torchvision's weights expect after their ``ToTensor()``.

DiffPure's ImageNet classifier is ``torchvision.models.resnet50(pretrained=True)``
(``resnet50-0676ba61.pth``, IMAGENET1K_V1, 25,557,032 parameters):
:func:`load_torchvision_resnet` turns that file into a :class:`jaxrob.models.Classifier` in one
call, :func:`convert_torchvision_resnet` into an export for ``jaxrob.models.load``.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_images
from jaxrob._types import Images, Logits
from jaxrob.models._conv import conv_general_dilated_fast_vjp
from jaxrob.models._torch_import import (
    StateDict,
    fill_from_state_dict,
    load_state_dict_file,
    strip_prefix,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's constructors: block kind and blocks per stage.
RESNET_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": {"block": "basic", "stage_sizes": (2, 2, 2, 2)},
    "resnet34": {"block": "basic", "stage_sizes": (3, 4, 6, 3)},
    "resnet50": {"block": "bottleneck", "stage_sizes": (3, 4, 6, 3)},
    "resnet101": {"block": "bottleneck", "stage_sizes": (3, 4, 23, 3)},
    "resnet152": {"block": "bottleneck", "stage_sizes": (3, 8, 36, 3)},
}
_BLOCKS = ("basic", "bottleneck")
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STAGE_PLANES = (64, 128, 256, 512)


def _conv(features: int, kernel: int, name: str, stride: int = 1, fast_vjp: bool = False):
    pad = kernel // 2  # torchvision: padding 3 (7x7), 1 (3x3), 0 (1x1), also at stride 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name,
                   conv_general_dilated=conv_general_dilated_fast_vjp if fast_vjp else None)


def _bn(train: bool, name: str):
    # torch.nn.BatchNorm2d defaults: eps 1e-5, momentum 0.1 (0.9 on the running value)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class _Block(nn.Module):
    """One torchvision ``BasicBlock`` or ``Bottleneck`` (stride on the 3x3 conv)."""

    kind: str
    planes: int
    stride: int
    width: int
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        out_ch = self.planes * _EXPANSION[self.kind]
        conv = lambda c, k, name, s=1: _conv(c, k, name, s, self.fast_vjp)
        if self.kind == "basic":
            h = nn.relu(_bn(train, "bn1")(conv(self.planes, 3, "conv1", self.stride)(x_BHWC)))
            h = _bn(train, "bn2")(conv(self.planes, 3, "conv2")(h))
        else:
            h = nn.relu(_bn(train, "bn1")(conv(self.width, 1, "conv1")(x_BHWC)))
            h = nn.relu(_bn(train, "bn2")(conv(self.width, 3, "conv2", self.stride)(h)))
            h = _bn(train, "bn3")(conv(out_ch, 1, "conv3")(h))
        shortcut = x_BHWC
        if self.stride != 1 or x_BHWC.shape[-1] != out_ch:
            shortcut = _bn(train, "downsample_1")(conv(out_ch, 1, "downsample_0", self.stride)(
                x_BHWC))
        return nn.relu(h + shortcut)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet on [0, 1] NHWC RGB images (normalisation inside).

    ``ResNet()`` is ResNet-50 (torchvision ``resnet50``: bottleneck blocks (3, 4, 6, 3),
    25,557,032 parameters at 1000 classes); ``ResNet(**RESNET_CONFIGS["resnet18"])`` is
    ResNet-18. Any input of at least 32x32 works (the head averages over space); the
    pretrained weights expect 224x224 center crops.

    Attributes:
      stage_sizes: blocks in each of the four stages.
      block: ``"bottleneck"`` (ResNet-50/101/152) or ``"basic"`` (ResNet-18/34).
      num_classes: number of logits.
      width_per_group: torchvision's ``width_per_group`` (64; 128 for wide_resnet50_2).
      mean: per-channel mean subtracted from the [0, 1] input.
      std: per-channel std the input is divided by.
      fast_vjp: convolutions with the custom VJP of :mod:`jaxrob.models._conv` (faster
        input-gradients inside ``lax`` loops on XLA:CPU; no forward mode).
      input_size: None, or resize every input of another size to ``input_size`` x
        ``input_size`` first (bilinear, half-pixel centres, no antialiasing: PyTorch's
        ``F.interpolate(x, size, mode="bilinear", align_corners=False)``), as DiffPure does
        between the 256x256 ADM and the 224x224 ResNet-50.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    num_classes: int = 1000
    width_per_group: int = 64
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    fast_vjp: bool = False
    input_size: int | None = None

    @nn.compact
    def __call__(self, x: Images, train: bool = False) -> Logits:
        """Logits for a batch of [0, 1] NHWC RGB images."""
        if self.block not in _BLOCKS:
            raise ValueError(f"ResNet.block: expected one of {list(_BLOCKS)}, got {self.block!r}")
        if len(self.stage_sizes) != 4 or any(int(n) < 1 for n in self.stage_sizes):
            raise ValueError(f"ResNet.stage_sizes: expected four block counts >= 1, got "
                             f"{tuple(self.stage_sizes)}")
        check_images(x, "x", channels=len(self.mean))
        s = self.input_size
        if s is not None and tuple(x.shape[1:3]) != (s, s):
            x = jax.image.resize(x, (x.shape[0], s, s, x.shape[3]), "bilinear", antialias=False)
        mean = jnp.asarray(self.mean, jnp.float32).reshape(1, 1, 1, -1)
        std = jnp.asarray(self.std, jnp.float32).reshape(1, 1, 1, -1)
        h = (x - mean) / std
        h = nn.relu(_bn(train, "bn1")(_conv(64, 7, "conv1", 2, self.fast_vjp)(h)))
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (n, planes) in enumerate(zip(self.stage_sizes, _STAGE_PLANES, strict=True)):
            width = int(planes * self.width_per_group / 64)
            for b in range(int(n)):
                stride = 2 if (stage > 0 and b == 0) else 1
                h = _Block(self.block, planes, stride, width, self.fast_vjp,
                           name=f"layer{stage + 1}_{b}")(h, train)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(h)


# ----------------------------------------------------------------------------- weight import


def _torch_prefix(path: tuple[str, ...]) -> list[str]:
    """Flax module path ('layer1_0', 'downsample_0') -> torch prefix 'layer1.0.downsample.0'."""
    parts = []
    for p in path:
        head, sep, idx = p.rpartition("_")
        parts.append(f"{head}.{idx}" if sep and idx.isdigit() else p)
    return [".".join(parts)]


def _describe(sd: StateDict) -> dict[str, Any] | None:
    """The torchvision ResNet a state dict holds: block kind, stage sizes, width (or None)."""
    sizes = []
    for s in range(1, 5):
        prefix = f"layer{s}."
        idx = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
        idx = {int(i) for i in idx if i.isdigit()}
        sizes.append(max(idx) + 1 if idx else 0)
    if "conv1.weight" not in sd or "fc.weight" not in sd or 0 in sizes:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    w = sd.get("layer1.0.conv1.weight")
    width = int(w.shape[0]) if (block == "bottleneck" and w is not None) else 64
    return {"block": block, "stage_sizes": tuple(sizes), "width_per_group": width}


def _arch(arch: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(arch, str):
        if arch not in RESNET_CONFIGS:
            raise ValueError(f"arch: expected one of {sorted(RESNET_CONFIGS)} or a dict of "
                             f"ResNet arguments, got {arch!r}")
        return arch, {"width_per_group": 64, **RESNET_CONFIGS[arch]}
    cfg = {"width_per_group": 64, **dict(arch)}
    unknown = sorted(set(cfg) - {"block", "stage_sizes", "width_per_group"})
    if unknown or "block" not in cfg or "stage_sizes" not in cfg:
        raise ValueError(f"arch: expected a dict with 'block', 'stage_sizes' (and optionally "
                         f"'width_per_group'), got keys {sorted(cfg)}")
    cfg["stage_sizes"] = tuple(int(n) for n in cfg["stage_sizes"])
    return f"ResNet({cfg})", cfg


def _name_of(found: Mapping[str, Any]) -> str:
    for name, cfg in RESNET_CONFIGS.items():
        if (cfg["block"], tuple(cfg["stage_sizes"]), 64) == (
                found["block"], found["stage_sizes"], found["width_per_group"]):
            return name
    return "an unnamed ResNet"


def resnet_from_torchvision_state_dict(
    state_dict: StateDict,
    arch: str | Mapping[str, Any] = "resnet50",
    *,
    num_classes: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_size: int | None = None,
) -> tuple[ResNet, dict[str, Any]]:
    """Import a ``torchvision.models.resnet`` state dict (``module.`` prefixes allowed).

    Args:
      state_dict: torchvision names (``conv1.weight``, ``bn1.running_mean``,
        ``layer1.0.conv1.weight``, ..., ``layer1.0.downsample.0.weight``,
        ``layer1.0.downsample.1.*``, ``fc.weight``, ``fc.bias``) -> arrays or tensors.
      arch: the architecture the caller expects: a key of :data:`RESNET_CONFIGS`
        (``"resnet50"``, DiffPure's) or a dict ``{"block", "stage_sizes", "width_per_group"}``.
      num_classes: logits; None takes it from ``fc.weight``.
      mean: the input normalisation the weights were trained with (ImageNet's).
      std: likewise.
      input_size: see :class:`ResNet` (e.g. 224 to classify 256x256 purifier outputs).

    Returns:
      ``(model, variables)`` with ``params`` and ``batch_stats`` (numpy float32).

    Raises:
      ValueError: the state dict is not a torchvision ResNet, is another architecture than
        ``arch`` (e.g. a ResNet-18 given for ``"resnet50"``), or its keys / shapes do not match
        (missing and unexpected keys listed, each shape expected vs got).
    """
    name, cfg = _arch(arch)
    sd = strip_prefix(state_dict)
    found = _describe(sd)
    if found is None:
        raise ValueError(
            f"{name}: not a torchvision ResNet state dict (expected conv1.weight, "
            f"layer1.0.* ... layer4.0.* and fc.weight); got keys {sorted(sd)[:8]}"
            f"{' ...' if len(sd) > 8 else ''}")
    if (found["block"], found["stage_sizes"]) != (cfg["block"], cfg["stage_sizes"]):
        raise ValueError(
            f"{name}: the state dict holds {_name_of(found)} ({found['block']} blocks, stages "
            f"{found['stage_sizes']}), expected {cfg['block']} blocks, stages "
            f"{cfg['stage_sizes']}; pass the matching arch")
    if num_classes is None:
        num_classes = int(sd["fc.weight"].shape[0])
    model = ResNet(stage_sizes=cfg["stage_sizes"], block=cfg["block"],
                   num_classes=int(num_classes), width_per_group=int(cfg["width_per_group"]),
                   mean=tuple(mean), std=tuple(std), input_size=input_size)
    shapes = jax.eval_shape(model.init, jr.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, len(mean)), jnp.float32))
    variables = fill_from_state_dict(sd, shapes, _torch_prefix, what=name)
    return model, variables


def load_torchvision_resnet(path: str | os.PathLike, arch: str | Mapping[str, Any] = "resnet50",
                            *, input_size: int | None = None, fast_vjp: bool = False):
    """torchvision ResNet weights (e.g. ``resnet50-0676ba61.pth``) as a ready
    :class:`jaxrob.models.Classifier` of [0, 1] NHWC images.

    Args:
      path: the ``.pth`` file (read with ``torch.load(..., weights_only=True)``), or an
        ``.npz`` / ``.safetensors`` of the same keys.
      arch: the expected architecture (see :func:`resnet_from_torchvision_state_dict`).
      input_size: see :class:`ResNet`.
      fast_vjp: build the reverse-mode twin (attacks on CPU).

    Raises:
      FileNotFoundError: no such file.
      ValueError: another architecture, or keys / shapes that do not match.
    """
    from jaxrob.models._loaded import Classifier

    module, variables = resnet_from_torchvision_state_dict(load_state_dict_file(path), arch,
                                                           input_size=input_size)
    model = Classifier(module, jax.tree.map(jnp.asarray, variables))
    return model.with_fast_vjp(True) if fast_vjp else model


def resnet_export_metadata(module: ResNet, source: Mapping[str, Any] | None = None) -> dict:
    """The export metadata (kind ``"classifier"``, model ``"resnet"``) that
    ``jaxrob.models.load`` rebuilds ``module`` from."""
    return {
        "kind": "classifier",
        "num_classes": int(module.num_classes),
        "model": {"name": "resnet", "kwargs": {
            "stage_sizes": [int(n) for n in module.stage_sizes], "block": module.block,
            "width_per_group": int(module.width_per_group),
            "mean": [float(v) for v in module.mean], "std": [float(v) for v in module.std],
            "input_size": module.input_size}},
        "source": dict(source or {}),
    }


def convert_torchvision_resnet(src: str | os.PathLike, dst: str | os.PathLike,
                               arch: str | Mapping[str, Any] = "resnet50", *,
                               overwrite: bool = False) -> pathlib.Path:
    """Convert torchvision ResNet weights into a jaxrob export that ``jaxrob.models.load``
    returns as a :class:`jaxrob.models.Classifier`.

    Args:
      src: the PyTorch file (``resnet50-0676ba61.pth``) or an ``.npz`` / ``.safetensors``.
      dst: the export directory to write.
      arch: the expected architecture (see :func:`resnet_from_torchvision_state_dict`).
      overwrite: replace an existing export.

    Returns:
      The export directory.
    """
    from jaxrob.checkpoint import save_params

    module, variables = resnet_from_torchvision_state_dict(load_state_dict_file(src), arch)
    meta = resnet_export_metadata(module, {"format": "torchvision",
                                           "file": pathlib.Path(src).name})
    meta["num_params"] = int(sum(x.size for x in jax.tree.leaves(variables["params"])))
    return save_params(dst, variables, meta, overwrite=overwrite)
