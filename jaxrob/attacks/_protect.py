"""Protective perturbations against diffusion-based editing: AdvDM(+/-), PhotoGuard's encoder
attack, Mist, SDS(+/-) (and SDS with a target), and end-to-end attacks through an edit (SDEdit on
a pixel model, PDM-Pure followed by an LDM edit).

A protection is a Linf perturbation of an image that spoils what a diffusion model makes of it.
All attacks here take sign-gradient steps ``x_{k+1} = Proj(x_k + d * step_size * sign(g_k))``
(``d = +1`` ascends the attack's loss, ``-1`` descends it; :func:`jaxrob.attacks.project` keeps
every iterate in the eps-ball and in [0, 1]) and return the *last* iterate (as the reference
code does: with a Monte-Carlo loss the "best" iterate is a noisy pick), with the loss measured
there once more. Defaults are the reference's: eps 16/255, 100 steps of 1/255, no random start.

A latent diffusion model (LDM) is ``encode_fn(x) -> z`` (differentiable, [0, 1] NHWC images to
the scaled latent), ``decode_fn(z) -> x`` and an eps-model on the latents with its schedule
(``ddpm(z_t, step)``, ``ddpm.schedule``; e.g. a :class:`jaxrob.models.DiffusionModel`). Without
``encode_fn`` the attacks act on a pixel diffusion model (PDM): ``z = 2x - 1``.

The diffusion loss of one evaluation with key ``k`` draws, per example, a schedule position
``n ~ U{0..N-1}`` from ``fold_in(k, PROTECT_TIME)`` and the noise ``eps ~ N(0, I)`` from
``fold_in(k, PROTECT_NOISE)`` (drawn flat, then reshaped) and is
``mean((eps_hat(sqrt(abar_n) z + sqrt(1 - abar_n) eps, n) - eps)^2)`` over the latent's
elements (the LDM training loss, Monte-Carlo over n and eps).

Keys (:mod:`jaxrob._keys`): example ``i`` (global index ``indices[i]``, default ``i``) is attacked
alone with ``k_i = fold_in(key, indices[i])`` (or with ``key[i]`` when ``key`` is a (B,) batch of
keys), so results never depend on the batch; inside, the attacks' convention
(:mod:`jaxrob.attacks._common`): ``k_init, k_steps = split(fold_in(k_i, 0))``, iteration ``t``
evaluates Monte-Carlo / EoT sample ``j`` with ``fold_in(fold_in(k_steps, t), j)``, and the
final loss uses ``t = num_steps``.

References:
  Liang, Wu, Hua, Zhang, Xue, Song, Xue, Ma, Guan. Adversarial Example Does Good: Preventing
  Painting Imitation from Diffusion Models via Adversarial Examples (AdvDM). ICML 2023.
  Salman, Khaddaj, Leclerc, Ilyas, Madry. Raising the Cost of Malicious AI-Powered Image
  Editing (PhotoGuard). ICML 2023.
  Liang, Wu. Mist: Towards Improved Adversarial Examples for Diffusion Models. arXiv:2305.12683.
  Xue, Liang, Wu, Chen. Toward Effective Protection Against Diffusion Based Mimicry through
  Score Distillation (SDS). ICLR 2024.
  Xue, Chen. Pixel is a Barrier: Diffusion Models Are More Adversarially Robust Than We Think.
  arXiv:2404.13320, 2024.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Array, Images, Key, PerExample
from jaxrob.attacks._common import AttackResult, check_eot, check_scalar, project
from jaxrob.attacks._eot import eot_value_and_grad
from jaxrob.purify._diffpure import _model_and_schedule
from jaxrob.purify._sdedit import PurifyThenEdit, pdm_pure, sdeditor

PROTECT_MODES = ("+", "-")
"""``"+"``: ascend the diffusion loss (AdvDM, SDS(+)); ``"-"``: descend it (AdvDM(-), SDS(-))."""

DEFAULT_EPS = 16 / 255
DEFAULT_STEP = 1 / 255
DEFAULT_STEPS = 100


# --------------------------------------------------------------------------------------------
# Losses.


def _latent(encode_fn, x):
    return jd.to_model_space(x) if encode_fn is None else encode_fn(x)


def _draw(key: Key, z: Array, schedule: jd.Schedule) -> tuple[Array, Array]:
    """Per-example schedule positions (B,) and noise shaped like ``z`` (module docstring)."""
    n = jr.randint(jr.fold_in(key, tags.PROTECT_TIME), (z.shape[0],), 0, schedule.num_steps)
    # drawn flat, then reshaped: the same distribution, but XLA:CPU compiles an N-d threefry
    # normal about 3x slower (seconds per draw site in every attack's compilation)
    noise = jr.normal(jr.fold_in(key, tags.PROTECT_NOISE), (z.size,), z.dtype).reshape(z.shape)
    return n, noise


def _residual(ddpm, schedule, z, key):
    """``eps_hat(z_n, n) - eps`` for the draw of ``key``."""
    n, noise = _draw(key, z, schedule)
    z_t = jd.q_sample(z, n, noise, schedule)
    return ddpm(z_t, schedule.model_steps[n]) - noise


def _mean_sq(r):
    return jnp.mean(jnp.square(r), axis=tuple(range(1, r.ndim)))


def _sum_sq(r):
    return jnp.sum(jnp.square(r), axis=tuple(range(1, r.ndim)))


def diffusion_loss(ddpm: Callable, z: Array, key: Key, *,
                   schedule: jd.Schedule | None = None) -> PerExample:
    """Monte-Carlo diffusion training loss ``mean((eps_hat(z_n, n) - eps)^2)`` per example.

    Args:
      ddpm: ``ddpm(z_t, model_step) -> eps`` (with ``.schedule`` unless ``schedule`` is given).
      z: (B, ...) clean latents (or pixels in [-1, 1]).
      key: the draw: ``n`` from ``fold_in(key, PROTECT_TIME)``, ``eps`` from
        ``fold_in(key, PROTECT_NOISE)``.
      schedule: the model's training schedule (None: ``ddpm.schedule``).

    Returns:
      (B,) the loss of each example at its own draw of ``(n, eps)``.
    """
    ddpm, schedule = _model_and_schedule(ddpm, schedule)
    return _mean_sq(_residual(ddpm, schedule, z, key))


def advdm_loss(ddpm: Callable, x: Images, key: Key, *, encode_fn: Callable | None = None,
               schedule: jd.Schedule | None = None) -> PerExample:
    """AdvDM's loss: :func:`diffusion_loss` of ``encode_fn(x)`` (``2x - 1`` for a PDM)."""
    return diffusion_loss(ddpm, _latent(encode_fn, x), key, schedule=schedule)


def sds_loss(ddpm: Callable, x: Images, key: Key, *, encode_fn: Callable | None = None,
             schedule: jd.Schedule | None = None) -> PerExample:
    """The diffusion loss as a value, with the score-distillation gradient as its gradient.

    The value is :func:`advdm_loss`'s; the input-gradient is the encoder's VJP of
    ``eps_hat - eps`` with the UNet's Jacobian skipped: ``J_enc(x)^T (eps_hat - eps)``.
    That is AdvDM's gradient ``(2 / D) sqrt(abar_n) J_enc^T (d eps_hat / d z_n)^T (eps_hat -
    eps)`` with ``d eps_hat / d z_n`` replaced by the identity, up to the positive factor
    ``2 sqrt(abar_n) / D`` (``D`` the latent size), which a sign step ignores. The UNet is
    evaluated once, forward only (no backward pass through it).

    Built as ``sg(L) + s - sg(s)`` with ``s = sum(sg(eps_hat - eps) * z)`` (``sg`` stop-gradient).
    """
    ddpm, schedule = _model_and_schedule(ddpm, schedule)
    z = _latent(encode_fn, x)
    r = jax.lax.stop_gradient(_residual(ddpm, schedule, jax.lax.stop_gradient(z), key))
    s = jnp.sum(r * z, axis=tuple(range(1, z.ndim)))
    return jax.lax.stop_gradient(_mean_sq(r)) + s - jax.lax.stop_gradient(s)


# --------------------------------------------------------------------------------------------
# Objectives (pytrees: the models' parameters are traced by the jitted loop).

@pytree_dataclass
class _Objective:
    """``objective(x, target, key) -> (B,)``; ``prepare(x_target)`` is the target it takes.

    ``kind``: ``"advdm"``, ``"sds"``, ``"photoguard"``, ``"mist"`` or ``"edit"``."""

    ddpm: Callable | None
    schedule: jd.Schedule | None
    encode_fn: Callable | None
    edit_fn: Callable | None
    kind: str = static_field()
    rate: float = static_field(default=1.0)  # Mist / SDS-with-target: weight of the diffusion term
    mode: float = static_field(default=1.0)  # SDS-with-target: +1 / -1 on the SDS term
    targeted: bool = static_field(default=False)

    def prepare(self, x_target):
        """The target the objective compares with: an encoder latent (PhotoGuard, Mist, SDS
        with a target) or an image (edit attacks); constant for the attack."""
        if self.kind in ("photoguard", "mist") or (self.kind == "sds" and self.targeted):
            return jax.lax.stop_gradient(self.encode_fn(x_target))
        return x_target

    def __call__(self, x, target, key):
        if self.kind == "advdm":
            return advdm_loss(self.ddpm, x, key, encode_fn=self.encode_fn,
                              schedule=self.schedule)
        if self.kind == "sds":
            loss = sds_loss(self.ddpm, x, key, encode_fn=self.encode_fn, schedule=self.schedule)
            if not self.targeted:
                return loss
            return self.mode * self.rate * loss - _sum_sq(self.encode_fn(x) - target)
        if self.kind == "photoguard":
            return _sum_sq(self.encode_fn(x) - target)
        if self.kind == "mist":
            z = self.encode_fn(x)
            semantic = diffusion_loss(self.ddpm, z, key, schedule=self.schedule)
            return self.rate * semantic - _sum_sq(z - target)
        return _mean_sq(self.edit_fn(x, key) - target)  # "edit"


def _summed(loss_fn, y, key):
    """``v -> (sum_b loss_b, loss)``: the per-example gradients in one backward pass."""

    def f(v):
        loss_B = loss_fn(v, y, key)
        return jnp.sum(loss_B), loss_B

    return f


def _run_one(objective, x, x_target, key, eps, step_size, *, direction, num_steps,
             random_start, eot_samples, return_iterates) -> AttackResult:
    k_init, k_steps = jr.split(jr.fold_in(key, 0))
    target = objective.prepare(x_target)
    y = jnp.zeros((x.shape[0],), jnp.int32)  # eot_value_and_grad's labels: unused
    loss_fn = lambda xx, _y, k: objective(xx, target, k)
    x0 = x
    if random_start:  # uniform in the Linf ball (drawn flat: see _draw), then clipped
        u = jr.uniform(k_init, (x.size,), x.dtype, -1.0, 1.0).reshape(x.shape)
        x0 = project(x + eps * u, x, eps, "linf")

    # num_steps + 1 evaluations in one scan (as PGD): the last one only measures the loss at
    # the last iterate (its step is dropped), so the loss has one call site to compile
    def body(carry, t):
        x_t = carry[0]
        k_t = jr.fold_in(k_steps, t)
        if eot_samples == 1:  # sample 0 of the EoT convention, without the EoT scan
            (_, loss_B), g = jax.value_and_grad(_summed(loss_fn, y, jr.fold_in(k_t, 0)),
                                                has_aux=True)(x_t)
        else:
            loss_B, g = eot_value_and_grad(loss_fn, x_t, y, k_t, samples=eot_samples)
        x_next = project(x_t + direction * step_size * jnp.sign(g), x, eps, "linf")
        return (x_next, x_t, loss_B), (x_t if return_iterates else None)

    init = (x0, x0, jnp.zeros((x.shape[0],), jnp.float32))
    (_, x_last, loss), its = jax.lax.scan(body, init, jnp.arange(num_steps + 1))
    return AttackResult(x_last, loss, its)


@filter_jit
def _protect(objective, x, x_target, keys, eps, step_size, direction, *, num_steps,
             random_start, eot_samples, return_iterates):
    def one(x_i, t_i, k_i):
        res = _run_one(objective, x_i[None], t_i[None], k_i, eps, step_size,
                       direction=direction, num_steps=num_steps, random_start=random_start,
                       eot_samples=eot_samples, return_iterates=return_iterates)
        return res.x_adv[0], res.loss[0], (res.iterates[:, 0] if return_iterates else None)

    x_adv, loss, its = jax.vmap(one)(x, x_target, keys)
    return AttackResult(x_adv, loss, None if its is None else jnp.swapaxes(its, 0, 1))


# --------------------------------------------------------------------------------------------
# Checks and the shared driver.


def _check_target(x_target, x, name: str = "x_target"):
    check_images(x_target, name)
    if tuple(x_target.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_target.shape)}")
    return x_target


def _keys_for(key, x, indices):
    """One key per example: ``fold_in(key, indices[i])``, or ``key`` itself if a (B,) batch."""
    if jnp.ndim(key) == 1:
        if key.shape[0] != x.shape[0]:
            raise ValueError(f"key: expected one key or {x.shape[0]} keys (one per example), "
                             f"got {key.shape[0]} keys")
        if indices is not None:
            raise ValueError("indices: only with one key (a batch of keys is used as it is)")
        return key
    if indices is None:
        indices = np.arange(x.shape[0])
    shape = getattr(indices, "shape", np.shape(indices))
    if tuple(shape) != (x.shape[0],):
        raise ValueError(f"indices: expected ({x.shape[0]},) global example indices, got shape "
                         f"{tuple(shape)}")
    return tags.example_keys(key, indices)


def _check_model(ddpm, schedule):
    ddpm, schedule = _model_and_schedule(ddpm, schedule)
    if not callable(ddpm):
        raise TypeError(f"ddpm: expected a callable ddpm(z_t, model_step) -> eps, got "
                        f"{type(ddpm).__name__}")
    return ddpm, schedule


def _check_callable(f, name: str, what: str):
    if not callable(f):
        raise TypeError(f"{name}: expected a callable {what}, got {type(f).__name__}")
    return f


def _attack(objective, x, x_target, key, *, direction, eps, step_size, num_steps,
            random_start, eot_samples, indices, return_iterates) -> AttackResult:
    eps = check_scalar(eps, "eps")
    step_size = check_scalar(step_size, "step_size", positive=True)
    num_steps = check_positive_int(num_steps, "num_steps")
    eot_samples, _ = check_eot(eot_samples, None, "eot_samples", "eot_chunk")
    keys = _keys_for(key, x, indices)
    # the direction is traced: AdvDM(+) and AdvDM(-) share one compilation
    return _protect(objective, x, x if x_target is None else x_target, keys, eps, step_size,
                    jnp.asarray(direction, jnp.float32), num_steps=num_steps,
                    random_start=bool(random_start), eot_samples=eot_samples,
                    return_iterates=bool(return_iterates))


def _mode_sign(mode: str) -> float:
    return 1.0 if check_choice(mode, PROTECT_MODES, "mode") == "+" else -1.0


def _check_rate(rate, name: str = "rate") -> float:
    """A static rate, checked in NumPy (``check_scalar``'s ``jnp.asarray`` is a tracer inside
    ``jit``, and ``float`` of it fails: ``mist`` inside a jitted function)."""
    if isinstance(rate, jax.core.Tracer):
        raise ValueError(f"{name}: expected a Python number (it is a static weight), got a "
                         f"traced value")
    try:
        r = float(np.asarray(rate, np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {rate!r}") from None
    if not np.isfinite(r) or r < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {rate!r}")
    return r


# --------------------------------------------------------------------------------------------
# Public attacks.

_COMMON_ARGS = """
      eps: Linf radius (>= 0) in [0, 1] pixel units (reference: 16/255).
      step_size: sign-step length (> 0; reference: 1/255).
      num_steps: sign steps (reference: 100); the loss is measured once more at the end.
      random_start: start uniformly in the eps-ball instead of at ``x`` (reference: no).
      eot_samples: Monte-Carlo / EoT samples of the loss per gradient (reference: 1).
      indices: (B,) global example indices for the per-example keys (default ``arange(B)``).
      return_iterates: also return every iterate, (num_steps + 1, B, H, W, C)."""
_EOT_LINE = next(line + "\n" for line in _COMMON_ARGS.splitlines() if "eot_samples:" in line)


def _documented(f):
    """Fill the shared argument lines into ``f``'s docstring."""
    f.__doc__ = (f.__doc__.replace("{common_no_eot}", _COMMON_ARGS.replace(_EOT_LINE, ""))
                 .replace("{common}", _COMMON_ARGS))
    return f


@_documented
def advdm(ddpm: Callable, x: Images, key: AnyKey, *, encode_fn: Callable | None = None,
          schedule: jd.Schedule | None = None, mode: str = "+", eps: float | Array = DEFAULT_EPS,
          step_size: float | Array = DEFAULT_STEP, num_steps: int = DEFAULT_STEPS,
          random_start: bool = False, eot_samples: int = 1, indices=None,
          return_iterates: bool = False) -> AttackResult:
    """AdvDM: sign steps on the Monte-Carlo diffusion training loss (:func:`advdm_loss`).

    ``mode="+"`` ascends it (AdvDM), ``"-"`` descends it (AdvDM(-)); on an LDM (``encode_fn``)
    or on a PDM (pixels, ``z = 2x - 1``). Gradients go through the encoder and the eps-model.

    Args:
      ddpm: the eps-model on the latents (or pixels), with ``.schedule`` or ``schedule=``.
      x: (B, H, W, C) float32 images in [0, 1].
      key: one key (example ``i`` uses ``fold_in(key, indices[i])``) or (B,) keys.
      encode_fn: the LDM's encoder ``encode_fn(x) -> z``; None: a pixel model.
      schedule: the model's training schedule (None: ``ddpm.schedule``).
      mode: ``"+"`` or ``"-"``.{common}

    Returns:
      :class:`AttackResult`: the last iterate and the diffusion loss there.

    Raises:
      ValueError: bad images, ``eps < 0``, ``step_size <= 0``, non-positive ``num_steps`` /
        ``eot_samples``, unknown ``mode``, keys or indices not matching the batch.
    """
    check_images(x, "x")
    direction = _mode_sign(mode)
    ddpm, schedule = _check_model(ddpm, schedule)
    obj = _Objective(ddpm, schedule, encode_fn, None, "advdm")
    return _attack(obj, x, None, key, direction=direction, eps=eps, step_size=step_size,
                   num_steps=num_steps, random_start=random_start, eot_samples=eot_samples,
                   indices=indices, return_iterates=return_iterates)


@_documented
def sds(ddpm: Callable, x: Images, key: AnyKey, *, encode_fn: Callable | None = None,
        schedule: jd.Schedule | None = None, mode: str = "-", x_target: Images | None = None,
        target_rate: float = 1.0, eps: float | Array = DEFAULT_EPS,
        step_size: float | Array = DEFAULT_STEP,
        num_steps: int = DEFAULT_STEPS, random_start: bool = False, eot_samples: int = 1,
        indices=None, return_iterates: bool = False) -> AttackResult:
    """SDS(+/-): sign steps along the score-distillation gradient (:func:`sds_loss`).

    The gradient is the encoder's VJP of ``eps_hat - eps`` (no backward pass through the
    eps-model): ``"+"`` ascends the diffusion loss, ``"-"`` (the paper's recommended SDS(-))
    descends it. With ``x_target`` (the reference's "SDST"), the step is the sign of
    ``m * target_rate * g_sds - g_tex`` (``m = +/-1`` from ``mode``, ``g_tex`` the gradient of
    ``||E(x) - E(x_target)||^2``): the latent is also pulled toward the target's.

    Args:
      ddpm: the eps-model on the latents (or pixels).
      x: (B, H, W, C) float32 images in [0, 1].
      key: one key or (B,) keys.
      encode_fn: the LDM's encoder; None: a pixel model (required with ``x_target``).
      schedule: the model's training schedule (None: ``ddpm.schedule``).
      mode: ``"+"`` or ``"-"`` (default, SDS(-)).
      x_target: target images (same shape as ``x``) for SDS with a texture target, or None.
      target_rate: weight of the SDS term against the texture term (with ``x_target``).{common}

    Returns:
      :class:`AttackResult`: the last iterate and the diffusion loss there (with ``x_target``:
      ``m * target_rate * L_diff - ||E(x) - E(x_target)||^2``).

    Raises:
      ValueError: as :func:`advdm`; a target of another shape, or ``x_target`` without
        ``encode_fn``.
    """
    check_images(x, "x")
    direction = _mode_sign(mode)
    ddpm, schedule = _check_model(ddpm, schedule)
    if x_target is None:
        obj = _Objective(ddpm, schedule, encode_fn, None, "sds")
        return _attack(obj, x, None, key, direction=direction, eps=eps, step_size=step_size,
                       num_steps=num_steps, random_start=random_start,
                       eot_samples=eot_samples, indices=indices,
                       return_iterates=return_iterates)
    _check_target(x_target, x)
    if encode_fn is None:
        raise ValueError("x_target: SDS with a texture target needs the LDM's encode_fn")
    rate = _check_rate(target_rate, "target_rate")
    obj = _Objective(ddpm, schedule, encode_fn, None, "sds", rate=rate, mode=direction,
                     targeted=True)
    return _attack(obj, x, x_target, key, direction=1.0, eps=eps, step_size=step_size,
                   num_steps=num_steps, random_start=random_start, eot_samples=eot_samples,
                   indices=indices, return_iterates=return_iterates)


@_documented
def photoguard(encode_fn: Callable, x: Images, x_target: Images, key: AnyKey, *,
               eps: float | Array = DEFAULT_EPS, step_size: float | Array = DEFAULT_STEP,
               num_steps: int = DEFAULT_STEPS, random_start: bool = False, indices=None,
               return_iterates: bool = False) -> AttackResult:
    """PhotoGuard's encoder attack: pull ``encode_fn(x)`` toward ``encode_fn(x_target)``.

    Sign steps descending ``||E(x) - E(x_target)||^2`` (summed over the latent; the reference's
    "texture_only" mode). Deterministic: the key only seeds the random start.

    Args:
      encode_fn: the LDM's encoder ``encode_fn(x) -> z`` (differentiable).
      x: (B, H, W, C) float32 images in [0, 1].
      x_target: (B, H, W, C) target images in [0, 1].
      key: one key or (B,) keys.{common_no_eot}

    Returns:
      :class:`AttackResult`: the last iterate and its latent distance to the target.

    Raises:
      ValueError: as :func:`advdm`; a target of another shape.
    """
    check_images(x, "x")
    _check_target(x_target, x)
    _check_callable(encode_fn, "encode_fn", "encode_fn(x) -> z")
    obj = _Objective(None, None, encode_fn, None, "photoguard")
    return _attack(obj, x, x_target, key, direction=-1.0, eps=eps, step_size=step_size,
                   num_steps=num_steps, random_start=random_start, eot_samples=1,
                   indices=indices, return_iterates=return_iterates)


@_documented
def mist(ddpm: Callable, encode_fn: Callable, x: Images, x_target: Images, key: AnyKey, *,
         schedule: jd.Schedule | None = None, rate: float = 1e4, eps: float | Array = DEFAULT_EPS,
         step_size: float | Array = DEFAULT_STEP, num_steps: int = DEFAULT_STEPS,
         random_start: bool = False, eot_samples: int = 1, indices=None,
         return_iterates: bool = False) -> AttackResult:
    """Mist: the textural loss toward a target plus the weighted AdvDM semantic loss.

    Sign steps ascending ``rate * L_diff(E(x)) - ||E(x) - E(x_target)||^2`` (``L_diff`` the
    Monte-Carlo diffusion loss, a mean over the latent; the texture term a sum, as in the
    reference, whose fused rate is 1e4). Gradients go through the encoder and the eps-model.

    Args:
      ddpm: the eps-model on the latents.
      encode_fn: the LDM's encoder.
      x: (B, H, W, C) float32 images in [0, 1].
      x_target: (B, H, W, C) target images (the reference's MIST.png pattern).
      key: one key or (B,) keys.
      schedule: the model's training schedule (None: ``ddpm.schedule``).
      rate: weight of the semantic (diffusion) loss (>= 0).{common}

    Returns:
      :class:`AttackResult`: the last iterate and ``rate * L_diff - texture`` there.

    Raises:
      ValueError: as :func:`advdm`; a target of another shape, ``rate < 0``.
    """
    check_images(x, "x")
    _check_target(x_target, x)
    _check_callable(encode_fn, "encode_fn", "encode_fn(x) -> z")
    rate = _check_rate(rate)
    ddpm, schedule = _check_model(ddpm, schedule)
    obj = _Objective(ddpm, schedule, encode_fn, None, "mist", rate=rate)
    return _attack(obj, x, x_target, key, direction=1.0, eps=eps, step_size=step_size,
                   num_steps=num_steps, random_start=random_start, eot_samples=eot_samples,
                   indices=indices, return_iterates=return_iterates)


@_documented
def edit_attack(edit_fn: Callable, x: Images, key: AnyKey, *, x_target: Images | None = None,
                eps: float | Array = DEFAULT_EPS, step_size: float | Array = DEFAULT_STEP,
                num_steps: int = DEFAULT_STEPS, random_start: bool = False,
                eot_samples: int = 1, indices=None,
                return_iterates: bool = False) -> AttackResult:
    """End-to-end attack through an edit ``edit_fn(x, key)``, with its exact gradients.

    Untargeted (``x_target=None``): ascend ``mean((edit(x_adv) - x)^2)``, the edit's distance
    from the clean image; targeted: descend ``mean((edit(x_adv) - x_target)^2)``. Each loss
    evaluation runs the edit with its own key (EoT over the edit's noise with ``eot_samples``);
    the gradient is whatever ``jax.grad`` makes of ``edit_fn``: exact through an
    :class:`jaxrob.purify.SDEdit` or :class:`jaxrob.purify.PurifyThenEdit` (``lax.scan`` with
    ``jax.checkpoint``).

    Args:
      edit_fn: ``edit_fn(x, key) -> x_edited`` in [0, 1] (a pytree is traced, not baked in).
      x: (B, H, W, C) float32 images in [0, 1].
      key: one key or (B,) keys.
      x_target: target images for the targeted attack, or None.{common}

    Returns:
      :class:`AttackResult`: the last iterate and the (EoT-mean) distance there.

    Raises:
      ValueError: as :func:`advdm`; a target of another shape.
    """
    check_images(x, "x")
    _check_callable(edit_fn, "edit_fn", "edit_fn(x, key) -> x_edited")
    if x_target is not None:
        _check_target(x_target, x)
    obj = _Objective(None, None, None, edit_fn, "edit", targeted=x_target is not None)
    return _attack(obj, x, x_target, key, direction=1.0 if x_target is None else -1.0,
                   eps=eps, step_size=step_size, num_steps=num_steps,
                   random_start=random_start, eot_samples=eot_samples, indices=indices,
                   return_iterates=return_iterates)


def sdedit_attack(ddpm: Callable, x: Images, key: AnyKey, *, strength: float,
                  steps: int | None = None, sampler: str = "ddpm",
                  encode_fn: Callable | None = None, decode_fn: Callable | None = None,
                  schedule: jd.Schedule | None = None, **attack_kwargs) -> AttackResult:
    """:func:`edit_attack` through SDEdit (:func:`jaxrob.purify.sdeditor`): the adaptive
    end-to-end attack on a PDM's (or an LDM's) edit, with exact gradients.

    Args:
      ddpm: the pixel (or latent) diffusion model.
      x: (B, H, W, C) float32 images in [0, 1].
      key: one key or (B,) keys.
      strength: SDEdit's strength in [0, 1] (the reference evaluates PDMs at 0.5 and 0.7).
      steps, sampler, encode_fn, decode_fn, schedule: the editor's (:func:`sdeditor`).
      **attack_kwargs: :func:`edit_attack`'s (``x_target``, ``eps``, ``eot_samples``, ...).
    """
    check_images(x, "x")
    editor = sdeditor(ddpm, strength=strength, steps=steps, sampler=sampler,
                      encode_fn=encode_fn, decode_fn=decode_fn, schedule=schedule)
    return edit_attack(editor, x, key, **attack_kwargs)


def pdm_pure_attack(pdm: Callable, ldm: Callable, x: Images, key: AnyKey, *,
                    encode_fn: Callable, decode_fn: Callable, strength: float,
                    steps: int | None = None, sampler: str = "ddpm", t_star: float = 0.1,
                    pdm_steps: int = 10, pdm_schedule: jd.Schedule | None = None,
                    ldm_schedule: jd.Schedule | None = None, **attack_kwargs) -> AttackResult:
    """Adaptive attack on PDM-Pure: the protection optimised through PDM-Pure and the LDM edit.

    :func:`edit_attack` on ``PurifyThenEdit(pdm_pure(pdm, t_star, pdm_steps), sdeditor(ldm,
    strength, encode_fn, decode_fn))`` with exact gradients through both chains; EoT over
    PDM-Pure's (and the edit's) noise with ``eot_samples``.

    Args:
      pdm: the pixel diffusion model of PDM-Pure.
      ldm: the eps-model on the LDM's latents.
      x: (B, H, W, C) float32 images in [0, 1].
      key: one key or (B,) keys.
      encode_fn, decode_fn: the LDM's codec.
      strength, steps, sampler: the LDM edit's SDEdit (:func:`jaxrob.purify.sdeditor`).
      t_star, pdm_steps: PDM-Pure's strength and reverse steps (paper: 0.1, 10).
      pdm_schedule, ldm_schedule: the models' schedules (None: their ``.schedule``).
      **attack_kwargs: :func:`edit_attack`'s (``x_target``, ``eps``, ``eot_samples``, ...).
    """
    check_images(x, "x")
    pipeline = PurifyThenEdit(
        pdm_pure(pdm, pdm_schedule, t_star=t_star, num_steps=pdm_steps),
        sdeditor(ldm, strength=strength, steps=steps, sampler=sampler, encode_fn=encode_fn,
                 decode_fn=decode_fn, schedule=ldm_schedule))
    return edit_attack(pipeline, x, key, **attack_kwargs)
