"""Image classifiers (Flax linen, NHWC, inputs float32 in [0, 1]) and their PyTorch import.

Every classifier applies its own input normalisation inside ``__call__``, takes ``train`` (dropout
and batch statistics) and keeps BatchNorm running statistics in the ``batch_stats`` collection:

* :class:`SmallCNN` - a cheap conv net for 28x28 MNIST/KMNIST and 8x8 digits;
* :class:`CifarResNet` - He et al. (2016) CIFAR ResNet-20/32/44/56 with option-A shortcuts, the
  architecture of the akamaster pretrained weights (:func:`load_akamaster_resnet`);
* :class:`WideResNet` - Zagoruyko & Komodakis WRN with pre-activation blocks, the architecture of
  RobustBench's CIFAR-10 ``Standard`` model (WRN-28-10, 36,479,194 parameters) and of its other
  ``wide_resnet.py`` models (any 6n+4 depth, e.g. ``WideResNet(depth=70, widen_factor=16)``);
* :class:`DMWideResNet` - the DeepMind WRN of RobustBench's ``dm_wide_resnet.py`` (Gowal et al.
  2020, Rebuffi et al. 2021: WRN-70-16, WRN-28-10 ..., Swish or ReLU), whose key names, input
  normalisation and stride-2 padding differ.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  Zagoruyko, Komodakis. Wide Residual Networks. BMVC 2016.
  Croce et al. RobustBench: a standardized adversarial robustness benchmark. NeurIPS 2021 D&B.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr

from jaxrob._checks import check_images
from jaxrob._types import Images, Logits
from jaxrob.models._conv import conv_general_dilated_fast_vjp
from jaxrob.models._resnet import ResNet
from jaxrob.models._torch_import import (
    StateDict,
    fill_from_state_dict,
    load_state_dict_file,
    strip_prefix,
)
from jaxrob.models._unet import UNet

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "CifarResNet",
    "MODELS",
    "SmallCNN",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DMWideResNet",
    "WideResNet",
    "cifar_resnet_from_state_dict",
    "dm_wide_resnet_from_state_dict",
    "load_akamaster_resnet",
    "wide_resnet_from_state_dict",
]

AKAMASTER_MEAN = (0.485, 0.456, 0.406)
AKAMASTER_STD = (0.229, 0.224, 0.225)

# torch.nn.BatchNorm2d defaults (momentum 0.1 on the new value = 0.9 on the running one).
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5
# torch's kaiming_normal_ (fan_in, gain sqrt(2)), used by the akamaster and WRN code.
_he_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _normalize(x_BHWC, mean, std):
    """(x - mean) / std over the channel axis; None means identity."""
    if mean is None and std is None:
        return x_BHWC
    mean_C = jnp.asarray(0.0 if mean is None else mean, jnp.float32).reshape(1, 1, 1, -1)
    std_C = jnp.asarray(1.0 if std is None else std, jnp.float32).reshape(1, 1, 1, -1)
    return (x_BHWC - mean_C) / std_C


def _conv(features: int, kernel: int, name: str, stride: int = 1, bias: bool = False,
          fast_vjp: bool = False):
    # PyTorch-style symmetric padding (kernel // 2 on every side), also for stride 2.
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=_he_init,
        name=name,
        conv_general_dilated=conv_general_dilated_fast_vjp if fast_vjp else None,
    )


def _bn(train: bool, name: str):
    return nn.BatchNorm(
        use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, name=name
    )


def _check_channels(x, name, mean):
    channels = None if mean is None or len(mean) == 1 else len(mean)
    check_images(x, name, channels=channels)


def _max_pool2(x_BHWC):
    """2x2/stride-2 max pool as reshape + max (odd edges dropped, like VALID pooling).

    XLA:CPU differentiates ``lax.reduce_window`` max pooling with select-and-scatter, which is
    about 5x slower than the gradient of this reshape form.
    """
    B, H, W, C = x_BHWC.shape
    x = x_BHWC[:, : H // 2 * 2, : W // 2 * 2, :]
    return x.reshape(B, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))


class SmallCNN(nn.Module):
    """Small conv net for 28x28 MNIST/KMNIST (99% MNIST test accuracy in 2 epochs) or 8x8 digits.

    [conv3(c)-BN-ReLU-maxpool2] for c in ``features`` (32, 64) -> dropout -> Dense(hidden)-ReLU
    -> dropout -> Dense(num_classes). Pooling after every conv keeps it cheap on CPU (about
    9 MFLOP per 28x28 image). Works for any input size of at least 2**len(features) and any
    channel count (the normalisation broadcasts when ``mean``/``std`` have one entry).

    Attributes:
      num_classes: number of logits.
      features: channels of the conv layers, each followed by 2x2 max pooling.
      hidden: width of the hidden dense layer.
      dropout: dropout rate after the conv stack and before the output layer.
      mean: per-channel (or single) mean subtracted from the [0, 1] input.
      std: per-channel (or single) std the input is divided by.
      fast_vjp: convolutions with the custom VJP of :mod:`jaxrob.models._conv` (faster
        input-gradients inside ``lax`` loops on XLA:CPU; no forward-mode).
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    hidden: int = 128
    dropout: float = 0.1
    mean: Sequence[float] | None = (0.5,)
    std: Sequence[float] | None = (0.5,)
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x: Images, train: bool = False) -> Logits:
        """Logits for a batch of [0, 1] NHWC images (``rngs={'dropout': key}`` when training)."""
        _check_channels(x, "x", self.mean)
        h = _normalize(x, self.mean, self.std)
        for i, c in enumerate(self.features):
            h = _conv(c, 3, f"conv{i}", fast_vjp=self.fast_vjp)(h)
            h = _max_pool2(nn.relu(_bn(train, f"bn{i}")(h)))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, name="fc")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="out")(h)


class _AkaBlock(nn.Module):
    """akamaster BasicBlock: conv-BN-ReLU-conv-BN + option-A shortcut, then ReLU."""

    planes: int
    stride: int
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        conv = lambda name, stride=1: _conv(self.planes, 3, name, stride, fast_vjp=self.fast_vjp)
        h = nn.relu(_bn(train, "bn1")(conv("conv1", self.stride)(x_BHWC)))
        h = _bn(train, "bn2")(conv("conv2")(h))
        shortcut = x_BHWC
        if self.stride != 1 or x_BHWC.shape[-1] != self.planes:
            # Option A: subsample by 2 and zero-pad planes//4 channels on each side (no params).
            p = self.planes // 4
            shortcut = jnp.pad(x_BHWC[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (p, p)))
        return nn.relu(h + shortcut)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR-10 ResNet (depth 6n+2) with option-A shortcuts (akamaster layout).

    conv3(16)-BN-ReLU; three stages of n BasicBlocks with 16/32/64 channels (stride 2 at the
    start of stages 2 and 3); global average pool; Dense(num_classes). ResNet-20 has 269,722
    parameters.

    Attributes:
      depth: 20, 32, 44 or 56 (any 6n+2 works).
      num_classes: number of logits.
      mean: per-channel mean for the [0, 1] RGB input (the akamaster training normalisation).
      std: per-channel std.
      fast_vjp: convolutions with the custom VJP of :mod:`jaxrob.models._conv` (faster
        input-gradients inside ``lax`` loops on XLA:CPU; no forward-mode).
    """

    depth: int = 20
    num_classes: int = 10
    mean: Sequence[float] | None = AKAMASTER_MEAN
    std: Sequence[float] | None = AKAMASTER_STD
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x: Images, train: bool = False) -> Logits:
        """Logits for a batch of [0, 1] NHWC RGB images."""
        n = _blocks_per_stage(self.depth, "CifarResNet")
        _check_channels(x, "x", self.mean)
        h = _normalize(x, self.mean, self.std)
        h = nn.relu(_bn(train, "bn1")(_conv(16, 3, "conv1", fast_vjp=self.fast_vjp)(h)))
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                h = _AkaBlock(planes, stride, self.fast_vjp, name=f"layer{stage + 1}_{b}")(h, train)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=_he_init, name="linear")(h)


def _blocks_per_stage(depth: int, what: str) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{what}: depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
    return (depth - 2) // 6


class _WRNBlock(nn.Module):
    """Pre-activation wide basic block (RobustBench ``BasicBlock``)."""

    out_planes: int
    stride: int
    dropout: float
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        act = nn.relu(_bn(train, "bn1")(x_BHWC))
        equal_in_out = x_BHWC.shape[-1] == self.out_planes
        conv = lambda k, name, stride=1: _conv(self.out_planes, k, name, stride,
                                               fast_vjp=self.fast_vjp)
        h = conv(3, "conv1", self.stride)(act)
        h = nn.relu(_bn(train, "bn2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(3, "conv2")(h)
        if equal_in_out:
            return x_BHWC + h
        # The projection shortcut sees the pre-activated input.
        return conv(1, "convShortcut", self.stride)(act) + h


class WideResNet(nn.Module):
    """Wide ResNet (pre-activation BN-ReLU-conv blocks), RobustBench's CIFAR-10 layout.

    ``WideResNet(depth=28, widen_factor=10)`` is RobustBench's ``Standard`` CIFAR-10 model
    (36,479,194 parameters). That model feeds the raw [0, 1] input to its first conv (no
    normalisation), hence ``mean = std = None`` by default.

    Attributes:
      depth: 6n+4.
      widen_factor: width multiplier k (channels 16k, 32k, 64k).
      num_classes: number of logits.
      dropout: dropout rate between the two convs of each block (train mode only).
      mean: optional per-channel input mean (None = no normalisation).
      std: optional per-channel input std.
      fast_vjp: convolutions with the custom VJP of :mod:`jaxrob.models._conv` (faster
        input-gradients inside ``lax`` loops on XLA:CPU; no forward-mode).
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    dropout: float = 0.0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x: Images, train: bool = False) -> Logits:
        """Logits for a batch of [0, 1] NHWC RGB images."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"WideResNet: depth must be 6n+4 (10, 16, 22, 28, ...), got {self.depth}"
            )
        n = (self.depth - 4) // 6
        rgb = self.mean is None or len(self.mean) == 1
        check_images(x, "x", channels=3 if rgb else len(self.mean))
        h = _normalize(x, self.mean, self.std)
        h = _conv(16, 3, "conv1", fast_vjp=self.fast_vjp)(h)
        for stage, mult in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                h = _WRNBlock(
                    mult * self.widen_factor, stride, self.dropout, self.fast_vjp,
                    name=f"block{stage + 1}_{b}",
                )(h, train)
        h = nn.relu(_bn(train, "bn1")(h))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(h)


# RobustBench dm_wide_resnet.py's defaults (the models normalise their [0, 1] input).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
_DM_ACTIVATIONS = {"relu": nn.relu, "swish": nn.silu}


class _DMBlock(nn.Module):
    """DeepMind WRN block (RobustBench ``dm_wide_resnet._Block``): pre-activation; the first
    conv pads like TF "SAME" (stride 2: one row / column on the bottom / right only)."""

    out_planes: int
    stride: int
    activation: str
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        act_fn = _DM_ACTIVATIONS[self.activation]
        impl = conv_general_dilated_fast_vjp if self.fast_vjp else None
        has_shortcut = x_BHWC.shape[-1] != self.out_planes
        act = act_fn(_bn(train, "batchnorm_0")(x_BHWC))
        if has_shortcut:
            x_BHWC = act
        pad = ((1, 1), (1, 1)) if self.stride == 1 else ((0, 1), (0, 1))
        h = nn.Conv(self.out_planes, (3, 3), strides=(self.stride,) * 2, padding=pad,
                    use_bias=False, kernel_init=_he_init, name="conv_0",
                    conv_general_dilated=impl)(act)
        h = act_fn(_bn(train, "batchnorm_1")(h))
        h = nn.Conv(self.out_planes, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=_he_init, name="conv_1", conv_general_dilated=impl)(h)
        if has_shortcut:
            x_BHWC = nn.Conv(self.out_planes, (1, 1), strides=(self.stride,) * 2,
                             padding=((0, 0), (0, 0)), use_bias=False, kernel_init=_he_init,
                             name="shortcut", conv_general_dilated=impl)(x_BHWC)
        return x_BHWC + h


class DMWideResNet(nn.Module):
    """The DeepMind WideResNet of RobustBench's ``dm_wide_resnet.py`` (``DMWideResNet``).

    RobustBench's Gowal2020Uncovering_70_16 / Rebuffi2021Fixing_70_16_* CIFAR-10 models are
    ``DMWideResNet(depth=70, width=16, activation="swish")`` (266,796,506 parameters at 10
    classes). Unlike :class:`WideResNet` it normalises its input with ``mean`` / ``std``, pads
    its stride-2 convolutions like TF "SAME" and names its layers ``init_conv``,
    ``layer.G.block.I.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}``, ``batchnorm``,
    ``logits`` (import with :func:`dm_wide_resnet_from_state_dict`). The 32x32 input ends in an
    8x8 average pool, i.e. the spatial mean.

    Attributes:
      depth: 6n+4.
      width: width multiplier k (channels 16k, 32k, 64k).
      num_classes: number of logits.
      activation: ``"relu"`` or ``"swish"`` (RobustBench's ``Swish`` = SiLU).
      mean: per-channel input mean (CIFAR-10's by default, as upstream).
      std: per-channel input std.
      fast_vjp: custom-VJP convolutions (see :class:`WideResNet`).
    """

    depth: int = 70
    width: int = 16
    num_classes: int = 10
    activation: str = "swish"
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    fast_vjp: bool = False

    @nn.compact
    def __call__(self, x: Images, train: bool = False) -> Logits:
        """Logits for a batch of [0, 1] NHWC RGB images."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"DMWideResNet: depth must be 6n+4 (10, 16, 28, 70, ...), got {self.depth}")
        if self.activation not in _DM_ACTIVATIONS:
            raise ValueError(f"DMWideResNet: activation must be one of "
                             f"{sorted(_DM_ACTIVATIONS)}, got {self.activation!r}")
        n = (self.depth - 4) // 6
        check_images(x, "x", channels=len(self.mean))
        h = _normalize(x, self.mean, self.std)
        h = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=_he_init,
                    name="init_conv",
                    conv_general_dilated=conv_general_dilated_fast_vjp if self.fast_vjp
                    else None)(h)
        for group, mult in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (group > 0 and b == 0) else 1
                h = _DMBlock(mult * self.width, stride, self.activation, self.fast_vjp,
                             name=f"layer_{group}_block_{b}")(h, train)
        h = _DM_ACTIVATIONS[self.activation](_bn(train, "batchnorm")(h))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="logits")(h)


# ----------------------------------------------------------------------------- weight import


def _expected_variables(model: nn.Module, image_size: int = 32, channels: int = 3):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    return jax.eval_shape(model.init, jr.key(0), x)


def _dotted(path: tuple[str, ...]) -> list[str]:
    """Flax path ('layer1_0', 'conv1') -> torch prefix 'layer1.0.conv1'."""
    parts = []
    for p in path:
        head, sep, idx = p.rpartition("_")
        parts.append(f"{head}.{idx}" if sep and idx.isdigit() else p)
    return [".".join(parts)]


def _depth_of_state_dict(sd: StateDict, stage_key: str) -> int | None:
    """Blocks per stage found in ``sd`` (``stage_key`` like 'layer1'), or None."""
    prefix = stage_key + "."
    idx = {
        int(k[len(prefix) :].split(".")[0])
        for k in sd
        if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()
    }
    return (max(idx) + 1) if idx else None


def cifar_resnet_from_state_dict(
    state_dict: StateDict, depth: int | None = None, *, num_classes: int | None = None
) -> tuple[CifarResNet, dict[str, Any]]:
    """Import an akamaster CIFAR ResNet state dict (``module.`` prefixes allowed).

    Args:
      state_dict: PyTorch names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...,
        ``linear.bias``) -> numpy arrays or torch tensors; conv weights OIHW.
      depth: expected depth; None infers it from the number of blocks in ``layer1``.
      num_classes: logits; None infers it from ``linear.weight``.

    Returns:
      ``(model, variables)`` with ``variables = {'params': ..., 'batch_stats': ...}``.

    Raises:
      ValueError: the state dict is for another depth, or keys/shapes do not match (each
        named, expected vs got).
    """
    sd = strip_prefix(state_dict)
    n_found = _depth_of_state_dict(sd, "layer1")
    if n_found is None:
        raise ValueError(
            f"CifarResNet: state dict has no 'layer1.<i>.*' keys; got keys {sorted(sd)[:8]}..."
        )
    depth_found = 6 * n_found + 2
    if depth is not None and depth != depth_found:
        raise ValueError(
            f"CifarResNet: state dict is for depth {depth_found} ({n_found} blocks "
            f"per stage), got depth={depth}"
        )
    if num_classes is None:
        w = sd.get("linear.weight")
        num_classes = 10 if w is None else int(w.shape[0])
    model = CifarResNet(depth=depth_found, num_classes=num_classes)
    variables = fill_from_state_dict(
        sd, _expected_variables(model), _dotted, what=f"CifarResNet(depth={depth_found})"
    )
    return model, variables


def load_akamaster_resnet(
    path: str | os.PathLike, depth: int | None = None
) -> tuple[CifarResNet, dict[str, Any]]:
    """Load akamaster's pretrained CIFAR-10 ResNet-20/32/44/56 from ``.npz`` or ``.th``.

    ``.npz``: numpy arrays keyed without ``module.``, conv OIHW (no torch needed).
    ``.th``: the upstream torch pickle ``{'state_dict': {'module.<name>': tensor}}``, read with
    ``torch.load(path, map_location='cpu', weights_only=True)`` (torch is imported only then).

    Args:
      path: the checkpoint file.
      depth: expected depth (checked); None infers it from the weights.

    Returns:
      ``(model, variables)``; ``model.apply(variables, x)`` gives logits for [0, 1] NHWC images
      (the ImageNet mean/std normalisation used in training is applied inside).

    Raises:
      FileNotFoundError: no such file.
      ImportError: a ``.th`` file and no torch.
      ValueError: wrong depth, keys or shapes.
    """
    return cifar_resnet_from_state_dict(load_state_dict_file(path), depth)


def wide_resnet_from_state_dict(
    state_dict: StateDict,
    depth: int = 28,
    widen_factor: int = 10,
    *,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[WideResNet, dict[str, Any]]:
    """Import a RobustBench ``WideResNet`` state dict (e.g. the CIFAR-10 ``Standard`` model).

    RobustBench's ``wide_resnet.WideResNet`` key names, checked against its code: the models
    built with ``sub_block1=True`` (e.g. Carmon2019Unlabeled) carry a ``sub_block1.*`` group that
    their forward pass never uses; those keys are accepted and ignored. The DeepMind layout
    (``dm_wide_resnet.py``: Gowal2020 / Rebuffi2021 WRN-70-16) is
    :func:`dm_wide_resnet_from_state_dict`.

    Args:
      state_dict: RobustBench names (``conv1.weight``, ``block1.layer.0.bn1.weight``, ...,
        ``block1.layer.0.convShortcut.weight``, ``bn1.*``, ``fc.*``); ``module.`` allowed.
      depth: 6n+4.
      widen_factor: width multiplier.
      num_classes: logits; None infers it from ``fc.weight``.
      mean: input normalisation of the wrapped model (None for ``Standard``).
      std: likewise.

    Returns:
      ``(model, variables)`` with ``params`` and ``batch_stats``.

    Raises:
      ValueError: keys or shapes do not match (each named, expected vs got).
    """
    sd = strip_prefix(state_dict)
    if num_classes is None:
        w = sd.get("fc.weight")
        num_classes = 10 if w is None else int(w.shape[0])
    model = WideResNet(
        depth=depth, widen_factor=widen_factor, num_classes=num_classes, mean=mean, std=std
    )

    def module_keys(path):
        head = path[0]
        if head.startswith("block"):
            stage, idx = head.split("_")
            return [".".join((stage, "layer", idx) + tuple(path[1:]))]
        return [".".join(path)]

    variables = fill_from_state_dict(
        sd,
        _expected_variables(model),
        module_keys,
        what=f"WideResNet(depth={depth}, widen={widen_factor})",
        extra_ignored=lambda k: k.startswith("sub_block1."),
    )
    return model, variables


def dm_wide_resnet_from_state_dict(
    state_dict: StateDict,
    depth: int = 70,
    width: int = 16,
    *,
    activation: str = "swish",
    num_classes: int | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> tuple[DMWideResNet, dict[str, Any]]:
    """Import a RobustBench ``DMWideResNet`` state dict (e.g. Gowal2020Uncovering_70_16).

    The activation and normalisation are not stored in a state dict: pass those of the
    RobustBench model entry (``Swish`` and CIFAR-10's mean / std for the Gowal / Rebuffi
    models; CIFAR-100 models use ``CIFAR100_MEAN`` / ``CIFAR100_STD`` upstream).

    Args:
      state_dict: RobustBench names (``init_conv.weight``,
        ``layer.0.block.0.batchnorm_0.weight``, ..., ``layer.0.block.0.shortcut.weight``,
        ``batchnorm.*``, ``logits.*``); ``module.`` allowed.
      depth: 6n+4.
      width: width multiplier.
      activation: ``"swish"`` or ``"relu"``.
      num_classes: logits; None infers it from ``logits.weight``.
      mean: the model's input mean.
      std: its input std.

    Returns:
      ``(model, variables)`` with ``params`` and ``batch_stats``.

    Raises:
      ValueError: keys or shapes do not match (each named, expected vs got), e.g. a
        ``wide_resnet.py`` state dict (``conv1``, ``block1.layer...``) given here.
    """
    sd = strip_prefix(state_dict)
    if num_classes is None:
        w = sd.get("logits.weight")
        num_classes = 10 if w is None else int(w.shape[0])
    model = DMWideResNet(depth=depth, width=width, num_classes=num_classes,
                         activation=activation, mean=tuple(mean), std=tuple(std))

    def module_keys(path):
        head = path[0]
        if head.startswith("layer_"):
            _, group, _, idx = head.split("_")
            return [".".join(("layer", group, "block", idx) + tuple(path[1:]))]
        return [".".join(path)]

    variables = fill_from_state_dict(
        sd, _expected_variables(model), module_keys,
        what=f"DMWideResNet(depth={depth}, width={width})")
    return model, variables


MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "small_cnn": SmallCNN,
    "cifar_resnet": CifarResNet,
    "wide_resnet": WideResNet,
    "dm_wide_resnet": DMWideResNet,
    "resnet": ResNet,  # torchvision ImageNet layout (jaxrob.models._resnet)
}
