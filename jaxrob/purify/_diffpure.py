"""DiffPure-style purification: forward-diffuse to ``t_star``, run the reverse process back.

A purifier is a pure function ``purify(x, key) -> x_purified`` of [0, 1] NHWC images. All of its
randomness comes from ``key``: the forward noise from ``fold_in(key, 0)`` and the noise of reverse
step ``n`` from ``fold_in(fold_in(key, 1), n)``. Hence

* fixed randomness (the "DW-box" setting) is the same key for attack and evaluation;
* forward-locked randomness (ADDT's "forward lock" variant) fixes only the forward noise: pass
  ``forward_key=`` and the forward noise comes from it instead (``fold_in(forward_key, 0)``),
  while the reverse steps' noise still comes from ``key``. ``purify(x, k, forward_key=k)`` is
  ``purify(x, k)`` exactly;
* EoT over N samples is a ``vmap`` over N keys;
* a batch of keys, one per example (``keys.shape == (B,)``, e.g. :func:`example_keys`), gives
  every example its own noise, so results do not depend on batch size, chunking or devices.

Gradients are exact by default: the chain is a ``lax.scan`` over a static step grid with
``jax.checkpoint`` on each step, so reverse-mode memory does not grow with the number of steps.
The approximations used in the literature are explicit, named options (``gradient=``):
``"bpda"`` (Athalye et al.: identity backward) and ``"surrogate"`` (Lee & Kim: the value of the
full chain, the gradient of a shorter chain run with the same key).

Build the eps-model twin with ``fast_vjp=True`` (:mod:`jaxrob.models`) for attacks on CPU:
reverse-mode through the scan is then as fast per step as an unrolled chain.

References:
  Nie et al. Diffusion Models for Adversarial Purification. ICML 2022.
  Lee, Kim. Robust Evaluation of Diffusion-Based Adversarial Purification. ICCV 2023.
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of Security. ICML 2018.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jax.random as jr

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int, check_t_star
from jaxrob._keys import CLASSIFIER, fold
from jaxrob._keys import example_keys as example_keys
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Array, Images, Key, PurifyFn

SAMPLERS = ("ddpm", "ddim", "sde", "ode")
GRADIENTS = ("exact", "bpda", "surrogate")

_OPTIONS = ("sampler", "gradient", "surrogate_steps", "variance", "eta", "remat", "unroll",
            "input_size")


def resize_images(x: Images, size: tuple[int, int]) -> Array:
    """``x`` resized to ``size = (height, width)``: bilinear, half-pixel centres, no
    antialiasing, i.e. PyTorch's ``F.interpolate(x, size, mode="bilinear",
    align_corners=False)`` up and down (what DiffPure does around its ImageNet purifier). A
    linear map (differentiable; values stay in the input's range); ``x`` itself when it already
    has that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[1:3]) == size:
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)


def _is_key_batch(key) -> bool:
    return jnp.ndim(key) == 1


def _check_keys(key, x, name: str) -> None:
    """One key, or a (B,) batch of keys for the B images of ``x``."""
    if _is_key_batch(key) and key.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected one key or {x.shape[0]} keys (one per example), "
                         f"got {key.shape[0]} keys")


def deviation_per_example(run, x, x_ref, key):
    """Check ``x``, ``x_ref`` and ``key``, then ``run(x, x_ref, key) -> (x_purified, dev)``
    over the batch, or once per example (vmapped) when ``key`` holds one key per example;
    ``dev`` comes back (num_states, B) either way."""
    check_images(x, "x")
    check_images(x_ref, "x_ref")
    if x_ref.shape != x.shape:
        raise ValueError(f"x_ref: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_ref.shape)}")
    _check_keys(key, x, "key")
    if _is_key_batch(key):
        out, dev = jax.vmap(lambda xi, ri, ki: run(xi[None], ri[None], ki))(x, x_ref, key)
        return out[:, 0], dev[:, :, 0].T
    return run(x, x_ref, key)


def check_options(owner: str, eps_fn, schedule, options: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``options`` (unknown names refused), after checking that
    ``eps_fn`` is callable and ``schedule`` a :class:`jaxrob.diffusion.Schedule`."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{owner}: unknown option(s) {sorted(unknown)}; expected "
                        f"{sorted(defaults)}")
    if not callable(eps_fn):
        raise TypeError(f"eps_fn: expected a callable eps_fn(x_t, model_step), got "
                        f"{type(eps_fn).__name__}")
    if not isinstance(schedule, jd.Schedule):
        raise TypeError(f"schedule: expected a jaxrob.diffusion.Schedule, got "
                        f"{type(schedule).__name__}")
    return {**defaults, **options}


@pytree_dataclass
class Purifier:
    """A DiffPure-style purifier; call it as ``purifier(x, key)``.

    Build it with :func:`diffpure` (one stage) or :func:`multistage`. It is a pytree: the
    eps-model (a :class:`jaxrob.models.DiffusionModel` or any ``eps_fn``), its schedule and the
    reverse chains derived from it are leaves, the options are static. Jitted through
    :func:`jaxrob._jit.filter_jit` (every attack and evaluation does), a purifier over new
    parameters of the same shapes (``purifier.replace(eps_fn=other_model)``) reuses the
    compilation; a plain-function ``eps_fn`` is static (hashed by identity).

    Attributes:
      eps_fn: ``eps_fn(x_t, model_step) -> eps``.
      schedule: the model's training schedule.
      chains: per stage, the truncated, respaced chain its reverse process runs (derived).
      surrogate_chains: the same for the surrogate chain (``gradient="surrogate"``; derived).
      stages: ``((t_star, num_steps), ...)`` applied in order.
      sampler: ``"ddpm"``, ``"ddim"``, ``"sde"`` (VP-SDE Euler-Maruyama) or ``"ode"``
        (probability-flow ODE, Euler).
      gradient: ``"exact"``, ``"bpda"`` or ``"surrogate"``.
      surrogate_steps: reverse steps per stage of the surrogate chain (``"surrogate"`` only).
      variance: DDPM variance, ``"fixed_small"`` or ``"fixed_large"``.
      eta: DDIM eta.
      remat: ``jax.checkpoint`` each step (bounded memory under reverse-mode).
      unroll: ``lax.scan`` unroll factor.
      input_size: None, or the side the diffusion model runs at: an input of another size is
        resized to ``input_size`` x ``input_size`` before the chain and the output back to the
        input's size after it (:func:`resize_images`: bilinear, PyTorch's
        ``align_corners=False``), both inside the purifier, so gradients flow through them.
        DiffPure on ImageNet: 224x224 inputs, 256x256 ADM.
      sde: for ``"sde"``/``"ode"``, the VP-SDE of ``schedule`` (derived:
        :meth:`jaxrob.diffusion.VPSDE.from_schedule`; a non-linear schedule is refused).
    """

    eps_fn: jd.EpsFn
    schedule: jd.Schedule
    chains: tuple
    surrogate_chains: tuple
    stages: tuple[tuple[float, int], ...] = static_field()
    sampler: str = static_field(default="ddpm")
    gradient: str = static_field(default="exact")
    surrogate_steps: int | None = static_field(default=None)
    variance: str = static_field(default="fixed_small")
    eta: float = static_field(default=0.0)
    remat: bool = static_field(default=True)
    unroll: int = static_field(default=1)
    input_size: int | None = static_field(default=None)
    # the VP-SDE of ``schedule`` for the "sde" / "ode" samplers (derived; None otherwise)
    sde: jd.VPSDE | None = static_field(default=None)

    # forward and reverse noise come from separate keys (``forward_key=``), as
    # randomness="forward_lock" evaluations need (a class constant, not a field)
    splits_randomness = True

    @classmethod
    def create(cls, eps_fn: jd.EpsFn, schedule: jd.Schedule,
               stages: Sequence[tuple[float, int]], **options) -> Purifier:
        """Validate the options and derive the reverse chains (host-side, once)."""
        opts = check_options("Purifier", eps_fn, schedule, options, dict(
            sampler="ddpm", gradient="exact", surrogate_steps=None, variance="fixed_small",
            eta=0.0, remat=True, unroll=1, input_size=None))
        check_choice(opts["sampler"], SAMPLERS, "sampler")
        check_choice(opts["gradient"], GRADIENTS, "gradient")
        check_choice(opts["variance"], jd.VARIANCES, "variance")
        if opts["input_size"] is not None:
            opts["input_size"] = check_positive_int(opts["input_size"], "input_size")
        opts["eta"] = float(opts["eta"])
        if opts["eta"] < 0:
            raise ValueError(f"eta: expected >= 0, got {opts['eta']}")
        stages = tuple((check_t_star(t), check_positive_int(s, "num_steps"))
                       for t, s in stages)
        if not stages:
            raise ValueError("stages: expected at least one (t_star, num_steps) stage")
        if opts["gradient"] == "surrogate":
            check_positive_int(opts["surrogate_steps"], "surrogate_steps")
        elif opts["surrogate_steps"] is not None:
            raise ValueError("surrogate_steps: only used with gradient='surrogate', got "
                             f"gradient={opts['gradient']!r}")
        discrete = opts["sampler"] in ("ddpm", "ddim")
        chains = tuple(jd.truncated(schedule, t, s) if discrete else None for t, s in stages)
        surrogate = tuple(
            jd.truncated(schedule, t, opts["surrogate_steps"]) if discrete else None
            for t, _ in stages) if opts["gradient"] == "surrogate" else ()
        sde = None if discrete else jd.VPSDE.from_schedule(schedule)
        return cls(eps_fn, schedule, chains, surrogate, stages, **opts, sde=sde)

    def replace(self, **changes) -> Purifier:
        """A copy with other fields. Changing an option re-derives the chains; changing only
        ``eps_fn`` (e.g. fine-tuned parameters of the same shapes) keeps them."""
        if set(changes) <= {"eps_fn"}:
            return dataclasses.replace(self, **changes)
        if {"chains", "surrogate_chains"} & set(changes):
            raise ValueError("chains and surrogate_chains are derived; change stages, "
                             "sampler or surrogate_steps instead")
        fields = {f: getattr(self, f) for f in ("eps_fn", "schedule", "stages", *_OPTIONS)}
        fields.update(changes)
        return Purifier.create(fields.pop("eps_fn"), fields.pop("schedule"),
                               fields.pop("stages"), **fields)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def nfe(self) -> int:
        """Network-function evaluations of one purification of one image (forward only)."""
        return sum(steps for _, steps in self.stages)

    @property
    def nfe_backward(self) -> int:
        """eps-model evaluations of one gradient (forward + recomputation + VJP count 1 each).

        Exact gradients with remat run each step's network forward twice and its VJP once;
        BPDA needs no network gradient; the surrogate runs its own shorter chain.
        """
        if self.gradient == "bpda":
            return 0
        steps = (self.nfe if self.gradient == "exact"
                 else self.surrogate_steps * len(self.stages))
        return steps * (3 if self.remat else 2)

    def manifest(self) -> dict:
        """What an evaluation records about this purifier (with the VP-SDE's betas for the
        ``"sde"`` / ``"ode"`` samplers)."""
        sde = {} if self.sde is None else {"sde": {"beta_min": self.sde.beta_min,
                                                     "beta_max": self.sde.beta_max}}
        return {**sde, "sampler": self.sampler,
                "stages": [[float(t), int(s)] for t, s in self.stages],
                "t_star": float(self.stages[0][0]) if len(self.stages) == 1 else None,
                "steps": int(self.nfe), "gradient": self.gradient,
                "surrogate_steps": self.surrogate_steps, "variance": self.variance,
                "eta": float(self.eta), "remat": self.remat,
                "schedule_steps": int(self.schedule.num_steps),
                "nfe_forward": int(self.nfe), "nfe_backward": int(self.nfe_backward),
                # only when set, so the manifests of purifiers without it are unchanged
                **({} if self.input_size is None else {"input_size": self.input_size})}

    # ------------------------------------------------------------------ the function
    def __call__(self, x: Images, key: AnyKey, forward_key: AnyKey | None = None) -> Images:
        """Purify ``x`` (float32 NHWC in [0, 1]) with randomness ``key``.

        Args:
          x: images.
          key: one key (the batch shares it: noise drawn for the whole batch at once) or a
            (B,) batch of keys, one per example (:func:`example_keys`).
          forward_key: None (the forward noise comes from ``key``) or the key(s) of the forward
            noise alone, one key or (B,) like ``key``: the reverse noise still comes from
            ``key``. Stage ``i`` of a multistage purifier folds ``i`` into both keys.

        Returns:
          Purified images in [0, 1], shaped like ``x`` (with ``input_size``, purified at
          ``input_size`` x ``input_size`` and resized back).
        """
        check_images(x, "x")
        _check_keys(key, x, "key")
        if forward_key is not None:
            _check_keys(forward_key, x, "forward_key")
            if _is_key_batch(key) != _is_key_batch(forward_key):
                raise ValueError("forward_key: expected one key when key is one key and one "
                                 "key per example when key is, got "
                                 f"{jnp.shape(forward_key)} with key {jnp.shape(key)}")
        if _is_key_batch(key):
            if forward_key is None:
                return jax.vmap(lambda xi, ki: self._purify(xi[None], ki)[0])(x, key)
            return jax.vmap(lambda xi, ki, fi: self._purify(xi[None], ki, fi)[0])(
                x, key, forward_key)
        return self._purify(x, key, forward_key)

    def _purify(self, x, key, forward_key=None):
        if self.gradient == "bpda":
            out = self._chain(jax.lax.stop_gradient(x), key, self.chains, forward_key)
            return x + jax.lax.stop_gradient(out - x)
        if self.gradient == "surrogate":
            full = self._chain(jax.lax.stop_gradient(x), key, self.chains, forward_key)
            surr = self._chain(x, key, self.surrogate_chains, forward_key, self.surrogate_steps)
            return surr + jax.lax.stop_gradient(full - surr)
        return self._chain(x, key, self.chains, forward_key)

    def _model_size(self, x):
        """``x`` at the diffusion model's size (``input_size``; unchanged without it)."""
        return x if self.input_size is None else resize_images(x, (self.input_size,) * 2)

    def _chain(self, x, key, chains, forward_key=None, steps_override=None):
        h = self._model_size(x)
        fkey = key if forward_key is None else forward_key
        for i, ((t_star, steps), chain) in enumerate(zip(self.stages, chains, strict=True)):
            k, kf = ((jr.fold_in(key, i), jr.fold_in(fkey, i)) if len(self.stages) > 1
                     else (key, fkey))
            h = self._stage(h, k, t_star, steps_override or steps, chain, forward_key=kf)
        return resize_images(h, x.shape[1:3])

    def _stage(self, x01, key, t_star, steps, chain, *, forward_key=None,
               trajectory: bool = False):
        x = jd.to_model_space(x01)
        k_fwd = jr.fold_in(key if forward_key is None else forward_key, tags.PURIFY_FORWARD)
        k_rev = jr.fold_in(key, tags.PURIFY_REVERSE)
        noise = jr.normal(k_fwd, x.shape, x.dtype)
        kw = dict(remat=self.remat and not trajectory, unroll=self.unroll,
                  return_trajectory=trajectory)
        if self.sampler in ("ddpm", "ddim"):
            x_t = jd.q_sample(x, chain.num_steps - 1, noise, chain)
            if self.sampler == "ddpm":
                out = jd.ddpm_sample(self.eps_fn, x_t, k_rev, chain, variance=self.variance,
                                     **kw)
            else:
                out = jd.ddim_sample(self.eps_fn, x_t, k_rev, chain, eta=self.eta, **kw)
        else:
            sde = self.sde
            x_t = sde.marginal_sample(x, jnp.asarray(t_star, x.dtype), noise)
            out = jd.vpsde_sample(self.eps_fn, x_t, k_rev, sde, t_start=t_star,
                                  num_steps=steps, method=self.sampler, **kw)
        if trajectory:
            to01 = lambda a: jd.from_model_space(a, clip=False)
            return to01(x_t), to01(out[1])
        return jd.from_model_space(out, clip=True)

    # ------------------------------------------------------------------ DiffAttack's hook
    @property
    def num_states(self) -> int:
        """States of the reverse chains that :meth:`reconstruction_deviation` scores: per stage,
        the forward-diffused input and the state after every reverse step."""
        return sum(steps + 1 for _, steps in self.stages)

    def reconstruction_deviation(self, x: Images, x_ref: Images,
                                 key: AnyKey) -> tuple[Images, Array]:
        """The purified ``x`` and, per state of the reverse chains, its deviation from the
        forward-diffused reference (DiffAttack's deviated-reconstruction distance).

        For every state ``s`` of every stage (the forward-diffused input, then the state after
        each reverse step, down to the output) at noise level ``(a_s, b_s)`` (``x_s ~ a_s x_0 +
        b_s noise``: ``sqrt(abar)``, ``sqrt(1 - abar)`` of the discrete chain, the VP-SDE's
        marginal mean coefficient and std for ``"sde"``/``"ode"``; the output has ``(1, 0)``),
        ``d_s = mean((x_s - (a_s x_ref + b_s xi))^2)`` over pixels in diffusion space
        ([-1, 1]), where ``xi`` is the stage's own forward noise (the reference is diffused
        with the noise the purification used). A stage after the first is scored against the
        same ``x_ref``.

        The chain is the exact-gradient one (this ignores ``gradient=``) with the purifier's
        ``remat``; the purified output equals ``purifier(x, key)`` up to float rounding.

        Args:
          x: images in [0, 1] (the attacked input).
          x_ref: the clean images the reconstruction is compared with, shaped like ``x``.
          key: one key or one per example, as :meth:`__call__`.

        Returns:
          ``(x_purified, dev)``: purified images, and (num_states, B) squared deviations in
          the order the states are computed (stage by stage, start state first).
        """
        return deviation_per_example(self._deviation, x, x_ref, key)

    def _deviation(self, x, x_ref, key):
        h, devs = self._model_size(x), []
        ref = jd.to_model_space(self._model_size(x_ref))
        for i, ((t_star, steps), chain) in enumerate(zip(self.stages, self.chains, strict=True)):
            k = jr.fold_in(key, i) if len(self.stages) > 1 else key
            h, d = self._stage_deviation(h, ref, k, t_star, steps, chain)
            devs.append(d)
        return resize_images(h, x.shape[1:3]), jnp.concatenate(devs, axis=0)

    def _stage_deviation(self, x01, ref, key, t_star, steps, chain):
        x = jd.to_model_space(x01)
        k_fwd, k_rev = jr.fold_in(key, tags.PURIFY_FORWARD), jr.fold_in(key, tags.PURIFY_REVERSE)
        noise = jr.normal(k_fwd, x.shape, x.dtype)
        kw = dict(remat=self.remat, unroll=self.unroll, return_trajectory=True)
        if self.sampler in ("ddpm", "ddim"):
            x_t = jd.q_sample(x, chain.num_steps - 1, noise, chain)
            if self.sampler == "ddpm":
                out, traj = jd.ddpm_sample(self.eps_fn, x_t, k_rev, chain,
                                           variance=self.variance, **kw)
            else:
                out, traj = jd.ddim_sample(self.eps_fn, x_t, k_rev, chain, eta=self.eta, **kw)
            # the start is at the chain's last position; reverse step n lands on position n - 1
            a2 = jnp.concatenate([chain.alphas_cumprod[-1:], chain.alphas_cumprod_prev[::-1]])
            b2 = jnp.concatenate([chain.one_minus_alphas_cumprod[-1:],
                                  chain.one_minus_alphas_cumprod_prev[::-1]])
            a, b = jnp.sqrt(a2), jnp.sqrt(b2)
        else:
            sde = self.sde
            x_t = sde.marginal_sample(x, jnp.asarray(t_star, x.dtype), noise)
            out, traj = jd.vpsde_sample(self.eps_fn, x_t, k_rev, sde, t_start=t_star,
                                        num_steps=steps, method=self.sampler, **kw)
            ts = t_star - jnp.arange(steps + 1, dtype=x.dtype) * (t_star / steps)
            a, b = sde.marginal_mean_coeff(ts), sde.marginal_std(ts)
            a, b = a.at[-1].set(1.0), b.at[-1].set(0.0)  # the output: the clean reference
        states = jnp.concatenate([x_t[None], traj], axis=0)
        return jd.from_model_space(out, clip=True), _deviations(states, ref, noise, a, b)

    def trajectory(self, x: Images, key: Key, forward_key: Key | None = None
                   ) -> tuple[Array, Array]:
        """The states of a single-stage purification, for distance-to-clean studies.

        Args:
          x: images in [0, 1].
          key: one key (as :meth:`__call__` with a single key).
          forward_key: the forward noise's key (as :meth:`__call__`; None: ``key``).

        Returns:
          ``(x_t, states)``: the forward-diffused input and the (steps, B, H, W, C) reverse
          states (the last one is the purified output before clipping), all mapped to [0, 1]
          space without clipping (``(x + 1) / 2``); with ``input_size``, at that size.
        """
        if len(self.stages) != 1:
            raise ValueError("trajectory: expected a single-stage purifier")
        check_images(x, "x")
        (t_star, steps), = self.stages
        return self._stage(self._model_size(x), key, t_star, steps, self.chains[0],
                           forward_key=forward_key, trajectory=True)


def _deviations(states, ref, noise, a, b):
    """(S, B) ``mean((states_s - (a_s ref + b_s noise))^2)`` over each example's pixels."""
    col = lambda v: v.reshape((-1,) + (1,) * ref.ndim)
    target = col(a) * ref[None] + col(b) * noise[None]
    return jnp.mean(jnp.square(states - target), axis=tuple(range(2, states.ndim)))


def _model_and_schedule(model, schedule):
    if schedule is None:
        schedule = getattr(model, "schedule", None)
        if schedule is None:
            raise TypeError("schedule: expected a jaxrob.diffusion.Schedule (or a model with a "
                            ".schedule, e.g. jaxrob.models.load of a DDPM export), got None")
    return model, schedule


def diffpure(model: jd.EpsFn, schedule: jd.Schedule | None = None, *, t_star: float,
             num_steps: int | None = None, sampler: str = "ddpm", gradient: str = "exact",
             surrogate_steps: int | None = None, variance: str = "fixed_small",
             eta: float = 0.0, remat: bool = True, unroll: int = 1,
             input_size: int | None = None) -> Purifier:
    """A DiffPure-style purifier: diffuse to ``t_star`` in closed form, reverse in ``num_steps``.

    Args:
      model: the trained diffusion model, ``model(x_t, model_step) -> eps``: a
        :class:`jaxrob.models.DiffusionModel` (``jaxrob.models.load``; carries its schedule) or
        any ``eps_fn``.
      schedule: the model's training schedule (None: ``model.schedule``).
      t_star: fraction of the forward process in (0, 1] (DiffPure's t=100 of 1000 is 0.1).
      num_steps: reverse steps (respaced evenly over the first ``t_star`` of the chain; None:
        every step of the chain, i.e. ``round(t_star * N)``). For ``"sde"``/``"ode"`` the number
        of Euler steps from ``t_star`` to 0.
      sampler: ``"ddpm"``, ``"ddim"``, ``"sde"`` or ``"ode"``.
      gradient: ``"exact"`` (default), ``"bpda"`` or ``"surrogate"``.
      surrogate_steps: reverse steps of the surrogate chain (``gradient="surrogate"``).
      variance: DDPM ``"fixed_small"`` (posterior) or ``"fixed_large"`` (beta) variance.
      eta: DDIM eta.
      remat: checkpoint every step (bounded memory for exact gradients).
      unroll: ``lax.scan`` unroll factor.
      input_size: None, or the side the model runs at: inputs of another size are resized to
        it before the chain and back after it (DiffPure on ImageNet: 224 -> 256 -> 224,
        bilinear as PyTorch's ``align_corners=False``; see :class:`Purifier`).

    Returns:
      A :class:`Purifier`.

    Example::

      ddpm = jaxrob.models.load("checkpoints/mnist_ddpm", fast_vjp=True)
      purify = jaxrob.purify.diffpure(ddpm, t_star=0.1, num_steps=10)
      x_pur = purify(x, jax.random.key(0))
    """
    model, schedule = _model_and_schedule(model, schedule)
    t_star = check_t_star(t_star)
    if num_steps is None:
        num_steps = schedule.step_for_t_star(t_star) + 1
    return Purifier.create(model, schedule, ((t_star, num_steps),), sampler=sampler,
                           gradient=gradient, surrogate_steps=surrogate_steps,
                           variance=variance, eta=eta, remat=remat, unroll=unroll,
                           input_size=input_size)


def multistage(model: jd.EpsFn, schedule: jd.Schedule | None = None,
               stages: Sequence[tuple[float, int]] = (), **kwargs) -> Purifier:
    """Sequential purification stages ``[(t_star, num_steps), ...]`` (Lee & Kim's gradual
    noise schedule, e.g. ``[(0.03, 3)] * 4 + [(0.05, 5)] * 2 + [(0.125, 12)] * 2``).

    Stage ``i`` uses ``fold_in(key, i)``. Other arguments as :func:`diffpure`.
    """
    model, schedule = _model_and_schedule(model, schedule)
    return Purifier.create(model, schedule, stages, **kwargs)


@pytree_dataclass
class DefendedModel:
    """A classifier behind a purifier: ``defended(x, key) -> classifier(purifier(x, key))``.

    The thing an attack attacks (``logits_fn(x, key) -> logits``). A pytree: both models'
    parameters are leaves, so an attack jitted over it compiles once per architecture and
    configuration. ``purifier=None`` is the undefended classifier.

    Attributes:
      classifier: ``classifier(x, key) -> logits`` (a :class:`jaxrob.models.Classifier` ignores
        the key; a randomised one gets ``fold_in(key, CLASSIFIER)``).
      purifier: ``purifier(x, key) -> x_purified`` (a :class:`Purifier`, which also takes
        ``forward_key=``), or None.
    """

    classifier: Callable
    purifier: PurifyFn | None = None

    @property
    def splits_randomness(self) -> bool:
        """Whether :meth:`__call__` takes ``forward_key=`` (randomness="forward_lock"): the
        purifier splits its forward and reverse noise (a :class:`Purifier`), or there is none."""
        return self.purifier is None or bool(getattr(self.purifier, "splits_randomness", False))

    def __call__(self, x: Images, key: AnyKey, forward_key: AnyKey | None = None) -> Array:
        """Logits of the purified ``x``; ``forward_key`` (optional) keys the purifier's forward
        noise alone (:meth:`Purifier.__call__`); the classifier's key comes from ``key``."""
        if forward_key is not None and not self.splits_randomness:
            raise ValueError(
                f"forward_key: expected a purifier whose forward and reverse noise come from "
                f"separate keys (a jaxrob.purify.Purifier), got "
                f"{type(self.purifier).__name__}, which draws all its randomness from one key")
        if self.purifier is not None:
            x = (self.purifier(x, key) if forward_key is None
                 else self.purifier(x, key, forward_key=forward_key))
        return self.classifier(x, fold(key, CLASSIFIER))

    def manifest(self) -> dict:
        """What an evaluation records about this defence."""
        return {"purifier": (self.purifier.manifest() if hasattr(self.purifier, "manifest")
                             else None if self.purifier is None else repr(self.purifier)),
                "classifier": type(getattr(self.classifier, "module", self.classifier)).__name__}


@pytree_dataclass
class FixedRandomness:
    """A randomised model with its randomness fixed: ``fixed(x, key) = model(x, keys)``.

    The deterministic white-box ("DW-box") defence: the attacker knows and reuses the
    purifier's noise. ``keys`` is one key or one per example (e.g.
    ``jaxrob.evaluation.fixed_purifier_keys``, the keys ``randomness="fixed"`` evaluations
    use); the key an attack passes is ignored.
    """

    model: Callable
    keys: AnyKey

    def __call__(self, x: Images, key: AnyKey | None = None) -> Array:
        del key
        return self.model(x, self.keys)


def purified_logits(logits_fn: Callable, purify: PurifyFn | None) -> DefendedModel:
    """The defended model ``(x, key) -> logits_fn(purify(x, key), key')`` (:class:`DefendedModel`).

    Args:
      logits_fn: the classifier, ``logits_fn(x, key) -> logits``.
      purify: the purifier, or None for the undefended classifier.
    """
    if not callable(logits_fn):
        raise TypeError(f"logits_fn: expected a callable logits_fn(x, key), got "
                        f"{type(logits_fn).__name__}")
    return DefendedModel(logits_fn, purify)


def majority_vote(defended: Callable, x: Images, key: AnyKey, *, num_votes: int,
                  chunk: int | None = None) -> Array:
    """Vote counts of ``num_votes`` independent purifications (Lee & Kim's ensemble defence).

    ``defended(x, key) -> logits`` is the purified classifier (:class:`DefendedModel`).

    Purification ``v`` uses ``fold_in(key, v)`` (per-example keys are folded alike), computed as
    a ``vmap`` over votes in chunks of ``chunk`` (default: all at once).

    Returns:
      (B, K) int32 counts; the defence predicts ``argmax`` (ties: the lowest class).
    """
    num_votes = check_positive_int(num_votes, "num_votes")
    chunk = num_votes if chunk is None else check_positive_int(chunk, "chunk")
    if num_votes % chunk:
        raise ValueError(f"chunk: expected a divisor of num_votes={num_votes}, got {chunk}")

    def one(v):
        k = (jax.vmap(lambda kk: jr.fold_in(kk, v))(key) if _is_key_batch(key)
             else jr.fold_in(key, v))
        logits = defended(x, k)
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.int32)

    votes = jax.lax.map(one, jnp.arange(num_votes), batch_size=chunk)
    return votes.sum(axis=0)
