"""Adversarial Denoising Diffusion Training (ADDT): CGPO, RBGM and the fine-tuning step.

ADDT fine-tunes an eps-model on forward noise that is partly adversarial to a frozen
classifier. For images ``x0`` mapped to [-1, 1], a uniformly drawn position ``n`` of the schedule
and ``eps ~ N(0, I)``::

    r_n   = clip(lambda_unit * sqrt(abar_n) / sqrt(1 - abar_n), lambda_min, lambda_max)
    mixed = sqrt(1 - r_n^2) eps + r_n delta
    L     = E || mixed - eps_theta(sqrt(abar_n) x0 + sqrt(1 - abar_n) mixed, model_steps[n]) ||^2

``delta`` comes from Classifier-Guided Perturbation Optimization (CGPO, :func:`cgpo_delta`):
start from ``delta ~ N(0, I)``; ``K`` times, build ``x_n`` from the mixed noise, predict
``x0_hat`` from the eps-prediction, take the gradient ``g`` of the frozen classifier's
cross-entropy on ``x0_hat`` w.r.t. ``delta``, add it to a running sum ``G`` and set
``delta <- RBGM(G)``. Rank-Based Gaussian Mapping (:func:`rbgm`) replaces ``delta`` by a fresh
standard Gaussian sample arranged, per image and channel, in the rank order of ``G``: the values
stay an i.i.d. N(0, 1) sample, only their arrangement is adversarial (a single pixel's value is
not N(0, 1) given ``G``: the largest entry of ``G`` always gets its slice's maximum).

Where this follows the reference (LYMDLUT/ADDT, ``train_DDPM_DDIM_ADDT/train_ADDT.py``):
``lambda_unit=0.03, lambda_min=0, lambda_max=0.3``, ``K=5``, the gradient summed over the
iterations (never reset), RBGM per (image, channel) row, a fresh forward noise in every CGPO
iteration and another for the training loss (``share_noise=False``), the classifier fed the
unclipped ``x0_hat`` (``clip_x0=False``), AdamW lr 2e-4, betas (0.95, 0.999), weight decay 1e-6,
gradient clipping at 1.0, EMA 0.9999 with diffusers' power-3/4 warm-up. Where it does not: CGPO
runs the eps-model deterministically (the reference runs it in training mode, with dropout 0.1
active while the perturbation is optimised), and the classifier's loss is summed over the batch
(the reference takes the mean; ranks and signs do not change).

References:
  Liu et al. Towards Understanding the Robustness of Diffusion-Based Purification: A Stochastic
  Perspective. ICLR 2025 (arXiv 2404.14309).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import jaxrob.diffusion as jd
from jaxrob import _keys as tags
from jaxrob._checks import check_choice
from jaxrob._jit import combine, partition
from jaxrob._types import AnyKey, Array, EpsFn, Images, Labels, Latents, LogitsFn, Steps
from jaxrob.diffusion._forward import broadcast_steps, gather
from jaxrob.training._classifier import cross_entropy
from jaxrob.training._state import (
    TrainState,
    _check_number,
    check_ema_decay,
    check_ema_power,
    ema_update,
    jit_train_step,
    make_optimizer,
    normal_noise,
)

ApplyFn = Callable[..., Any]

MAPPINGS = ("rbgm", "pgd_linf", "gaussian")


# ---------------------------------------------------------------------------- checks


def _check_ratio(lambda_unit, lambda_min, lambda_max) -> tuple[float, float, float]:
    unit = _check_number(lambda_unit, "lambda_unit", lo=0.0)
    lo = _check_number(lambda_min, "lambda_min", lo=0.0, hi=1.0)
    hi = _check_number(lambda_max, "lambda_max", lo=0.0, hi=1.0)
    if lo > hi:
        raise ValueError(f"lambda_min, lambda_max: expected lambda_min <= lambda_max, got "
                         f"lambda_min={lambda_min!r} > lambda_max={lambda_max!r}")
    return unit, lo, hi


def _check_num_iters(num_iters) -> int:
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters: expected a non-negative integer (0: plain Gaussian "
                         f"delta), got {num_iters!r}")
    return int(num_iters)


def _check_cgpo(*, num_iters, mapping, lambda_unit, lambda_min, lambda_max, linf_eps,
                linf_step, linf_ratio_max) -> dict:
    check_choice(mapping, MAPPINGS, "mapping")
    unit, lo, hi = _check_ratio(lambda_unit, lambda_min, lambda_max)
    return dict(
        num_iters=_check_num_iters(num_iters), mapping=mapping, lambda_unit=unit,
        lambda_min=lo, lambda_max=hi,
        linf_eps=_check_number(linf_eps, "linf_eps", lo=0.0, lo_open=True),
        linf_step=_check_number(linf_step, "linf_step", lo=0.0, lo_open=True),
        linf_ratio_max=_check_number(linf_ratio_max, "linf_ratio_max", lo=0.0, lo_open=True))


# ---------------------------------------------------------------------------- primitives


def _normal(key: AnyKey, shape: tuple[int, ...]) -> Array:
    """N(0, I) of ``shape``: drawn for the whole batch from one key, or per example from
    (B,) keys."""
    if jnp.ndim(key) == 1:
        if key.shape[0] != shape[0]:
            raise ValueError(f"key: expected one key or {shape[0]} keys (one per example), "
                             f"got {key.shape[0]} keys")
        return jax.vmap(lambda k: normal_noise(k, tuple(shape[1:])))(key)
    return normal_noise(key, tuple(shape))


def addt_ratio(abar_t: Array | float, *, lambda_unit: float = 0.03, lambda_min: float = 0.0,
               lambda_max: float = 0.3) -> Array:
    """ADDT's share of the adversarial perturbation in the forward noise at ``abar_t``.

    ``r_t = clip(lambda_unit * sqrt(abar_t) / sqrt(1 - abar_t), lambda_min, lambda_max)``: the
    perturbation's size in ``x_t``, ``sqrt(1 - abar_t) r_t``, is ``lambda_unit sqrt(abar_t)``
    (a fixed size on the scaled clean image) until the clip; at ``abar_t = 1`` it is
    ``lambda_max``.

    Args:
      abar_t: cumulative ``alpha_bar`` values in [0, 1] (any shape).
      lambda_unit: perturbation scale relative to the signal (>= 0).
      lambda_min: lower clip, in [0, 1].
      lambda_max: upper clip, in [lambda_min, 1] (``sqrt(1 - r^2)`` must be real).

    Returns:
      ``r_t``, float32, shaped like ``abar_t``.

    Raises:
      ValueError: for ``lambda_min > lambda_max`` or values outside the ranges above.
    """
    unit, lo, hi = _check_ratio(lambda_unit, lambda_min, lambda_max)
    abar = jnp.asarray(abar_t, jnp.float32)
    if unit == 0.0:  # 0 * inf at abar = 1
        return jnp.clip(jnp.zeros_like(abar), lo, hi)
    return jnp.clip(unit * jnp.sqrt(abar) / jnp.sqrt(1.0 - abar), lo, hi)


def rbgm(grad: Latents, key: AnyKey) -> Latents:
    """Rank-Based Gaussian Mapping: a fresh N(0, I) sample in the rank order of ``grad``.

    For every image and channel (an ``(h, w)`` slice of the NHWC array), draw ``h * w`` standard
    normal values and place them so that the k-th smallest value lands where ``grad`` has its
    k-th smallest entry (ties in ``grad`` keep their index order). The output is exactly a
    permutation of the fresh sample within each slice, so its values are i.i.d. N(0, 1) whatever
    ``grad`` is; only their arrangement carries the gradient's direction. No gradient flows
    through it.

    Args:
      grad: the (accumulated) gradient, float NHWC.
      key: one key (the sample drawn for the whole batch at once) or a (B,) batch of keys,
        one per example.

    Returns:
      The mapped sample, shaped like ``grad``.
    """
    if grad.ndim != 4:
        raise ValueError(f"grad: expected rank 4 (batch, height, width, channels) NHWC, got "
                         f"shape {tuple(grad.shape)}")
    b, h, w, c = grad.shape
    fresh = _normal(key, grad.shape).astype(grad.dtype)
    to_rows = lambda a: jnp.moveaxis(a, -1, 1).reshape(b, c, h * w)
    sorted_BCP = jnp.sort(to_rows(fresh), axis=-1)
    rank_BCP = jnp.argsort(jnp.argsort(to_rows(jax.lax.stop_gradient(grad)), axis=-1), axis=-1)
    out_BCP = jnp.take_along_axis(sorted_BCP, rank_BCP, axis=-1)
    return jax.lax.stop_gradient(jnp.moveaxis(out_BCP.reshape(b, c, h, w), 1, -1))


def _mixing_ratio(abar, *, mapping, lambda_unit, lambda_min, lambda_max, linf_ratio_max,
                  **_):
    """The weight of ``delta`` in the forward noise: ADDT's ``r_n``, or the clipped
    ``sqrt(snr_n)`` of the reference's Linf ablation (``mapping="pgd_linf"``)."""
    if mapping == "pgd_linf":
        return jnp.clip(jnp.sqrt(abar) / jnp.sqrt(1.0 - abar), 0.0, linf_ratio_max)
    return addt_ratio(abar, lambda_unit=lambda_unit, lambda_min=lambda_min,
                      lambda_max=lambda_max)


def _mixed_noise(noise, delta, abar, **opts):
    """The forward noise (and eps-target) built from ``noise`` and ``delta``."""
    r = _mixing_ratio(abar, **opts)
    if opts["mapping"] == "pgd_linf":
        # the reference's Linf ablation: while sqrt(snr) <= linf_ratio_max this makes
        # x_n = q_sample(x0 + delta, n, noise), the diffused perturbed image (not
        # variance-preserving, unlike ADDT's mixture)
        return noise + r * delta
    return jnp.sqrt(1.0 - jnp.square(r)) * noise + r * delta


def cgpo_delta(eps_fn: EpsFn, logits_fn: LogitsFn, images01: Images, n: Steps,
               noise: Latents | None, labels: Labels, key: AnyKey, *, schedule: jd.Schedule,
               num_iters: int = 5, mapping: str = "rbgm", lambda_unit: float = 0.03,
               lambda_min: float = 0.0, lambda_max: float = 0.3, clip_x0: bool = False,
               linf_eps: float = 8 / 255, linf_step: float = 4 / 255,
               linf_ratio_max: float = 10.0) -> Latents:
    """Classifier-Guided Perturbation Optimization: ADDT's adversarial noise component.

    ``mapping="rbgm"`` (ADDT): ``delta_0 ~ N(0, I)``, then for ``k < num_iters``::

        mixed_k = sqrt(1 - r_n^2) noise_k + r_n delta_k          (r_n: addt_ratio)
        x_n     = q_sample(x0, n, mixed_k)
        x0_hat  = (x_n - sqrt(1 - abar_n) eps_fn(x_n, model_steps[n])) / sqrt(abar_n)
        G      += grad_delta sum_i CE(logits_fn(x0_hat / 2 + 1/2), labels)
        delta_{k+1} = rbgm(G)

    ``mapping="gaussian"``: ``delta_0`` (no CGPO, no model call; ``mixed`` is then exactly
    N(0, I), i.e. plain DDPM fine-tuning: the control run). ``num_iters=0`` gives the same.
    ``mapping="pgd_linf"`` (the reference's ``train_ADDT_linf.py`` ablation, without RBGM):
    ``delta_0 = 0``; each iteration takes a signed step of ``2 linf_step`` on that iteration's
    gradient alone (the reference resets the sum), projects onto the Linf ball of radius
    ``2 linf_eps`` and onto ``x0 + delta`` in [-1, 1] (budgets in [0, 1] pixel units, ``delta``
    in diffusion space); its mixed noise is ``noise + min(sqrt(snr_n), linf_ratio_max) delta``,
    which diffuses the perturbed image ``x0 + delta`` while ``sqrt(snr_n) <= linf_ratio_max``.
    The ``lambda_*`` parameters are not used by it.

    Only ``delta`` is differentiated: the eps-model's and classifier's parameters get no
    gradient, and the result carries none (``stop_gradient``). The loop is a ``lax.scan``.

    Randomness: ``delta_0`` from ``fold_in(key, ADDT_DELTA)``, iteration ``k``'s forward noise
    (``noise=None``) from ``fold_in(fold_in(key, ADDT_NOISE), k)`` and its RBGM sample from
    ``fold_in(fold_in(key, ADDT_MAP), k)``, and ``logits_fn`` gets
    ``fold_in(fold_in(key, CLASSIFIER), k)`` (tags of :mod:`jaxrob._keys`); per example when
    ``key`` is a (B,) batch of keys.

    Args:
      eps_fn: ``eps_fn(x_t, model_step) -> eps`` (e.g. a :class:`jaxrob.models.DiffusionModel`,
        or the train step's current params).
      logits_fn: the frozen classifier, ``logits_fn(x, key) -> logits`` on [0, 1] images.
      images01: clean images, float32 NHWC in [0, 1].
      n: positions in ``schedule``, int (B,) (or a scalar for all examples).
      noise: the standard normal forward noise used in every iteration, or None to draw a fresh
        one per iteration from ``key`` (the reference: an expectation over the noise).
      labels: true labels (B,).
      key: one key or a (B,) batch of keys, one per example.
      schedule: the eps-model's training chain.
      num_iters: CGPO iterations ``K`` (>= 0).
      mapping: ``"rbgm"``, ``"pgd_linf"`` or ``"gaussian"``.
      lambda_unit: see :func:`addt_ratio`.
      lambda_min: see :func:`addt_ratio`.
      lambda_max: see :func:`addt_ratio`.
      clip_x0: clip ``x0_hat`` to [0, 1] before the classifier. Off by default, as in the
        reference: clipping zeroes the gradient of every clipped pixel, and RBGM would then rank
        those pixels by position.
      linf_eps: ``"pgd_linf"`` only: Linf budget in [0, 1] pixel units.
      linf_step: ``"pgd_linf"`` only: step size in [0, 1] pixel units.
      linf_ratio_max: ``"pgd_linf"`` only: clip of ``sqrt(abar_n / (1 - abar_n))``.

    Returns:
      ``delta``, float32 NHWC shaped like ``images01`` (diffusion space).

    Raises:
      ValueError: for an unknown ``mapping``, ``num_iters < 0`` or bad ratio parameters.
    """
    opts = _check_cgpo(num_iters=num_iters, mapping=mapping, lambda_unit=lambda_unit,
                       lambda_min=lambda_min, lambda_max=lambda_max, linf_eps=linf_eps,
                       linf_step=linf_step, linf_ratio_max=linf_ratio_max)
    x0 = jd.to_model_space(jnp.asarray(images01, jnp.float32))
    shape = x0.shape
    n = broadcast_steps(n, shape[0])
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: expected shape {tuple(shape)} (like images01) or None, got "
                         f"{tuple(noise.shape)}")
    if mapping == "pgd_linf":
        delta0 = jnp.zeros(shape, jnp.float32)
    else:
        delta0 = _normal(tags.fold(key, tags.ADDT_DELTA), shape)
    if mapping == "gaussian" or opts["num_iters"] == 0:
        return delta0

    abar = gather(schedule.alphas_cumprod, n, x0)
    model_steps = schedule.model_steps[n]
    labels = jnp.asarray(labels)

    def ce(delta, noise_k, key_k):
        x_t = jd.q_sample(x0, n, _mixed_noise(noise_k, delta, abar, **opts), schedule)
        eps = eps_fn(x_t, model_steps)
        x0_hat = jd.from_model_space(jd.predict_x0(x_t, n, eps, schedule), clip=clip_x0)
        return jnp.sum(cross_entropy(logits_fn(x0_hat, key_k), labels))

    grad_ce = jax.grad(ce)
    eps_ball, step = 2.0 * opts["linf_eps"], 2.0 * opts["linf_step"]

    def body(carry, k):
        delta, acc = carry
        if noise is None:
            noise_k = _normal(tags.fold(tags.fold(key, tags.ADDT_NOISE), k), shape)
        else:
            noise_k = noise
        g = grad_ce(delta, noise_k, tags.fold(tags.fold(key, tags.CLASSIFIER), k))
        if mapping == "rbgm":
            acc = acc + g
            delta = rbgm(acc, tags.fold(tags.fold(key, tags.ADDT_MAP), k))
        else:
            delta = jnp.clip(delta + step * jnp.sign(g), -eps_ball, eps_ball)
            delta = jnp.clip(delta, -1.0 - x0, 1.0 - x0)
        return (delta, acc), None

    (delta, _), _ = jax.lax.scan(body, (delta0, jnp.zeros_like(delta0)),
                                 jnp.arange(opts["num_iters"], dtype=jnp.uint32))
    return jax.lax.stop_gradient(delta)


# ---------------------------------------------------------------------------- training


def make_addt_optimizer(*, learning_rate: float = 2e-4, b1: float = 0.95, b2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 1e-6,
                        grad_clip: float | None = 1.0, warmup_steps: int = 0,
                        lr_schedule: str = "constant", total_steps: int = 1,
                        decay_all: bool = True,
                        ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """:func:`make_optimizer` with the ADDT reference's defaults.

    AdamW, lr 2e-4 (constant: diffusers' ``"constant"`` schedule ignores the script's warm-up
    steps), betas (0.95, 0.999), eps 1e-8, weight decay 1e-6, global-norm clipping at 1.0.

    Args:
      learning_rate: peak learning rate.
      b1: Adam beta1.
      b2: Adam beta2.
      eps: Adam epsilon.
      weight_decay: decoupled weight decay.
      grad_clip: global-norm clip (None: none).
      warmup_steps: linear warm-up from 0.
      lr_schedule: ``"constant"`` or ``"cosine"``.
      total_steps: length of the run (cosine schedule).
      decay_all: decay every parameter, biases and norm scales included, as ``torch.optim.AdamW``
        does in the reference (False: :func:`make_optimizer`'s kernels-only default).

    Returns:
      ``(tx, lr_fn)``.
    """
    mask = (lambda p: jax.tree.map(lambda _: True, p)) if decay_all else None
    return make_optimizer(name="adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                          weight_decay=weight_decay, grad_clip=grad_clip,
                          warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                          total_steps=total_steps, decay_mask=mask)


def make_addt_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation,
                         schedule: jd.Schedule, logits_fn: LogitsFn, *, num_iters: int = 5,
                         mapping: str = "rbgm", lambda_unit: float = 0.03,
                         lambda_min: float = 0.0, lambda_max: float = 0.3,
                         clip_x0: bool = False, share_noise: bool = False,
                         linf_eps: float = 8 / 255, linf_step: float = 4 / 255,
                         linf_ratio_max: float = 10.0, ema_decay: float | None = 0.9999,
                         ema_warmup: bool = True, ema_power: float | None = 0.75,
                         lr_fn: optax.Schedule | None = None,
                         mesh: jax.sharding.Mesh | None = None, jit: bool = True) -> Callable:
    """Build ``train_step(state, batch) -> (state, metrics)`` for ADDT fine-tuning.

    The :func:`make_ddpm_train_step` of ADDT (same :class:`TrainState`, optimizer, EMA and
    sharding): per example a position ``n``, a forward noise ``eps`` and a CGPO perturbation
    ``delta`` (:func:`cgpo_delta` against the current params, no gradient), then one optimizer
    update on the eps-MSE with target ``mixed = sqrt(1 - r_n^2) eps + r_n delta``
    (``noise + min(sqrt(snr_n), linf_ratio_max) delta`` for ``"pgd_linf"``) and input
    ``x_n = q_sample(x0, n, mixed)``.

    ``batch`` is a dict with ``"image"`` (float32 NHWC in [0, 1]) and ``"label"`` (int (B,));
    other keys are ignored. Randomness: with ``k = fold_in(state.key, state.step)`` split into
    ``(k_ex, k_drop)``, example ``i`` uses ``k_i = fold_in(k_ex, i)``: its position from
    ``fold_in(k_i, ADDT_POSITION)`` (uniform over ``0..N-1``), its noise from
    ``fold_in(k_i, ADDT_NOISE)``, CGPO's key ``fold_in(k_i, ADDT_CGPO)``; dropout of the
    training forward pass uses ``k_drop``. With replicated state and a batch sharded over
    ``data`` the result does not depend on the device count.

    Args:
      apply_fn: the eps-model's ``apply``, called as
        ``apply_fn(variables, x_t, model_step, train=..., rngs=...)``; CGPO calls it with
        ``train=False``.
      tx: optimizer (e.g. :func:`make_addt_optimizer`).
      schedule: the training chain.
      logits_fn: the frozen classifier, ``logits_fn(x, key) -> logits`` on [0, 1] images
        (e.g. a :class:`jaxrob.models.Classifier`). Its array leaves are passed to the compiled
        step as replicated arguments, not baked into it.
      num_iters: CGPO iterations (see :func:`cgpo_delta`).
      mapping: ``"rbgm"`` (ADDT), ``"pgd_linf"`` or ``"gaussian"`` (control).
      lambda_unit: see :func:`addt_ratio`.
      lambda_min: see :func:`addt_ratio`.
      lambda_max: see :func:`addt_ratio`.
      clip_x0: see :func:`cgpo_delta`.
      share_noise: CGPO uses the training loss's ``eps`` in every iteration (False: a fresh
        noise per iteration, as the reference).
      linf_eps: see :func:`cgpo_delta`.
      linf_step: see :func:`cgpo_delta`.
      linf_ratio_max: see :func:`cgpo_delta`.
      ema_decay: EMA decay (None: keep ``state.ema_params`` unchanged).
      ema_warmup: ramp the EMA decay up over the first steps (see :func:`ema_update`).
      ema_power: the warm-up's power (None: :func:`ema_update`'s ``(1+s)/(10+s)`` ramp).
      lr_fn: learning-rate schedule, only to report ``lr`` in the metrics.
      mesh: the ``data`` mesh for :func:`jit_train_step` (default: all devices).
      jit: return the jitted, sharded, state-donating step (False: the plain function).

    Returns:
      The train step. Metrics: ``loss``, ``grad_norm`` (before clipping), ``delta_rms`` (RMS of
      ``delta``), ``ratio`` (mean ``r_n``; mean clipped ``sqrt(snr_n)`` for ``"pgd_linf"``),
      ``lr`` (with ``lr_fn``).

    Raises:
      ValueError: for bad CGPO options (see :func:`cgpo_delta`) or EMA settings.
    """
    opts = _check_cgpo(num_iters=num_iters, mapping=mapping, lambda_unit=lambda_unit,
                       lambda_min=lambda_min, lambda_max=lambda_max, linf_eps=linf_eps,
                       linf_step=linf_step, linf_ratio_max=linf_ratio_max)
    ema_decay = check_ema_decay(ema_decay)
    ema_power = check_ema_power(ema_power)
    frozen, static = partition(logits_fn)

    def loss_fn(params, model_state, x_t, model_steps, target, k_drop):
        eps = apply_fn({"params": params, **model_state}, x_t, model_steps, train=True,
                       rngs={"dropout": k_drop})
        return jnp.mean(jnp.square(eps - target))

    loss_grad = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: dict, frozen) -> tuple[TrainState, dict]:
        clf = combine(frozen, static)
        images01, labels = batch["image"], batch["label"]
        k_ex, k_drop = jr.split(state.step_key())
        keys_B = tags.example_keys(k_ex, jnp.arange(images01.shape[0]))
        n = jax.vmap(lambda k: jr.randint(jr.fold_in(k, tags.ADDT_POSITION), (), 0,
                                          schedule.num_steps))(keys_B)
        noise = _normal(tags.fold(keys_B, tags.ADDT_NOISE), images01.shape)
        variables = {"params": state.params, **state.model_state}
        eps_fn = lambda x, s: apply_fn(variables, x, s, train=False)
        delta = cgpo_delta(eps_fn, clf, images01, n, noise if share_noise else None, labels,
                           tags.fold(keys_B, tags.ADDT_CGPO), schedule=schedule,
                           clip_x0=clip_x0, **opts)
        x0 = jd.to_model_space(images01)
        abar = gather(schedule.alphas_cumprod, n, x0)
        target = _mixed_noise(noise, delta, abar, **opts)
        x_t = jd.q_sample(x0, n, target, schedule)
        loss, grads = loss_grad(state.params, state.model_state, x_t, schedule.model_steps[n],
                                target, k_drop)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, state.step, decay=ema_decay, warmup=ema_warmup,
                             power=ema_power)
        ratio = _mixing_ratio(abar, **opts)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "delta_rms": jnp.sqrt(jnp.mean(jnp.square(delta))),
                   "ratio": jnp.mean(ratio)}
        if lr_fn is not None:
            metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        return new_state, metrics

    if jit:
        return jit_train_step(train_step, mesh, frozen=frozen)
    return lambda state, batch: train_step(state, batch, frozen)
