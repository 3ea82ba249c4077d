"""DDPM training (Ho et al. 2020, "simple" eps-MSE loss) and denoising evaluation.

Loss, for images ``x0`` mapped to [-1, 1], a uniformly drawn position ``n`` of the schedule and
``eps ~ N(0, I)``::

    L = E || eps - eps_theta(sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, model_steps[n]) ||^2

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import jaxrob.diffusion as jd
from jaxrob._checks import check_images, check_t_star
from jaxrob._keys import LDM_TRAIN_SAMPLE
from jaxrob._types import Array, Images, Key
from jaxrob.diffusion._forward import gather
from jaxrob.training._state import (
    TrainState,
    batched_apply,
    check_ema_decay,
    create_train_state,
    ema_update,
    jit_train_step,
    normal_noise,
)

ApplyFn = Callable[..., Any]


def ddpm_loss(params, model_state: dict, images01: Images, key: Key, *, apply_fn: ApplyFn,
              schedule: jd.Schedule, train: bool = True, model_space: bool = False) -> Array:
    """Mean eps-prediction MSE over a batch with uniformly drawn schedule positions.

    Args:
      params: the eps-model's params.
      model_state: other Flax collections ({} for the UNet).
      images01: clean images, float32 NHWC in [0, 1] (with ``model_space``: x_0 itself).
      key: randomness of the positions, the noise and dropout.
      apply_fn: ``apply_fn(variables, x_t, model_step, train=..., rngs=...) -> eps``.
      schedule: the training chain (positions ``0..N-1``; labels ``schedule.model_steps``).
      train: run the model in training mode (dropout on).
      model_space: ``images01`` is already in the diffusion space (e.g. a latent DDPM's scaled
        codes), so it is not mapped from [0, 1] to [-1, 1].

    Returns:
      Scalar loss (mean over batch and pixels).
    """
    k_n, k_eps, k_drop = jr.split(key, 3)
    batch = images01.shape[0]
    n = jr.randint(k_n, (batch,), 0, schedule.num_steps)
    noise = normal_noise(k_eps, images01.shape)
    x0 = images01 if model_space else jd.to_model_space(images01)
    x_t = jd.q_sample(x0, n, noise, schedule)
    eps = apply_fn({"params": params, **model_state}, x_t, schedule.model_steps[n],
                   train=train, rngs={"dropout": k_drop})
    return jnp.mean(jnp.square(eps - noise))


def init_ddpm_state(model, key: Key, image_shape: tuple[int, int, int],
                    tx: optax.GradientTransformation, *, ema: bool = True) -> TrainState:
    """Initialise an eps-model and its :class:`TrainState` (jit/eval_shape friendly).

    Args:
      model: a Flax module called as ``model(x_t, step, train=...)``.
      key: the run's seed key; split into an init key and the training base key.
      image_shape: ``(H, W, C)``.
      tx: optimizer.
      ema: keep EMA params.
    """
    k_init, k_drop, k_train = jr.split(key, 3)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": k_init, "dropout": k_drop}, x,
                           jnp.zeros((1,), jnp.int32), train=False)
    return create_train_state(variables, tx, k_train, ema=ema)


def make_ddpm_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation,
                         schedule: jd.Schedule, *, ema_decay: float | None = 0.999,
                         ema_warmup: bool = True, lr_fn: optax.Schedule | None = None,
                         mesh: jax.sharding.Mesh | None = None, jit: bool = True,
                         latents_fn: Callable[[dict, Key], Array] | None = None) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for DDPM.

    The step's randomness is ``fold_in(state.key, state.step)``; with replicated state and a
    batch sharded over ``data`` the result does not depend on the device count. ``batch`` is a
    dict with ``"image"`` (float32 NHWC in [0, 1]); other keys are ignored. A latent DDPM
    passes ``latents_fn``, which turns the batch into x_0 in its diffusion space.

    Args:
      apply_fn: the eps-model's ``apply``.
      tx: optimizer (e.g. from :func:`make_optimizer`).
      schedule: the training chain.
      ema_decay: EMA decay (None: keep ``state.ema_params`` unchanged).
      ema_warmup: ramp the EMA decay up over the first steps (see :func:`ema_update`).
      lr_fn: learning-rate schedule, only to report ``lr`` in the metrics.
      mesh: the ``data`` mesh for :func:`jit_train_step` (default: all devices).
      jit: return the jitted, sharded, state-donating step (False: the plain function).
      latents_fn: ``latents_fn(batch, key) -> x0`` in the diffusion space (e.g. a posterior
        draw of latent codes from the batch's stored means and standard deviations), with
        ``key = fold_in(step_key, LDM_TRAIN_SAMPLE)``; None: ``batch["image"]`` mapped from
        [0, 1] to [-1, 1].

    Returns:
      The train step. Metrics: ``loss``, ``grad_norm`` (before clipping), ``lr``.
    """
    ema_decay = check_ema_decay(ema_decay)
    loss_grad = jax.value_and_grad(ddpm_loss)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = state.step_key()
        if latents_fn is None:
            x0, model_space = batch["image"], False
        else:
            x0, model_space = latents_fn(batch, jr.fold_in(key, LDM_TRAIN_SAMPLE)), True
        loss, grads = loss_grad(state.params, state.model_state, x0, key, apply_fn=apply_fn,
                                schedule=schedule, train=True, model_space=model_space)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, state.step, decay=ema_decay, warmup=ema_warmup)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        return new_state, metrics

    return jit_train_step(train_step, mesh) if jit else train_step


def denoising_mse(eps_fn: jd.EpsFn, images01: Images, key: Key, schedule: jd.Schedule,
                  t_star: float | Sequence[float], *, batch_size: int = 256,
                  mesh: jax.sharding.Mesh | None = None) -> dict[str, float] | list[dict]:
    """Denoising quality of an eps-model at one (or several) noise levels ``t_star``.

    For every image, ``x_n = q_sample(x0, n)`` at ``n = schedule.step_for_t_star(t_star)`` with
    noise ``normal(fold_in(key, example_index))`` (independent of batch size and devices, and
    the same noise at every ``t_star``), then

    * ``eps_mse``: mean over pixels and images of ``(eps_theta(x_n, n) - eps)^2``;
    * ``x0_mse``: one-step Tweedie estimate ``x0_hat = (x_n - sqrt(1-abar) eps_theta)/sqrt(abar)``
      mapped back to [0, 1] and clipped, vs the clean image, in [0, 1] pixel units;
    * ``noisy_mse``: the same for the naive estimate ``x_n / sqrt(abar)`` (a reference point).

    Args:
      eps_fn: ``eps_fn(x_t, model_step) -> eps``.
      images01: clean images, float32 NHWC in [0, 1] (host or device array).
      key: noise key.
      schedule: the chain the model was trained on.
      t_star: fraction of the forward process in (0, 1], or a sequence of them (evaluated in
        one compiled program).
      batch_size: images per call (compiled once; padded).
      mesh: split each batch over this ``data`` mesh (default: all devices).

    Returns:
      ``{"t_star", "step", "eps_mse", "x0_mse", "noisy_mse", "num_images"}``, or a list of
      them when ``t_star`` is a sequence.
    """
    check_images(images01, "images01")
    single = not isinstance(t_star, Sequence)
    t_stars = [check_t_star(t) for t in ([t_star] if single else t_star)]
    if not t_stars:
        raise ValueError("t_star: expected at least one value")
    steps_T = np.asarray([schedule.step_for_t_star(t) for t in t_stars], np.int32)
    num = int(images01.shape[0])

    def per_example(x01, n_BT, index):
        noise = jax.vmap(lambda i: normal_noise(jr.fold_in(key, i), x01.shape[1:]))(index)
        x0 = jd.to_model_space(x01)
        axes = tuple(range(1, x01.ndim))

        def at_level(n_B):
            abar = gather(schedule.alphas_cumprod, n_B, x01)
            x_t = jd.q_sample(x0, n_B, noise, schedule)
            eps = eps_fn(x_t, schedule.model_steps[n_B])
            x0_hat = jd.from_model_space(jd.predict_x0(x_t, n_B, eps, schedule), clip=True)
            naive = jd.from_model_space(x_t / jnp.sqrt(abar), clip=True)
            return {"eps_mse": jnp.mean(jnp.square(eps - noise), axis=axes),
                    "x0_mse": jnp.mean(jnp.square(x0_hat - x01), axis=axes),
                    "noisy_mse": jnp.mean(jnp.square(naive - x01), axis=axes)}

        # one traced model call for all levels; outputs (T, B) -> (B, T)
        out = jax.lax.map(at_level, n_BT.T)
        return jax.tree.map(lambda a: a.T, out)

    n_BT = np.broadcast_to(steps_T[None, :], (num, len(steps_T)))
    out = batched_apply(per_example, images01, n_BT, batch_size=batch_size, mesh=mesh)
    results = [{"t_star": t, "step": int(n), "num_images": num,
                **{k: float(v[:, j].mean()) for k, v in out.items()}}
               for j, (t, n) in enumerate(zip(t_stars, steps_T, strict=True))]
    return results[0] if single else results
