"""DiffDefense: reconstruct the input as the output of a diffusion model's reverse process.

For an input ``x`` (possibly adversarial) the defence searches the reverse process's initial noise
``z_T`` whose sample best reproduces ``x``:

    z* = argmin_z || D(z) - x ||^2,    x_defended = D(z*),

where ``D`` is a short respaced reverse process (15 DDIM steps over the model's whole chain by
default) mapped to [0, 1]. The search is ``restarts`` independent runs of ``iterations`` Adam
steps from ``z_T ~ N(0, I)``; per example the restart whose reconstruction has the lowest error
is kept. The reconstruction error itself is the DiffDefense attack-detection score
(:func:`jaxrob.evaluation.roc_curve`, :func:`jaxrob.evaluation.detection_rate`).

Like a :class:`jaxrob.purify.Purifier`, a :class:`DiffDefense` is a pytree and a pure function
``defence(x, key) -> x_reconstructed`` (so ``DefendedModel(classifier, defence)`` is what an attack
attacks), and all of its randomness comes from ``key``:

* restart ``r`` starts from ``z_T = normal(fold_in(fold_in(key, RECON_INIT), r))``: the first
  ``R`` restarts are the same whatever the number of restarts, so more restarts never give a
  larger error;
* with ``eta > 0`` the reverse pass of iteration ``l`` of restart ``r`` draws its step noise from
  ``fold_in(fold_in(fold_in(key, RECON_REVERSE), r), l)`` (fresh noise at every iteration, as the
  reference does); ``eta = 0`` (default) is deterministic DDIM, so ``D`` is a fixed function;
* a (B,) batch of keys gives every example its own randomness (results independent of batch
  size, chunking and devices); one key shares it across the batch.

Restarts (``vmap``) and examples are batched; the optimisation is a ``lax.scan``, the reverse
process a ``lax.scan``, so the whole defence jits. Memory: when an attack differentiates the
defence (``remat=True``), ``jax.checkpoint`` on every reverse step and every optimiser iteration
bounds it; in the defence's own (undifferentiated) call the optimiser's gradient checkpoints the
reverse steps too by default (``inner_remat=None``: as ``remat``; memory does not grow with
``num_steps``).
``inner_remat=False`` keeps the reverse pass's activations there instead (one network forward
fewer per VJP, ~15% less time with exact gradients, memory ~ ``num_steps`` x batch: with the
MNIST DDPM UNet, 15 steps, 5 restarts, ``z_gradient="exact"`` on XLA:CPU 4.1 GiB of temporaries
at batch 16 and 8.3 GiB at 32, against 0.6 and 1.2 GiB; an attack's gradient through the defence
takes 5.8 GiB at batch 16 either way); both compute the same function and a ``jax.custom_jvp``
picks the bounded one under differentiation. Two gradients are
involved, each a named option:

* ``z_gradient``: the gradient the optimiser follows. ``"exact"`` (default) differentiates the
  whole reverse process, eps-network included; ``"reference"`` is the DiffDefense code's: the
  network runs under ``no_grad``, so only the affine DDIM update coefficients are differentiated
  (``stop_gradient`` on the network output; ANCHORS.md section 6).
* ``gradient``: what an attack differentiating the defence gets. ``"exact"`` (default)
  differentiates through the unrolled optimisation (the inner gradients included, second order);
  ``"bpda"`` is the identity backward (Athalye et al.). The exact gradient is small by
  construction: with ``iterations=0`` the output depends on ``x`` only through the (discrete)
  choice of restart, so it is 0; Adam's first step is about ``-lr sign(g)``, whose derivative in
  ``x`` nearly vanishes, and only later steps (through Adam's moments) pass more of it. The same
  normalisation makes it rough: ``d/dg [g / (|g| + eps)] = eps / (|g| + eps)^2`` is ~0 where the
  inner gradient ``|g| >> eps`` and ~1/eps where ``g`` nearly vanishes, so with Adam's default
  ``eps = 1e-8`` the exact gradient is dominated by a few near-singular coordinates and need not
  agree with a finite difference over any practical step (shattered gradients, Athalye et al.);
  a larger ``adam_eps`` smooths it.

Differences from the reference code (HondamunigePrasannaSilva/DiffDefence), all deliberate:

* its reverse process runs a 15-step linear schedule (beta 1e-4..0.02 over 15 steps) on a network
  trained with 100 steps; here the 15 steps respace the model's own training schedule;
* its update is a stochastic DDIM step with the DDPM posterior variance (``eta=1`` here) and its
  output is ``sigmoid(x_0)`` of a network trained on [0, 1] data (``output="sigmoid"`` here);
  jaxrob's models live in [-1, 1] and ``output="clip"`` maps back with ``clip((x_0 + 1) / 2)``;
* it returns the image of its last evaluation, taken *before* the last Adam step (its ``L``
  iterations evaluate ``z_0 .. z_{L-1}``); here the reconstruction is ``D(z_L)``, after all ``L``
  steps, so ``iterations=0`` is the best of the random initialisations;
* its learning-rate "decay" re-sets the rate from an initial value of 25 (not 0.02) after the first
  step: step ``k`` has rate 0.02 for ``k = 0`` and ``25 * 0.1 ** (k / ceil(0.8 L))`` after, i.e.
  0.02, 14.1, 7.9, 4.4 for ``L = 4``. It is a named option here
  (``learning_rate="reference"``, :func:`reference_learning_rate`); the default is a constant
  0.02 (the rate the paper states). Neither reconstructs well with jaxrob's MNIST DDPM (15
  respaced DDIM steps, ``output="clip"``): on MNIST ``test[:16]`` (R = 5, L = 4) the classifier
  is right on 50% of the 0.02 reconstructions (mean error 0.059) and on 0% of the "reference"
  ones (0.342: steps of 14 in ``z_T`` leave the model's input distribution; the reference's
  ``sigmoid`` output on a [0, 1]-trained model saturates instead) -- measured, not tuned;
* its loss is the MSE averaged over all restarts (the gradient of each restart is scaled by
  ``1 / R``, which Adam all but ignores); here each restart minimises its own per-example MSE.

References:
  Silva, Seidenari, Del Bimbo. DiffDefense: Defending against Adversarial Attacks via Diffusion
  Models. ICIAP 2023 (arXiv 2309.03702).
  Samangouei, Kabkab, Chellappa. Defense-GAN. ICLR 2018.
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of Security. ICML 2018.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.custom_derivatives import SymbolicZero

import jaxrob._keys as tags
import jaxrob.diffusion as jd
from jaxrob._checks import check_choice, check_images, check_positive_int
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Images, Key, Latents, PerExample, PerExampleInt
from jaxrob.purify._diffpure import check_options

Z_GRADIENTS = ("exact", "reference")
DD_GRADIENTS = ("exact", "bpda")
OUTPUTS = ("clip", "sigmoid")

_OPTIONS = ("num_steps", "restarts", "iterations", "learning_rate", "betas", "adam_eps", "eta",
            "output", "z_gradient", "gradient", "remat", "inner_remat", "unroll")


@pytree_dataclass
class Reconstruction:
    """What :meth:`DiffDefense.reconstruct` returns, per example.

    Attributes:
      x: the kept reconstruction, (B, H, W, C) in [0, 1].
      error: its mean squared error to the input over pixels, (B,) (the detection score).
      z: the optimised initial noise ``z_T`` of the kept restart (diffusion space).
      restart: index of the kept restart, int32 (B,).
    """

    x: Images
    error: PerExample
    z: Latents
    restart: PerExampleInt


def reference_learning_rate(iterations: int) -> Callable:
    """The DiffDefense code's rate for Adam step ``k`` of ``iterations`` (an optax schedule).

    The optimiser starts at 0.02; after each step the code re-sets the rate to
    ``25 * 0.1 ** (k / ceil(0.8 * iterations))`` (its ``schedulerLR`` with ``cur_lr = 25``), so
    step ``k`` runs at 0.02 for ``k = 0`` and that value after: 0.02, 14.1, 7.9, 4.4 for 4 steps.
    """
    period = int(np.ceil(0.8 * max(int(iterations), 1)))

    def schedule(count):
        return jnp.where(count == 0, 0.02, 25.0 * 0.1 ** (count / period))

    return schedule


def _check_count(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@pytree_dataclass
class DiffDefense:
    """The DiffDefense reconstruction defence; call it as ``defence(x, key)``.

    Build it with :func:`diffdefense`. A pytree: the eps-model, its schedule and the respaced
    reverse chain (derived) are leaves, the options static, so a defence over new parameters of
    the same shapes (``defence.replace(eps_fn=other_model)``) reuses every compilation.

    Attributes:
      eps_fn: ``eps_fn(x_t, model_step) -> eps``.
      schedule: the model's training schedule.
      chain: the respaced reverse chain ``D`` runs (derived: ``respace(schedule, num_steps)``).
      num_steps: reverse steps of ``D``.
      restarts: random initialisations per example (R).
      iterations: Adam steps per restart (L; 0 keeps the best initialisation).
      learning_rate: Adam's rate: ``"reference"`` (the reference code's step decay,
        :func:`reference_learning_rate`), a float, or an optax schedule of the step count.
      betas: Adam's ``(b1, b2)``.
      adam_eps: Adam's ``eps`` (the denominator's ``sqrt(v) + eps``; 1e-8 as in the reference).
      eta: DDIM eta of ``D`` (0: deterministic; 1: the reference's stochastic update).
      output: ``"clip"`` (``clip((x_0 + 1) / 2)``) or ``"sigmoid"`` (the reference's squashing).
      z_gradient: ``"exact"`` or ``"reference"`` (the gradient the optimiser follows).
      gradient: ``"exact"`` or ``"bpda"`` (the gradient an attack gets).
      remat: when the defence is differentiated (an attack's gradient), ``jax.checkpoint`` each
        reverse step and each optimiser iteration (memory bounded in both).
      inner_remat: ``jax.checkpoint`` the reverse steps of the optimiser's own gradient also in
        the undifferentiated call (None, the default: as ``remat``; memory ~ batch instead of
        ``num_steps`` x batch there, at one more network forward per VJP; ``False`` is ~15%
        faster).
      unroll: ``lax.scan`` unroll factor of the reverse process.
    """

    eps_fn: jd.EpsFn
    schedule: jd.Schedule
    chain: jd.Schedule
    num_steps: int = static_field(default=15)
    restarts: int = static_field(default=5)
    iterations: int = static_field(default=4)
    learning_rate: float | str | Callable = static_field(default=0.02)
    betas: tuple[float, float] = static_field(default=(0.5, 0.999))
    adam_eps: float = static_field(default=1e-8)
    eta: float = static_field(default=0.0)
    output: str = static_field(default="clip")
    z_gradient: str = static_field(default="exact")
    gradient: str = static_field(default="exact")
    remat: bool = static_field(default=True)
    inner_remat: bool | None = static_field(default=None)
    unroll: int = static_field(default=1)

    @classmethod
    def create(cls, eps_fn: jd.EpsFn, schedule: jd.Schedule, **options) -> DiffDefense:
        """Validate the options and derive the reverse chain (host-side, once)."""
        opts = check_options("DiffDefense", eps_fn, schedule, options, dict(
            num_steps=15, restarts=5, iterations=4, learning_rate=0.02, betas=(0.5, 0.999),
            adam_eps=1e-8, eta=0.0, output="clip", z_gradient="exact", gradient="exact",
            remat=True, inner_remat=None, unroll=1))
        num_steps = check_positive_int(opts["num_steps"], "num_steps")
        if num_steps > schedule.num_steps:
            raise ValueError(f"num_steps: expected 1..{schedule.num_steps} (the model's "
                             f"schedule has {schedule.num_steps} steps), got {num_steps}")
        opts["restarts"] = _check_count(opts["restarts"], "restarts", minimum=1)
        opts["iterations"] = _check_count(opts["iterations"], "iterations", minimum=0)
        lr = opts["learning_rate"]
        if not callable(lr) and lr != "reference":
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
                raise ValueError(f"learning_rate: expected 'reference', a positive number or "
                                 f"an optax schedule, got {lr!r}")
            opts["learning_rate"] = float(lr)
        try:
            b1, b2 = (float(b) for b in opts["betas"])
        except (TypeError, ValueError):
            raise ValueError(f"betas: expected Adam's (b1, b2), got {opts['betas']!r}") from None
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas: expected 0 <= b1, b2 < 1, got {opts['betas']!r}")
        opts["betas"] = (b1, b2)
        ae = opts["adam_eps"]
        if isinstance(ae, bool) or not isinstance(ae, int | float) or not ae > 0:
            raise ValueError(f"adam_eps: expected a positive number, got {ae!r}")
        opts["adam_eps"] = float(ae)
        opts["eta"] = float(opts["eta"])
        if not opts["eta"] >= 0:
            raise ValueError(f"eta: expected >= 0, got {opts['eta']}")
        check_choice(opts["output"], OUTPUTS, "output")
        check_choice(opts["z_gradient"], Z_GRADIENTS, "z_gradient")
        check_choice(opts["gradient"], DD_GRADIENTS, "gradient")
        opts["unroll"] = check_positive_int(opts["unroll"], "unroll")
        opts["remat"] = bool(opts["remat"])
        if opts["inner_remat"] is not None:  # None: follow remat
            opts["inner_remat"] = bool(opts["inner_remat"])
        chain = jd.respace(schedule, num_steps)
        return cls(eps_fn, schedule, chain, **opts)

    def replace(self, **changes) -> DiffDefense:
        """A copy with other fields. Changing an option re-derives the chain; changing only
        ``eps_fn`` (e.g. other parameters of the same shapes) keeps it."""
        if set(changes) <= {"eps_fn"}:
            return dataclasses.replace(self, **changes)
        if "chain" in changes:
            raise ValueError("chain is derived; change num_steps or schedule instead")
        fields = {f: getattr(self, f) for f in ("eps_fn", "schedule", *_OPTIONS)}
        fields.update(changes)
        return DiffDefense.create(fields.pop("eps_fn"), fields.pop("schedule"), **fields)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def _inner_remat(self) -> bool:
        """Whether the undifferentiated call's optimiser gradient checkpoints the reverse steps
        (``inner_remat``; None follows ``remat``)."""
        return self.remat if self.inner_remat is None else self.inner_remat

    @property
    def nfe(self) -> int:
        """Network forward evaluations of one defence of one image: ``R (L + 1) num_steps``
        (every iteration's pass, then the final one; remat recomputation not counted)."""
        return self.restarts * (self.iterations + 1) * self.num_steps

    @property
    def nfe_vjp(self) -> int:
        """Network VJPs of one defence of one image (the optimiser's gradients; 0 for
        ``z_gradient="reference"``, which does not differentiate the network)."""
        if self.z_gradient == "reference":
            return 0
        return self.restarts * self.iterations * self.num_steps

    def manifest(self) -> dict:
        """What an evaluation records about this defence."""
        lr = self.learning_rate
        return {"defence": "diffdefense", "sampler": "ddim", "steps": int(self.num_steps),
                "restarts": int(self.restarts), "iterations": int(self.iterations),
                "learning_rate": lr if isinstance(lr, float | str) else repr(lr),
                "betas": list(self.betas), "adam_eps": float(self.adam_eps),
                "eta": float(self.eta), "output": self.output,
                "z_gradient": self.z_gradient, "gradient": self.gradient,
                "remat": self.remat, "inner_remat": self._inner_remat,
                "schedule_steps": int(self.schedule.num_steps),
                "nfe_forward": int(self.nfe), "nfe_vjp": int(self.nfe_vjp)}

    # ------------------------------------------------------------------ the pieces
    def decode(self, z: Latents, key: Key, *, clip: bool = True) -> Images:
        """``D(z)``: the reverse process from ``z_T = z`` over :attr:`chain`, mapped to [0, 1].

        Args:
          z: initial noise, (B, H, W, C) in diffusion space.
          key: the step noise (``eta > 0``; ``fold_in(key, n)`` at step ``n``).
          clip: clip to [0, 1] (``output="clip"``; ``False`` gives ``(x_0 + 1) / 2``, the
            smooth map the optimiser's objective uses). Ignored for ``output="sigmoid"``.

        Returns:
          The decoded images, shaped like ``z``. Exactly differentiable in ``z``.
        """
        return self._decode(z, key, clip=clip, stop_eps=False, remat=self.remat)

    def _decode(self, z, key, *, clip, stop_eps, remat):
        eps_fn = self.eps_fn
        if stop_eps:
            eps_fn = lambda x_t, step: jax.lax.stop_gradient(self.eps_fn(x_t, step))
        x0 = jd.ddim_sample(eps_fn, z, key, self.chain, eta=self.eta, remat=remat,
                            unroll=self.unroll)
        if self.output == "sigmoid":
            return jax.nn.sigmoid(x0)
        return jd.from_model_space(x0, clip=clip)

    def objective(self, z: Latents, x: Images, key: Key) -> PerExample:
        """The per-example objective ``mean((D(z) - x)^2)`` the optimiser minimises.

        Its gradient in ``z`` is the one the optimiser follows: with ``z_gradient="reference"``
        the network's output is a constant (``stop_gradient``), as in the reference code. The
        values of both are equal. ``D`` is unclipped here (``clip=False``), so saturated pixels
        keep a gradient. Its reverse steps are checkpointed (``remat``) as when an attack
        differentiates the defence.
        """
        return self._objective(z, x, key, remat=self.remat or self._inner_remat)

    def _objective(self, z, x, key, *, remat):
        out = self._decode(z, key, clip=False, stop_eps=self.z_gradient == "reference",
                           remat=remat)
        return jnp.mean(jnp.square(out - x), axis=(1, 2, 3))

    def _optimise(self, z, x, key, *, bounded):
        """``iterations`` Adam steps of one restart (z: (B, H, W, C)); returns ``z_L``.

        ``bounded``: the version an attack differentiates (checkpoints per ``remat``); else
        the undifferentiated call's (reverse steps checkpointed only with ``inner_remat``)."""
        b1, b2 = self.betas
        lr = self.learning_rate
        if isinstance(lr, str):  # "reference"
            lr = reference_learning_rate(self.iterations)
        opt = optax.adam(lr, b1=b1, b2=b2, eps=self.adam_eps)
        inner = self._inner_remat or (bounded and self.remat)
        grad_fn = jax.grad(lambda zz, k: jnp.sum(self._objective(zz, x, k, remat=inner)))

        def step(carry, it):
            zz, state = carry
            g = grad_fn(zz, jr.fold_in(key, it))
            updates, state = opt.update(g, state, zz)
            return (optax.apply_updates(zz, updates), state), None

        if self.iterations == 0:
            return z
        if bounded and self.remat:
            step = jax.checkpoint(step)
        (z, _), _ = jax.lax.scan(step, (z, opt.init(z)), jnp.arange(self.iterations))
        return z

    def _reconstruct(self, x, key, *, bounded):
        """One key shared by the batch ``x``: (x_rec, error, z, restart)."""
        k_init = jr.fold_in(key, tags.RECON_INIT)
        k_rev = jr.fold_in(key, tags.RECON_REVERSE)

        def restart(r):
            z = jr.normal(jr.fold_in(k_init, r), x.shape, x.dtype)
            k = jr.fold_in(k_rev, r)
            z = self._optimise(z, x, k, bounded=bounded)
            out = self._decode(z, jr.fold_in(k, self.iterations), clip=True, stop_eps=False,
                               remat=bounded and self.remat)
            return out, jnp.mean(jnp.square(out - x), axis=(1, 2, 3)), z

        out_RB, err_RB, z_RB = jax.vmap(restart)(jnp.arange(self.restarts))
        best_B = jnp.argmin(err_RB, axis=0).astype(jnp.int32)
        pick = jax.vmap(lambda a_R, i: a_R[i], in_axes=(1, 0))
        return pick(out_RB, best_B), pick(err_RB, best_B), pick(z_RB, best_B), best_B

    def _check_input(self, x) -> None:
        """Raise ``ValueError`` before any work unless the eps-model accepts ``x``'s shape."""
        spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        steps = jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
        try:
            eps = jax.eval_shape(self.eps_fn, spec, steps)
        except Exception as e:  # noqa: BLE001 -- any failure of the model on this shape
            raise ValueError(f"x: shape {tuple(x.shape)} does not fit the diffusion model "
                             f"({type(e).__name__}: {e})") from e
        if getattr(eps, "shape", None) != tuple(x.shape):
            raise ValueError(f"x: the diffusion model maps shape {tuple(x.shape)} to "
                             f"{getattr(eps, 'shape', eps)}; expected an eps of the same shape")

    # ------------------------------------------------------------------ the function
    def reconstruct(self, x: Images, key: AnyKey) -> Reconstruction:
        """Reconstruct ``x`` (float32 NHWC in [0, 1]); exactly differentiable in ``x``.

        Args:
          x: images.
          key: one key (shared by the batch) or a (B,) batch of keys, one per example.

        Returns:
          A :class:`Reconstruction`: the best restart's image, its error (the detection score),
          its ``z_T`` and its index.
        """
        check_images(x, "x")
        self._check_input(x)
        if jnp.ndim(key) == 1 and key.shape[0] != x.shape[0]:
            raise ValueError(f"key: expected one key or {x.shape[0]} keys (one per "
                             f"example), got {key.shape[0]} keys")
        if self.remat and not self._inner_remat:  # the two versions differ: pick per use
            return _bounded_when_differentiated(self, x, key)
        return self._reconstruct_keys(x, key, bounded=True)

    def _reconstruct_keys(self, x, key, *, bounded):
        if jnp.ndim(key) == 1:
            out, err, z, best = jax.vmap(lambda xi, ki: jax.tree.map(
                lambda a: a[0], self._reconstruct(xi[None], ki, bounded=bounded)))(x, key)
        else:
            out, err, z, best = self._reconstruct(x, key, bounded=bounded)
        return Reconstruction(out, err, z, best)

    def __call__(self, x: Images, key: AnyKey) -> Images:
        """The defended input: the reconstruction of ``x`` (float32 NHWC in [0, 1]).

        Args:
          x: images.
          key: one key (shared by the batch) or a (B,) batch of keys, one per example.

        Returns:
          Reconstructions in [0, 1], shaped like ``x``; with ``gradient="bpda"`` their
          gradient is the identity.
        """
        if self.gradient == "bpda":
            check_images(x, "x")
            out = self.reconstruct(jax.lax.stop_gradient(x), key).x
            return x + jax.lax.stop_gradient(out - x)
        return self.reconstruct(x, key).x


def _bounded_when_differentiated(defence: DiffDefense, x, key) -> Reconstruction:
    """``defence.reconstruct(x, key)``: the undifferentiated version (no recomputation in the
    optimiser's gradient) when evaluated, the bounded-memory one (checkpoints) under ``jvp`` /
    ``grad``. Both compute the same function; only what is stored for a derivative differs.

    The defence's array leaves (parameters, schedules) are explicit arguments, so derivatives in
    them go through the bounded version too; other leaves (a plain-function ``eps_fn``) are
    closed over. Only the arguments with a nonzero tangent are differentiated (symbolic zeros)."""
    leaves, treedef = jax.tree.flatten(defence)
    pos = [i for i, leaf in enumerate(leaves)
           if isinstance(leaf, jax.Array | np.ndarray | np.generic)]

    def version(bounded):
        def run(arrays, x, key):
            filled = list(leaves)
            for i, a in zip(pos, arrays, strict=True):
                filled[i] = a
            return jax.tree.unflatten(treedef, filled)._reconstruct_keys(x, key, bounded=bounded)
        return run

    fn = jax.custom_jvp(version(False))

    def jvp(primals, tangents):
        flat, tree = jax.tree.flatten(primals)
        flat_t = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
        live = [i for i, t in enumerate(flat_t) if not isinstance(t, SymbolicZero)]

        def of_live(*values):
            filled = list(flat)
            for i, v in zip(live, values, strict=True):
                filled[i] = v
            return version(True)(*jax.tree.unflatten(tree, filled))

        return jax.jvp(of_live, [flat[i] for i in live], [flat_t[i] for i in live])

    fn.defjvp(jvp, symbolic_zeros=True)
    return fn([leaves[i] for i in pos], x, key)


def diffdefense(model: jd.EpsFn, schedule: jd.Schedule | None = None, *, num_steps: int = 15,
                restarts: int = 5, iterations: int = 4,
                learning_rate: float | str | Callable = 0.02,
                betas: tuple[float, float] = (0.5, 0.999), adam_eps: float = 1e-8,
                eta: float = 0.0,
                output: str = "clip", z_gradient: str = "exact", gradient: str = "exact",
                remat: bool = True, inner_remat: bool | None = None,
                unroll: int = 1) -> DiffDefense:
    """The DiffDefense reconstruction defence (Silva et al. 2023) over a trained diffusion model.

    Defaults are the reference's (R = 5 restarts, L = 4 Adam iterations, rate 0.02 -- its code's
    step decay is ``learning_rate="reference"`` --, betas (0.5, 0.999), 15 reverse steps)
    except where the module docstring says why not. The reference's own configuration is ``eta=1.0,
    output="sigmoid", z_gradient="reference"`` (on a model trained on [0, 1] images).

    Args:
      model: the trained diffusion model, ``model(x_t, model_step) -> eps``: a
        :class:`jaxrob.models.DiffusionModel` (carries its schedule) or any ``eps_fn``.
      schedule: the model's training schedule (None: ``model.schedule``).
      num_steps: DDIM steps of the reverse process, evenly respaced over the whole chain.
      restarts: random initialisations ``z_T ~ N(0, I)`` per example (>= 1).
      iterations: Adam steps per restart (>= 0).
      learning_rate: ``"reference"`` (:func:`reference_learning_rate`), a constant rate, or an
        optax schedule of the step count.
      betas: Adam's ``(b1, b2)``.
      adam_eps: Adam's ``eps``. It sets how rough the exact attack gradient is: Adam's step
        ``m / (sqrt(v) + eps)`` is nearly scale-free in the inner gradient ``g``, so its
        derivative in ``x`` is ~0 where ``|g| >> eps`` and spikes (~1/eps) where ``g`` nearly
        vanishes (module docstring).
      eta: DDIM eta (0: deterministic reverse process).
      output: ``"clip"`` or ``"sigmoid"`` (how the final state is mapped to [0, 1]).
      z_gradient: ``"exact"`` (through the network) or ``"reference"`` (network output held
        constant) -- the gradient the reconstruction optimiser follows.
      gradient: ``"exact"`` (through the unrolled optimisation) or ``"bpda"`` (identity) --
        the gradient an attack gets.
      remat: checkpoint every reverse step and every optimiser iteration when the defence is
        differentiated (bounded memory for an attack's gradient).
      inner_remat: checkpoint the reverse steps of the optimiser's own gradient in the
        undifferentiated call too (None, the default: as ``remat``; memory ~ batch instead of
        ``num_steps`` x batch, one more network forward per VJP; ``False``: ~15% faster, more
        memory).
      unroll: ``lax.scan`` unroll factor of the reverse process.

    Returns:
      A :class:`DiffDefense`.

    Example::

      ddpm = jaxrob.models.load("checkpoints/mnist_ddpm", fast_vjp=True)
      defence = jaxrob.purify.diffdefense(ddpm)
      rec = defence.reconstruct(x, jax.random.key(0))   # rec.x, rec.error (detection score)
      defended = jaxrob.purify.DefendedModel(classifier, defence)
    """
    if schedule is None:
        schedule = getattr(model, "schedule", None)
        if schedule is None:
            raise TypeError("schedule: expected a jaxrob.diffusion.Schedule (or a model with a "
                            ".schedule, e.g. jaxrob.models.load of a DDPM export), got None")
    return DiffDefense.create(model, schedule, num_steps=num_steps, restarts=restarts,
                              iterations=iterations, learning_rate=learning_rate, betas=betas,
                              adam_eps=adam_eps, eta=eta, output=output, z_gradient=z_gradient,
                              gradient=gradient,
                              remat=remat, inner_remat=inner_remat, unroll=unroll)

