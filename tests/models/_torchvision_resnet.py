"""torchvision's own ``models/resnet.py``: the independent reference of the ResNet parity tests.

``import torchvision.models.resnet`` when torchvision is installed and loads. Otherwise the file
itself is loaded from ``$JAXROB_TORCHVISION_RESNET`` (a path to torchvision's
``torchvision/models/resnet.py``), by default ``<repo>/../ext/vision/torchvision/models/resnet.py``
(unpacked from the torchvision 0.28.0 wheel, the release that pairs with torch 2.13.0, whose
compiled ops do not load against the CPU build of torch here). Its few torchvision-internal
imports (weight enums, the model registry, the preset transforms, API-usage logging) are stubbed
with do-nothing stand-ins below: none of them takes part in building or running the network. Tests
that need it skip when neither is available.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import pathlib
import sys
import types

import pytest

DEFAULT_FILE = (pathlib.Path(__file__).resolve().parents[2].parent / "ext" / "vision"
                / "torchvision" / "models" / "resnet.py")
_PKG = "_torchvision_ref"


class _Weights:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _WeightsEnum(enum.Enum):
    @classmethod
    def verify(cls, obj):
        return obj


def _stub_modules() -> dict[str, types.ModuleType]:
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    pkg = module(_PKG, __path__=[])
    models = module(f"{_PKG}.models", __path__=[])
    return {
        _PKG: pkg,
        f"{_PKG}.models": models,
        f"{_PKG}.transforms": module(f"{_PKG}.transforms", __path__=[]),
        f"{_PKG}.transforms._presets": module(f"{_PKG}.transforms._presets",
                                              ImageClassification=object),
        f"{_PKG}.utils": module(f"{_PKG}.utils", _log_api_usage_once=lambda obj: None),
        f"{_PKG}.models._api": module(f"{_PKG}.models._api", Weights=_Weights,
                                      WeightsEnum=_WeightsEnum,
                                      register_model=lambda name=None: (lambda fn: fn)),
        f"{_PKG}.models._meta": module(f"{_PKG}.models._meta", _IMAGENET_CATEGORIES=[]),
        f"{_PKG}.models._utils": module(
            f"{_PKG}.models._utils",
            _ovewrite_named_param=lambda kwargs, name, value: kwargs.__setitem__(name, value),
            handle_legacy_interface=lambda **kw: (lambda fn: fn)),
    }


def torchvision_resnet():
    """``(module, where)``: torchvision's resnet module and where it came from (or skip)."""
    pytest.importorskip("torch")
    try:
        import torchvision.models.resnet as resnet  # noqa: PLC0415

        return resnet, f"torchvision {resnet.__file__}"
    except Exception:  # noqa: BLE001 - absent, or its compiled ops do not load
        pass
    name = f"{_PKG}.models.resnet"
    if name in sys.modules:
        return sys.modules[name], sys.modules[name].__file__
    path = pathlib.Path(os.environ.get("JAXROB_TORCHVISION_RESNET") or DEFAULT_FILE)
    if not path.is_file():
        pytest.skip(f"torchvision is not importable and {path} does not exist (set "
                    f"JAXROB_TORCHVISION_RESNET to torchvision/models/resnet.py)")
    sys.modules.update(_stub_modules())
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod, str(path)


def randomise_(model, seed: int = 0):
    """Random weights, BN affine parameters and running statistics (eval mode), in place."""
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()
