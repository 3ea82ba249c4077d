"""DiffPure-style purification: forward-diffuse to ``t_star``, run the reverse process back.

A purifier is a pure function ``purify(x, key) -> x_purified`` of [0, 1] NHWC images. All of its
randomness comes from ``key``: the forward noise from ``fold_in(key, 0)`` and the noise of reverse
step ``n`` from ``fold_in(fold_in(key, 1), n)``. Hence

* fixed randomness (the "DW-box" setting) is the same key for attack and evaluation;
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

import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int, check_t_star
from jaxrob._types import Images, Key

SAMPLERS = ("ddpm", "ddim", "sde", "ode")
GRADIENTS = ("exact", "bpda", "surrogate")

PurifyFn = Callable[[Images, Key], Images]


def example_keys(key: Key, indices) -> Key:
    """Per-example keys ``fold_in(key, index)`` for global example indices (shape (B,))."""
    return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def _is_key_batch(key) -> bool:
    return jnp.ndim(key) == 1


@dataclasses.dataclass(frozen=True, eq=False)
class Purifier:
    """A DiffPure-style purifier; call it as ``purifier(x, key)``.

    Build it with :func:`diffpure` (one stage) or :func:`multistage`. The object is immutable
    and hashes by identity, so it can be closed over by jitted functions and used as a static
    argument: two purifiers over different models never share a compiled function.

    Attributes:
      stages: ``((t_star, num_steps), ...)`` applied in order.
      sampler: ``"ddpm"``, ``"ddim"``, ``"sde"`` (VP-SDE Euler-Maruyama) or ``"ode"``
        (probability-flow ODE, Euler).
      gradient: ``"exact"``, ``"bpda"`` or ``"surrogate"``.
      surrogate_steps: reverse steps per stage of the surrogate chain (``"surrogate"`` only).
      variance: DDPM variance, ``"fixed_small"`` or ``"fixed_large"``.
      eta: DDIM eta (0: deterministic reverse process).
      remat: ``jax.checkpoint`` each step (bounded memory under reverse-mode).
      unroll: ``lax.scan`` unroll factor.
    """

    eps_fn: jd.EpsFn = dataclasses.field(repr=False)
    schedule: jd.Schedule = dataclasses.field(repr=False)
    stages: tuple[tuple[float, int], ...]
    sampler: str = "ddpm"
    gradient: str = "exact"
    surrogate_steps: int | None = None
    variance: str = "fixed_small"
    eta: float = 0.0
    remat: bool = True
    unroll: int = 1

    def __post_init__(self):
        check_choice(self.sampler, SAMPLERS, "sampler")
        check_choice(self.gradient, GRADIENTS, "gradient")
        check_choice(self.variance, jd.VARIANCES, "variance")
        if self.eta < 0:
            raise ValueError(f"eta: expected >= 0, got {self.eta}")
        if not self.stages:
            raise ValueError("stages: expected at least one (t_star, num_steps) stage")
        for t_star, steps in self.stages:
            check_t_star(t_star)
            check_positive_int(steps, "num_steps")
            if self.sampler in ("ddpm", "ddim"):
                jd.truncated(self.schedule, t_star, steps)  # raises on too many steps
        if self.gradient == "surrogate":
            check_positive_int(self.surrogate_steps, "surrogate_steps")
        elif self.surrogate_steps is not None:
            raise ValueError("surrogate_steps: only used with gradient='surrogate', got "
                             f"gradient={self.gradient!r}")

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
        """What an evaluation records about this purifier."""
        return {"sampler": self.sampler, "stages": [[float(t), int(s)] for t, s in self.stages],
                "t_star": float(self.stages[0][0]) if len(self.stages) == 1 else None,
                "steps": int(self.nfe), "gradient": self.gradient,
                "surrogate_steps": self.surrogate_steps, "variance": self.variance,
                "eta": float(self.eta), "remat": self.remat,
                "schedule_steps": int(self.schedule.num_steps),
                "nfe_forward": int(self.nfe), "nfe_backward": int(self.nfe_backward)}

    def replace(self, **changes) -> Purifier:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the function
    def __call__(self, x: Images, key: Key) -> Images:
        """Purify ``x`` (float32 NHWC in [0, 1]) with randomness ``key``.

        Args:
          x: images.
          key: one key (the batch shares it: noise drawn for the whole batch at once) or a
            (B,) batch of keys, one per example (:func:`example_keys`).

        Returns:
          Purified images in [0, 1], shaped like ``x``.
        """
        check_images(x, "x")
        if _is_key_batch(key):
            if key.shape[0] != x.shape[0]:
                raise ValueError(f"key: expected one key or {x.shape[0]} keys (one per "
                                 f"example), got {key.shape[0]} keys")
            return jax.vmap(lambda xi, ki: self._purify(xi[None], ki)[0])(x, key)
        return self._purify(x, key)

    def _purify(self, x, key):
        if self.gradient == "bpda":
            out = self._chain(jax.lax.stop_gradient(x), key, None)
            return x + jax.lax.stop_gradient(out - x)
        if self.gradient == "surrogate":
            full = self._chain(jax.lax.stop_gradient(x), key, None)
            surr = self._chain(x, key, self.surrogate_steps)
            return surr + jax.lax.stop_gradient(full - surr)
        return self._chain(x, key, None)

    def _chain(self, x, key, steps_override):
        h = x
        for i, (t_star, steps) in enumerate(self.stages):
            k = jr.fold_in(key, i) if len(self.stages) > 1 else key
            h = self._stage(h, k, t_star, steps_override or steps)
        return h

    def _stage(self, x01, key, t_star, steps, *, trajectory: bool = False):
        x = jd.to_model_space(x01)
        k_fwd, k_rev = jr.fold_in(key, 0), jr.fold_in(key, 1)
        noise = jr.normal(k_fwd, x.shape, x.dtype)
        kw = dict(remat=self.remat and not trajectory, unroll=self.unroll,
                  return_trajectory=trajectory)
        if self.sampler in ("ddpm", "ddim"):
            chain = jd.truncated(self.schedule, t_star, steps)
            x_t = jd.q_sample(x, chain.num_steps - 1, noise, chain)
            if self.sampler == "ddpm":
                out = jd.ddpm_sample(self.eps_fn, x_t, k_rev, chain, variance=self.variance,
                                     **kw)
            else:
                out = jd.ddim_sample(self.eps_fn, x_t, k_rev, chain, eta=self.eta, **kw)
        else:
            sde = jd.VPSDE(num_train_steps=self.schedule.num_train_steps)
            x_t = sde.marginal_sample(x, jnp.asarray(t_star, x.dtype), noise)
            out = jd.vpsde_sample(self.eps_fn, x_t, k_rev, sde, t_start=t_star,
                                  num_steps=steps, method=self.sampler, **kw)
        if trajectory:
            to01 = lambda a: jd.from_model_space(a, clip=False)
            return to01(x_t), to01(out[1])
        return jd.from_model_space(out, clip=True)

    def trajectory(self, x: Images, key: Key) -> tuple[Images, Images]:
        """The states of a single-stage purification, for distance-to-clean studies.

        Args:
          x: images in [0, 1].
          key: one key (as :meth:`__call__` with a single key).

        Returns:
          ``(x_t, states)``: the forward-diffused input and the (steps, B, H, W, C) reverse
          states (the last one is the purified output before clipping), all mapped to [0, 1]
          space without clipping (``(x + 1) / 2``).
        """
        if len(self.stages) != 1:
            raise ValueError("trajectory: expected a single-stage purifier")
        check_images(x, "x")
        (t_star, steps), = self.stages
        return self._stage(x, key, t_star, steps, trajectory=True)


def diffpure(eps_fn: jd.EpsFn, schedule: jd.Schedule, *, t_star: float,
             num_steps: int | None = None, sampler: str = "ddpm", gradient: str = "exact",
             surrogate_steps: int | None = None, variance: str = "fixed_small",
             eta: float = 0.0, remat: bool = True, unroll: int = 1) -> Purifier:
    """A DiffPure-style purifier: diffuse to ``t_star`` in closed form, reverse in ``num_steps``.

    Args:
      eps_fn: ``eps_fn(x_t, model_step) -> eps`` of the trained diffusion model.
      schedule: the model's training schedule (e.g. ``linear_schedule(1000)``).
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

    Returns:
      A :class:`Purifier`.
    """
    t_star = check_t_star(t_star)
    if num_steps is None:
        num_steps = schedule.step_for_t_star(t_star) + 1
    return Purifier(eps_fn, schedule, ((t_star, int(num_steps)),), sampler=sampler,
                    gradient=gradient, surrogate_steps=surrogate_steps, variance=variance,
                    eta=eta, remat=remat, unroll=unroll)


def multistage(eps_fn: jd.EpsFn, schedule: jd.Schedule,
               stages: Sequence[tuple[float, int]], **kwargs) -> Purifier:
    """Sequential purification stages ``[(t_star, num_steps), ...]`` (Lee & Kim's gradual
    noise schedule, e.g. ``[(0.03, 3)] * 4 + [(0.05, 5)] * 2 + [(0.125, 12)] * 2``).

    Stage ``i`` uses ``fold_in(key, i)``. Other keyword arguments as :func:`diffpure`.
    """
    stages = tuple((check_t_star(t), check_positive_int(s, "num_steps")) for t, s in stages)
    return Purifier(eps_fn, schedule, stages, **kwargs)


def purified_logits(logits_fn: Callable[[Images], jax.Array], purify: PurifyFn
                    ) -> Callable[[Images, Key], jax.Array]:
    """The defended model ``(x, key) -> logits_fn(purify(x, key))``."""
    return lambda x, key: logits_fn(purify(x, key))


def majority_vote(logits_fn: Callable[[Images], jax.Array], purify: PurifyFn, x: Images,
                  key: Key, *, num_votes: int, chunk: int | None = None) -> jax.Array:
    """Vote counts of ``num_votes`` independent purifications (Lee & Kim's ensemble defence).

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
        logits = logits_fn(purify(x, k))
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.int32)

    votes = jax.lax.map(one, jnp.arange(num_votes), batch_size=chunk)
    return votes.sum(axis=0)
