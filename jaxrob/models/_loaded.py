"""Trained models as pytrees, and :func:`load`, the one way to get them from an export.

A :class:`DiffusionModel` (eps-prediction network + its noise schedule) and a
:class:`Classifier` hold their Flax module as a static field and their variables (and schedule)
as pytree leaves. They are the callables every primitive takes:

* ``DiffusionModel`` is an ``eps_fn(x_t, model_step) -> eps``;
* ``Classifier`` is a ``logits_fn(x, key=None) -> logits`` on [0, 1] images (the key is ignored).

Passed through :func:`jaxrob._jit.filter_jit` (the attacks, the evaluation, the chunk runner),
their variables are traced, so swapping in other parameters of the same shapes (e.g. a
fine-tuned DDPM, ``model.replace(variables=...)``) reuses every compilation. Where a model came
from is not part of it (it would be static and force recompilation): manifests record paths.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

import jaxrob.diffusion as jd
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Images, Latents, Logits, Steps

KINDS = ("ddpm", "classifier", "autoencoder", "ldm")


def _with_fast_vjp(module: nn.Module, on: bool) -> nn.Module:
    if "fast_vjp" not in getattr(module, "__dataclass_fields__", {}):
        raise ValueError(f"{type(module).__name__} has no fast_vjp twin")
    return module.clone(fast_vjp=bool(on))


@pytree_dataclass
class DiffusionModel:
    """An eps-prediction diffusion model: ``model(x_t, model_step) -> eps``.

    Attributes:
      module: the Flax network (static), called as ``module.apply(variables, x_t, step)``.
      variables: its variables (pytree leaves).
      schedule: the training noise schedule (pytree leaves).
    """

    module: nn.Module = static_field()
    variables: Any
    schedule: jd.Schedule

    def __call__(self, x_t: Latents, step: Steps) -> Latents:
        return self.module.apply(self.variables, x_t, step, train=False)

    def with_fast_vjp(self, on: bool = True) -> DiffusionModel:
        """The same parameters in the network's reverse-mode (``True``) or forward-mode twin.

        ``fast_vjp=True`` convolutions keep input-gradients fast inside ``lax`` loops on XLA:CPU
        (attacks, VJP Jacobians); forward mode (``jax.jvp``, ``jacfwd``) needs ``False``.
        """
        return DiffusionModel(_with_fast_vjp(self.module, on), self.variables, self.schedule)

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.variables)))


@pytree_dataclass
class Classifier:
    """A classifier of [0, 1] NHWC images: ``model(x, key=None) -> logits`` (eval mode).

    Attributes:
      module: the Flax network (static); it applies its own input normalisation.
      variables: its variables (params and batch statistics; pytree leaves).
    """

    module: nn.Module = static_field()
    variables: Any

    def __call__(self, x: Images, key: AnyKey | None = None) -> Logits:
        del key  # deterministic
        return self.module.apply(self.variables, x, train=False)

    def with_fast_vjp(self, on: bool = True) -> Classifier:
        """The same parameters with (or without) the fast conv input-gradients (see
        :meth:`DiffusionModel.with_fast_vjp`)."""
        return Classifier(_with_fast_vjp(self.module, on), self.variables)

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.variables.get("params", {}))))


def schedule_from_metadata(diffusion: Mapping[str, Any]) -> jd.Schedule:
    """The noise schedule described by an export's ``diffusion`` metadata (or a config dict
    with ``schedule``, ``num_steps``, ``beta_start``, ``beta_end``)."""
    kind = diffusion.get("schedule")
    num_steps = int(diffusion.get("num_steps", 1000))
    if kind == "linear":
        return jd.linear_schedule(num_steps, beta_start=float(diffusion.get("beta_start", 1e-4)),
                                  beta_end=float(diffusion.get("beta_end", 0.02)))
    if kind == "cosine":
        return jd.cosine_schedule(num_steps)
    raise ValueError(f"diffusion.schedule: expected 'linear' or 'cosine', got {kind!r}")


def unet_from_metadata(model: Mapping[str, Any]) -> nn.Module:
    """The UNet described by ``{"name": "unet", "config": <name or dict>, "overrides": {...}}``
    (``None`` overrides keep the named configuration's value)."""
    from jaxrob.models._unet import unet_from_config

    if model.get("name", "unet") != "unet":
        raise ValueError(f"model.name: expected 'unet' for a diffusion model, got "
                         f"{model.get('name')!r}")
    overrides = {k: v for k, v in dict(model.get("overrides") or {}).items() if v is not None}
    return unet_from_config(model.get("config", "mnist"), **overrides)


def diffusion_module_from_metadata(model: Mapping[str, Any]) -> nn.Module:
    """The denoiser network a ``model`` metadata entry (an export's or a config's) names: Ho et
    al.'s UNet (``"unet"``, the default), score_sde's DDPM++ (``"ncsnpp"``) or guided-diffusion's
    ADM (``"adm"``)."""
    name = model.get("name", "unet")
    if name == "ncsnpp":  # score_sde DDPM++ (e.g. DiffPure's CIFAR-10)
        from jaxrob.models._ncsnpp import ncsnpp_from_metadata

        return ncsnpp_from_metadata(model)
    if name == "adm":  # guided-diffusion's ADM
        from jaxrob.models._adm import adm_from_metadata

        return adm_from_metadata(model)
    return unet_from_metadata(model)


def classifier_from_metadata(model: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The classifier described by ``{"name": <key of MODELS>, "kwargs": {...}}``."""
    from jaxrob.models._classifiers import MODELS

    name = model.get("name")
    if name not in MODELS or name == "unet":
        raise ValueError(f"model.name: expected a classifier of jaxrob.models.MODELS "
                         f"{sorted(k for k in MODELS if k != 'unet')}, got {name!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in dict(model.get("kwargs") or {}).items()}
    return MODELS[name](num_classes=int(num_classes), **kwargs)


def load(path: str | os.PathLike, *, fast_vjp: bool = False, kind: str | None = None):
    """Load a jaxrob export (``jaxrob.checkpoint.save_params``) as a ready model.

    Args:
      path: the export directory (e.g. ``"checkpoints/mnist_ddpm"``).
      fast_vjp: build the networks' reverse-mode twins (attacks and VJP Jacobians on CPU);
        the same parameters work either way (:meth:`DiffusionModel.with_fast_vjp`).
      kind: ``"ddpm"``, ``"classifier"``, ``"autoencoder"`` or ``"ldm"`` to insist on one
        (None: whatever the export is).

    Returns:
      A :class:`DiffusionModel` (with the schedule rebuilt from the metadata) for a DDPM
      export (a Ho et al. UNet, or guided-diffusion's ADM converted by
      :func:`jaxrob.models.convert_guided_diffusion_checkpoint`), a :class:`Classifier` for a
      classifier export, a :class:`jaxrob.models.Autoencoder` (with its latent scaling) for an
      autoencoder export, a :class:`jaxrob.models.LatentDiffusionModel` (autoencoder + latent
      DDPM) for an LDM export.

    Raises:
      FileNotFoundError: ``path`` is not a jaxrob export.
      ValueError: the export is of another kind than asked, or its metadata does not describe
        a model this version of jaxrob can build.

    Example::

      ddpm = jaxrob.models.load("checkpoints/mnist_ddpm")
      ddpmpp = jaxrob.models.load("exports/cifar10_ddpmpp")  # convert_score_sde's export
      clf = jaxrob.models.load("checkpoints/mnist_classifier")
      ldm = jaxrob.models.load("checkpoints/mnist_ldm")
    """
    from jaxrob.checkpoint import load_params, read_metadata

    path = pathlib.Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)} or None, got {kind!r}")
    meta = read_metadata(path)
    found = meta.get("kind")
    if found not in KINDS:
        raise ValueError(f"{path}: export of kind {found!r}; jaxrob.models.load builds "
                         f"{list(KINDS)}")
    if kind is not None and found != kind:
        raise ValueError(f"{path}: holds a {found!r} export, expected a {kind!r}")
    try:
        build = _BUILDERS[found](meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the export's metadata does not describe a model this jaxrob "
                         f"can build ({type(e).__name__}: {e})") from e
    variables, _ = load_params(path)
    variables = jax.tree.map(jax.numpy.asarray, variables)
    try:
        model = build(variables)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the export's parameters and metadata do not make a "
                         f"{found!r} model ({type(e).__name__}: {e})") from e
    return model.with_fast_vjp(True) if fast_vjp else model


def _ddpm_builder(meta):
    module = diffusion_module_from_metadata(meta["model"])
    schedule = schedule_from_metadata(meta["diffusion"])
    return lambda variables: DiffusionModel(module, variables, schedule)


def _classifier_builder(meta):
    module = classifier_from_metadata(meta["model"], meta["num_classes"])
    return lambda variables: Classifier(module, variables)


def _autoencoder_builder(meta):
    from jaxrob.models._latent import Autoencoder, autoencoder_from_metadata

    ae = meta["autoencoder"]
    module = autoencoder_from_metadata(ae)
    scale, shift = float(ae["scaling_factor"]), float(ae.get("shift_factor", 0.0))
    return lambda variables: Autoencoder(module, variables, scale, shift)


def _ldm_builder(meta):
    from jaxrob.models._latent import LatentDiffusionModel

    make_ae, make_ddpm = _autoencoder_builder(meta), _ddpm_builder(meta)
    shape = meta.get("data", {}).get("image_shape")
    shape = None if shape is None else tuple(int(d) for d in shape)

    def build(variables):
        return LatentDiffusionModel(make_ae(variables["autoencoder"]),
                                    make_ddpm(variables["diffusion"]), shape)

    return build


# export kind -> metadata -> (variables -> model); the metadata is checked before any array is
# read, the variables' fit when the model is built
_BUILDERS = {"ddpm": _ddpm_builder, "classifier": _classifier_builder,
             "autoencoder": _autoencoder_builder, "ldm": _ldm_builder}
