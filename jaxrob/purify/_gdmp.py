"""GDMP-style guided purification: every reverse DDPM step is pulled towards the (noised) input.

Wang et al.'s Guided Diffusion Model for Purification (GDMP) runs DiffPure's DDPM chain with a
guidance term added to the mean of every ancestral step, the gradient of a similarity ``D``
between the current state and the input diffused to the same step:

  ``x_{n-1} = mu_theta(x_n, n) + sigma_n^2 s_n grad_{x_n} D(x_n, x_adv_n) + sigma_n z``,
  ``x_adv_n = sqrt(abar_n) x_adv + sqrt(1 - abar_n) xi_n`` (fresh ``xi_n`` every step),

with ``D = -MSE`` or SSIM and GDMP's time-dependent scale
``s_n = sqrt(1 - abar_n) / (m sqrt(abar_n))``, ``m = (2 ptb / 3) / guide_scale`` (``ptb`` the
attack budget in [0, 1] units, ``2 ptb`` its size in the model's [-1, 1] space). The whole
purification (diffuse to ``t_star``, guided reverse chain) is repeated ``num_iterations`` times,
each time from the previous output and always guided towards the original input.

Attacking it exactly needs the gradient *of the guidance gradient*: ``s_n grad_x D(x_n, x_adv_n)``
depends on the attacked input through ``x_n`` and through the reference ``x_adv_n``, so its
input gradient is a second derivative of ``D``. ``gradient="exact"`` differentiates through the
guided chain (``jax.grad`` of a ``jax.grad``: exact by construction); ``"guidance_constant"`` is
the approximation of the PyTorch reference code, whose guidance gradient is computed without
``create_graph`` and so enters the backward pass as a constant (``stop_gradient`` on the
guidance term); ``"bpda"`` is the identity backward. Kassis et al. (DiffBreak) report that
dropping the guidance path gives gradients with relative errors far above 1.

Differences from GDMP's code, on purpose:

* the distance is per example (MSE: mean over one image's pixels; SSIM: mean of one image's SSIM
  map). GDMP's ``F.mse_loss`` / ``pytorch_ssim.ssim`` average over the *batch* too, so its
  guidance per image shrinks with the batch size (and depends on the other images); its CIFAR-10
  settings (batch 100, ``guide_scale`` 60000 for MSE, 70000 for SSIM) correspond to
  ``guide_scale = 600`` / ``700`` here;
* the implied x0 is not clipped to [-1, 1] inside the chain (as :func:`diffpure`: smooth for
  gradients), and the output is clipped to [0, 1] at the end;
* all randomness comes from ``key`` (:mod:`jaxrob._keys`): iteration ``i`` uses
  ``k_i = fold_in(key, i)`` (``key`` itself when ``num_iterations == 1``), its forward noise
  ``fold_in(k_i, PURIFY_FORWARD)``, reverse noise ``fold_in(fold_in(k_i, PURIFY_REVERSE), n)``
  (as :func:`diffpure`) and the reference noise of step ``n``
  ``fold_in(fold_in(k_i, GUIDE_REFERENCE), n)``. With ``guide_scale=0`` and one iteration the
  purifier is :func:`diffpure`'s DDPM purifier with the same key.

References:
  Wang, Lyu, Ma, Wang, Zhang, Yang. Guided Diffusion Model for Adversarial Purification.
  arXiv:2205.14969, 2022 (code: github.com/JinyiW/GuidedDiffusionPur).
  Kassis, Hengartner, Yu. DiffBreak: Is Diffusion-Based Purification Robust? NeurIPS 2025.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int, check_t_star
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Array, Images
from jaxrob.purify._diffpure import (
    _check_keys,
    _deviations,
    _is_key_batch,
    _model_and_schedule,
    check_options,
    deviation_per_example,
)

DISTANCES = ("mse", "ssim")
GDMP_GRADIENTS = ("exact", "guidance_constant", "bpda")

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2.0 * sigma**2))
    g = g / g.sum()
    return np.outer(g, g)


def ssim(a: Array, b: Array) -> Array:
    """Per-example SSIM of two NHWC batches (11x11 Gaussian window, sigma 1.5, zero padding,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``, channels filtered separately, the map averaged over
    height, width and channels), as the ``pytorch_ssim`` package GDMP guides with.

    Args:
      a, b: (B, H, W, C) images (GDMP applies it in the model's [-1, 1] space).

    Returns:
      (B,) SSIM, 1 for identical images.

    References:
      Wang, Bovik, Sheikh, Simoncelli. Image quality assessment: from error visibility to
      structural similarity. IEEE TIP 2004.
    """
    c = a.shape[-1]
    w = jnp.asarray(_gaussian_window(_SSIM_WINDOW, _SSIM_SIGMA), a.dtype)
    kernel = jnp.tile(w[:, :, None, None], (1, 1, 1, c))  # HWIO, one filter per channel
    pad = _SSIM_WINDOW // 2

    def blur(v):
        return jax.lax.conv_general_dilated(
            v, kernel, (1, 1), [(pad, pad), (pad, pad)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + _SSIM_C1) * (2.0 * cov + _SSIM_C2)
    den = (mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def _similarity(name: str) -> Callable[[Array, Array], Array]:
    """Per-example similarity D (maximised by the guidance)."""
    if name == "mse":
        return lambda a, b: -jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
    return ssim


def guidance_scales(chain: jd.Schedule, *, guide_scale: float, guide_ptb: float) -> Array:
    """GDMP's per-position scale ``s_n = sqrt(1 - abar_n) / (m sqrt(abar_n))`` with
    ``m = (2 guide_ptb / 3) / guide_scale``, for every position of ``chain``; (N,).

    ``guide_scale = 0`` gives zeros (no guidance).
    """
    abar = np.asarray(chain.alphas_cumprod, np.float64)
    one_m = np.asarray(chain.one_minus_alphas_cumprod, np.float64)
    s = guide_scale * 3.0 / (2.0 * guide_ptb) * np.sqrt(one_m / abar)
    return jnp.asarray(s, jnp.float32)


@pytree_dataclass
class GuidedPurifier:
    """A GDMP-style guided purifier; call it as ``purifier(x, key)`` (see the module docstring).

    Build it with :func:`gdmp`. A pytree like :class:`jaxrob.purify.Purifier`: the eps-model, its
    schedule, the chain and the per-step guidance scales are leaves, the options static.

    Attributes:
      eps_fn: ``eps_fn(x_t, model_step) -> eps``.
      schedule: the model's training schedule.
      chain: the truncated, respaced chain of one iteration (derived).
      scales: GDMP's guidance scale ``s_n`` per position of ``chain`` (derived).
      guide_scale: GDMP's ``guide_scale`` (per-example distance, see the module docstring);
        float32 leaf, like ``guide_ptb``, so purifiers that differ only in the guidance
        strength share a compilation (the chain uses ``scales``, derived from both).
      guide_ptb: GDMP's ``ptb``, the attack budget in [0, 1] units the scale is tied to.
      t_star: fraction of the forward process each iteration diffuses to.
      num_steps: reverse (guided) steps per iteration.
      num_iterations: purification iterations (GDMP: 4 on CIFAR-10).
      distance: ``"mse"`` (D = -MSE) or ``"ssim"``.
      diffuse_reference: guide towards the input diffused to the current step (GDMP); False
        guides towards the input itself.
      gradient: ``"exact"``, ``"guidance_constant"`` or ``"bpda"``.
      variance: DDPM variance, ``"fixed_small"`` or ``"fixed_large"`` (GDMP's CIFAR-10 model).
      remat: ``jax.checkpoint`` each step.
      unroll: ``lax.scan`` unroll factor.
    """

    eps_fn: jd.EpsFn
    schedule: jd.Schedule
    chain: jd.Schedule
    scales: Array
    guide_scale: Array
    guide_ptb: Array
    t_star: float = static_field()
    num_steps: int = static_field()
    num_iterations: int = static_field(default=1)
    distance: str = static_field(default="mse")
    diffuse_reference: bool = static_field(default=True)
    gradient: str = static_field(default="exact")
    variance: str = static_field(default="fixed_small")
    remat: bool = static_field(default=True)
    unroll: int = static_field(default=1)

    def replace(self, **changes) -> GuidedPurifier:
        """A copy with other fields. Changing an option re-derives the chain and the scales;
        changing only ``eps_fn`` (e.g. other parameters of the same shapes) keeps them."""
        if set(changes) <= {"eps_fn"}:
            return dataclasses.replace(self, **changes)
        if {"chain", "scales"} & set(changes):
            raise ValueError("chain and scales are derived; change t_star, num_steps, "
                             "guide_scale or guide_ptb instead")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("chain", "scales")}
        fields.update(changes)
        for name in ("guide_scale", "guide_ptb"):
            fields[name] = float(fields[name])
        return gdmp(fields.pop("eps_fn"), fields.pop("schedule"), **fields)

    @property
    def nfe(self) -> int:
        """Network-function evaluations of one purification of one image (forward only)."""
        return self.num_steps * self.num_iterations

    @property
    def num_states(self) -> int:
        """States :meth:`reconstruction_deviation` scores (per iteration: start + each step)."""
        return (self.num_steps + 1) * self.num_iterations

    def manifest(self) -> dict:
        """What an evaluation records about this purifier."""
        return {"purifier": "gdmp", "sampler": "ddpm", "t_star": float(self.t_star),
                "steps": int(self.num_steps), "num_iterations": int(self.num_iterations),
                "distance": self.distance, "guide_scale": float(self.guide_scale),
                "guide_ptb": float(self.guide_ptb),
                "diffuse_reference": bool(self.diffuse_reference), "gradient": self.gradient,
                "variance": self.variance, "remat": self.remat,
                "schedule_steps": int(self.schedule.num_steps), "nfe_forward": int(self.nfe)}

    # ------------------------------------------------------------------ the function
    def __call__(self, x: Images, key: AnyKey) -> Images:
        """Purify ``x`` (float32 NHWC in [0, 1]) with randomness ``key`` (one key, or one per
        example as :meth:`jaxrob.purify.Purifier.__call__`)."""
        check_images(x, "x")
        _check_keys(key, x, "key")
        if _is_key_batch(key):
            return jax.vmap(lambda xi, ki: self._purify(xi[None], ki)[0])(x, key)
        return self._purify(x, key)

    def _purify(self, x, key):
        if self.gradient == "bpda":
            out = self._run(jax.lax.stop_gradient(x), key)[0]
            return x + jax.lax.stop_gradient(out - x)
        return self._run(x, key)[0]

    def reconstruction_deviation(self, x: Images, x_ref: Images,
                                 key: AnyKey) -> tuple[Images, Array]:
        """As :meth:`jaxrob.purify.Purifier.reconstruction_deviation`: the purified ``x`` and
        the (num_states, B) squared deviations of the guided chain's states from ``x_ref``
        diffused with each iteration's forward noise (DiffAttack's hook). Uses this purifier's
        ``gradient`` (``"exact"`` or ``"guidance_constant"``; BPDA is refused by DiffAttack)."""
        return deviation_per_example(lambda a, r, k: self._run(a, k, r), x, x_ref, key)

    def _run(self, x01, key, x_ref=None):
        """``(purified [0, 1], deviations (num_states, B) or None)``."""
        guide = jd.to_model_space(x01)  # every iteration is guided towards the input
        ref = None if x_ref is None else jd.to_model_space(x_ref)
        h, devs = x01, []
        for i in range(self.num_iterations):
            k = jr.fold_in(key, i) if self.num_iterations > 1 else key
            h, d = self._iteration(h, guide, k, ref)
            devs.append(d)
        return h, (None if ref is None else jnp.concatenate(devs, axis=0))

    def _iteration(self, x01, guide, key, ref):
        chain, batch = self.chain, x01.shape[0]
        x = jd.to_model_space(x01)
        noise = jr.normal(jr.fold_in(key, tags.PURIFY_FORWARD), x.shape, x.dtype)
        k_rev = jr.fold_in(key, tags.PURIFY_REVERSE)
        k_ref = jr.fold_in(key, tags.GUIDE_REFERENCE)
        x_t = jd.q_sample(x, chain.num_steps - 1, noise, chain)
        var = chain.betas if self.variance == "fixed_large" else chain.posterior_variance
        similarity = _similarity(self.distance)
        grad_d = jax.grad(lambda a, b: jnp.sum(similarity(a, b)))  # per example: independent

        def body(x_n, n):
            eps = self.eps_fn(x_n, jnp.broadcast_to(chain.model_steps[n], (batch,)))
            x_prev = jd.ddpm_step(x_n, n, eps, jd.step_noise(k_rev, n, x_n), chain,
                                  variance=self.variance)
            target = (jd.q_sample(guide, n, jd.step_noise(k_ref, n, guide), chain)
                      if self.diffuse_reference else guide)
            g = self.scales[n] * grad_d(x_n, target)
            if self.gradient == "guidance_constant":
                g = jax.lax.stop_gradient(g)
            return x_prev + var[n] * g  # sigma_n^2 s_n grad D added to the step's mean

        step = jax.checkpoint(body) if self.remat else body
        want = ref is not None

        def f(c, n):
            out = step(c, n)
            return out, (out if want else None)

        ns = jnp.arange(chain.num_steps - 1, -1, -1)
        out, traj = jax.lax.scan(f, x_t, ns, unroll=self.unroll)
        dev = None
        if want:
            a = jnp.sqrt(jnp.concatenate([chain.alphas_cumprod[-1:],
                                          chain.alphas_cumprod_prev[::-1]]))
            b = jnp.sqrt(jnp.concatenate([chain.one_minus_alphas_cumprod[-1:],
                                          chain.one_minus_alphas_cumprod_prev[::-1]]))
            dev = _deviations(jnp.concatenate([x_t[None], traj], axis=0), ref, noise, a, b)
        return jd.from_model_space(out, clip=True), dev


def gdmp(model: jd.EpsFn, schedule: jd.Schedule | None = None, *, t_star: float,
         guide_scale: float, num_steps: int | None = None, num_iterations: int = 1,
         distance: str = "mse", guide_ptb: float = 8.0 / 255.0,
         diffuse_reference: bool = True, gradient: str = "exact",
         variance: str = "fixed_small", remat: bool = True, unroll: int = 1) -> GuidedPurifier:
    """A GDMP-style guided purifier (Wang et al. 2022; module docstring for the equations).

    Args:
      model: the diffusion model ``model(x_t, model_step) -> eps`` (a
        :class:`jaxrob.models.DiffusionModel` carries its schedule) or any ``eps_fn``.
      schedule: the model's training schedule (None: ``model.schedule``).
      t_star: fraction of the forward process in (0, 1] each iteration diffuses to (GDMP's
        CIFAR-10 setting: 36 of 1000 steps, ``t_star=0.036``).
      guide_scale: GDMP's ``guide_scale`` (>= 0) with the distance averaged per example: its
        CIFAR-10 MSE setting (60000 over a batch of 100) is ``guide_scale=600``. 0 turns the
        guidance off. With MSE, step ``n`` moves the state by ``sigma_n^2 s_n 2 / d`` of its gap
        to the reference (``d`` values per image): a respaced chain (large ``sigma_n^2``) or
        small images need a smaller ``guide_scale`` than GDMP's 1000-step CIFAR-10 chain, or
        the pull overshoots (factor above 1).
      num_steps: guided reverse steps per iteration (None: every step of the chain).
      num_iterations: purification iterations, each from the previous output (GDMP: 4).
      distance: ``"mse"`` (D = -MSE) or ``"ssim"`` (:func:`ssim`).
      guide_ptb: the attack budget GDMP ties the scale to, in [0, 1] units (8/255).
      diffuse_reference: guide towards the input diffused to the current step (GDMP) or, with
        False, towards the input itself.
      gradient: ``"exact"`` (default: through the guidance, second order),
        ``"guidance_constant"`` (stop_gradient on the guidance term, the reference code's
        gradient) or ``"bpda"`` (identity backward).
      variance: ``"fixed_small"`` (as :func:`diffpure`) or ``"fixed_large"``.
      remat: checkpoint every step (bounded memory for exact gradients).
      unroll: ``lax.scan`` unroll factor.

    Returns:
      A :class:`GuidedPurifier`.

    Raises:
      ValueError: ``t_star`` outside (0, 1], ``num_steps`` not in 1..(steps of the chain),
        ``guide_scale`` negative or not finite, ``guide_ptb`` not positive, unknown
        ``distance`` / ``gradient`` / ``variance``, non-positive ``num_iterations``.

    Example::

      ddpm = jaxrob.models.load("checkpoints/mnist_ddpm", fast_vjp=True)
      purify = jaxrob.purify.gdmp(ddpm, t_star=0.036, num_steps=6, num_iterations=4,
                                  guide_scale=600.0)
      x_pur = purify(x, jax.random.key(0))
    """
    model, schedule = _model_and_schedule(model, schedule)
    check_options("gdmp", model, schedule, {}, {})  # eps_fn callable, schedule a Schedule
    t_star = check_t_star(t_star)
    check_choice(distance, DISTANCES, "distance")
    check_choice(gradient, GDMP_GRADIENTS, "gradient")
    check_choice(variance, jd.VARIANCES, "variance")
    num_iterations = check_positive_int(num_iterations, "num_iterations")
    guide_scale = _finite(guide_scale, "guide_scale", positive=False)
    guide_ptb = _finite(guide_ptb, "guide_ptb", positive=True)
    if num_steps is None:
        num_steps = schedule.step_for_t_star(t_star) + 1
    num_steps = check_positive_int(num_steps, "num_steps")
    chain = jd.truncated(schedule, t_star, num_steps)
    scales = guidance_scales(chain, guide_scale=guide_scale, guide_ptb=guide_ptb)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return GuidedPurifier(model, schedule, chain, scales, f32(guide_scale), f32(guide_ptb),
                          t_star, num_steps, num_iterations, distance, bool(diffuse_reference),
                          gradient, variance, bool(remat), int(unroll))


def _finite(value, name: str, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} 0, got "
                         f"{value!r}")
    return v
