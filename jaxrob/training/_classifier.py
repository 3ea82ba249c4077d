"""Classifier training (cross-entropy, optional label smoothing, BatchNorm) and accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from jaxrob._checks import check_images
from jaxrob._types import Array, Images, Key, Labels, LogitsFn
from jaxrob.training._state import (
    TrainState,
    check_ema_decay,
    create_train_state,
    ema_update,
    jit_train_step,
)

ApplyFn = Callable[..., Any]


def cross_entropy(logits: Array, labels: Labels, *, label_smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy with integer labels and optional label smoothing."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def classifier_loss(params, model_state: dict, images01: Images, labels: Labels, key: Key, *,
                    apply_fn: ApplyFn, label_smoothing: float = 0.0,
                    train: bool = True) -> tuple[Array, tuple[dict, dict]]:
    """Mean cross-entropy; also returns the updated model state (BatchNorm) and metrics.

    Args:
      params: classifier params.
      model_state: non-trainable collections (``{"batch_stats": ...}`` or {}); updated in
        training mode.
      images01: float32 NHWC in [0, 1].
      labels: int labels (B,).
      key: dropout randomness.
      apply_fn: ``apply_fn(variables, x, train=..., ...) -> logits``.
      label_smoothing: in [0, 1).
      train: training mode (BatchNorm batch statistics, dropout).

    Returns:
      ``(loss, (new_model_state, {"accuracy": ...}))``.
    """
    variables = {"params": params, **model_state}
    mutable = list(model_state) if (train and model_state) else False
    out = apply_fn(variables, images01, train=train, rngs={"dropout": key}, mutable=mutable)
    logits, new_state = out if mutable else (out, model_state)
    loss = jnp.mean(cross_entropy(logits, labels, label_smoothing=label_smoothing))
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, (dict(new_state), {"accuracy": acc})


def init_classifier_state(model, key: Key, image_shape: tuple[int, int, int],
                          tx: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
    """Initialise a classifier (``model(x, train=...)``) and its :class:`TrainState`."""
    k_init, k_drop, k_train = jr.split(key, 3)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": k_init, "dropout": k_drop}, x, train=False)
    return create_train_state(variables, tx, k_train, ema=ema)


def make_classifier_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, *,
                               label_smoothing: float = 0.0, ema_decay: float | None = None,
                               ema_warmup: bool = True, lr_fn: optax.Schedule | None = None,
                               mesh: jax.sharding.Mesh | None = None,
                               jit: bool = True) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for a classifier.

    ``batch`` holds ``"image"`` (float32 NHWC in [0, 1]) and ``"label"`` (int). BatchNorm
    statistics in ``state.model_state`` are computed over the global (sharded) batch.

    Args:
      apply_fn: the classifier's ``apply``.
      tx: optimizer.
      label_smoothing: in [0, 1).
      ema_decay: EMA decay for ``state.ema_params`` (None: no EMA update).
      ema_warmup: ramp the EMA decay (see :func:`ema_update`).
      lr_fn: learning-rate schedule, to report ``lr``.
      mesh: the ``data`` mesh (default: all devices).
      jit: return the jitted, sharded, state-donating step.

    Returns:
      The train step. Metrics: ``loss``, ``accuracy`` (train batch), ``grad_norm``, ``lr``.

    Raises:
      ValueError: for ``label_smoothing`` outside [0, 1).
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
    ema_decay = check_ema_decay(ema_decay)
    loss_grad = jax.value_and_grad(classifier_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, (model_state, aux)), grads = loss_grad(
            state.params, state.model_state, batch["image"], batch["label"],
            state.step_key(), apply_fn=apply_fn, label_smoothing=label_smoothing, train=True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, state.step, decay=ema_decay, warmup=ema_warmup)
        metrics = {"loss": loss, "accuracy": aux["accuracy"],
                   "grad_norm": optax.global_norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema, model_state=model_state)
        return new_state, metrics

    return jit_train_step(train_step, mesh) if jit else train_step


def _predict_chunk(logits_fn, batch, keys):
    return {"pred": jnp.argmax(logits_fn(batch["x"], keys), -1).astype(jnp.int32)}


def classifier_predictions(logits_fn: LogitsFn, images01: Images, *, batch_size: int = 500,
                           mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Predicted labels (int32, host) for every image, computed in sharded chunks.

    ``logits_fn(x, keys)`` gets one key per example (``fold_in(key(0), index)``); a
    :class:`jaxrob.models.Classifier` ignores them. Runs through
    :func:`jaxrob.evaluation.run_chunks` (compiled once per model architecture).
    """
    from jaxrob.evaluation import run_chunks
    from jaxrob.parallel import make_mesh

    check_images(images01, "images01")
    mesh = make_mesh() if mesh is None else mesh
    n = int(images01.shape[0])
    ndev = mesh.shape["data"]
    bs = -(-min(int(batch_size), n) // ndev) * ndev
    run = run_chunks(_predict_chunk, {"x": np.asarray(images01), "index": np.arange(n)},
                     key=jr.key(0), args=(logits_fn,), batch_size=bs, mesh=mesh,
                     progress=False)
    return run.records["pred"]


def classifier_accuracy(logits_fn: LogitsFn, images01: Images, labels: Labels, *,
                        batch_size: int = 500, mesh: jax.sharding.Mesh | None = None) -> float:
    """Top-1 accuracy of ``logits_fn`` on ``(images01, labels)``.

    Args:
      logits_fn: ``logits_fn(x01, key) -> logits`` (e.g. a :class:`jaxrob.models.Classifier`).
      images01: float32 NHWC in [0, 1].
      labels: int labels.
      batch_size: images per call (compiled once; padded).
      mesh: split each batch over this ``data`` mesh (default: all devices).

    Returns:
      Fraction of correctly classified images.
    """
    labels = np.asarray(labels)
    if labels.shape != (images01.shape[0],):
        raise ValueError(f"labels: expected shape ({images01.shape[0]},), got {labels.shape}")
    preds = classifier_predictions(logits_fn, images01, batch_size=batch_size, mesh=mesh)
    return float(np.mean(preds == labels))
