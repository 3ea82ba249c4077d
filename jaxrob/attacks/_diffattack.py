"""DiffAttack's loss: a classification loss plus a deviated-reconstruction term on chain states.

Kang, Song & Li (DiffAttack, NeurIPS 2023) maximise ``L = L_cls + lambda L_dev`` with

  ``L_dev = E_t[ alpha(t) E d(x_t, x'_t) ]``,

``x_t`` the clean image diffused to step ``t``, ``x'_t`` the state at step ``t`` of the reverse
chain that purifies the attacked input, the expectation over ``t`` approximated by averaging over
uniformly sampled steps (``alpha(t)`` = one over their number, ``lambda = 1``: their App. D.2).
The term gives the attack a loss at shallow depths of the purifier's graph.

Semantics chosen here (the paper does not pin them down; its code is unreleased):

* ``d`` is the squared error averaged over one image's pixels, in the diffusion model's [-1, 1]
  space (as DiffBreak's implementation);
* ``x_t`` is the clean image diffused with *the purification's own forward noise* (so at the
  chain's start the deviation is exactly ``abar (x_adv - x_clean)^2`` averaged, and the term is
  not dominated by noise-versus-noise distances);
* the states are those of :meth:`jaxrob.purify.Purifier.reconstruction_deviation`: per stage or
  GDMP iteration the forward-diffused input and the state after every reverse step, the last
  one being the purified output (compared with the clean image itself). ``num_states=None``
  averages over all of them; an integer ``m`` draws ``m`` distinct states uniformly per loss
  evaluation from ``fold_in(key, DIFFATTACK_STATES)`` (per example with per-example keys), so
  every PGD iteration and EoT sample scores other steps (the paper's "uniformly sampled time
  steps");
* the gradient is exact (the purifier's ``lax.scan`` with ``jax.checkpoint`` is the memory-bounded
  equivalent of the paper's segment-wise forward-backward algorithm); BPDA or surrogate
  purifiers are refused. Both terms come from one purification per key (the ``L_cls`` logits
  are the classifier's on that purification's output).

The attacks keep optimising examples that are already misclassified (PGD and APGD never stop
early), as the paper asks. The paper runs it inside AutoAttack's APGD (100 iterations, 20 EoT
samples, CE then DLR): ``apgd(model, x, y, key, loss=diffattack_loss(model, x, base="dlr"),
eot_samples=20)``.

References:
  Kang, Song, Li. DiffAttack: Evasion Attacks Against Diffusion-Based Adversarial Purification.
  NeurIPS 2023 (Eq. 8, 11; App. D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_choice, check_images, check_positive_int
from jaxrob._keys import CLASSIFIER, fold
from jaxrob._pytree import pytree_dataclass, static_field
from jaxrob._types import AnyKey, Array, Images, Labels, PerExample
from jaxrob.attacks._losses import LOSSES, InputLoss, cw_loss


@pytree_dataclass
class DiffAttackLoss(InputLoss):
    """``loss_fn(x, y, key) = L_cls(logits, y) + weight * L_dev`` (module docstring).

    A pytree: the defended model's parameters, the clean images and the weight are leaves
    (traced: a new weight or new images of the same shapes reuse the compilation), the names
    and the number of sampled states static. Build it with :func:`diffattack_loss`.

    Attributes:
      model: the defended model (``model.purifier`` has ``reconstruction_deviation``).
      x_clean: (B, H, W, C) the clean images the reconstructions are compared with.
      weight: ``lambda`` (float32 scalar).
      base: the classification loss, ``"ce"``, ``"cw"`` or ``"dlr"``.
      num_states: states averaged per evaluation (None: all).
    """

    model: object
    x_clean: Array
    weight: Array
    base: str = static_field(default="ce")
    num_states: int | None = static_field(default=None)

    def check(self, x: Images, y: Labels) -> None:
        """Raise unless ``x`` has the clean images' shape (one clean image per example)."""
        if tuple(x.shape) != tuple(self.x_clean.shape):
            raise ValueError(f"x: the DiffAttack loss was built for clean images of shape "
                             f"{tuple(self.x_clean.shape)}, got x of shape {tuple(x.shape)}")

    def terms(self, x: Images, y: Labels, key: AnyKey) -> tuple[PerExample, PerExample]:
        """``(L_cls, L_dev)``, each (B,), from one purification with ``key``."""
        x_pur, dev_SB = self.model.purifier.reconstruction_deviation(x, self.x_clean, key)
        logits = self.model.classifier(x_pur, fold(key, CLASSIFIER))
        cls_B = cw_loss(logits, y) if self.base == "cw" else LOSSES[self.base](logits, y)
        w = self._state_weights(key, dev_SB.shape[0], x.shape[0])
        return cls_B, jnp.sum(w * dev_SB, axis=0)

    def __call__(self, x: Images, y: Labels, key: AnyKey) -> PerExample:
        cls_B, dev_B = self.terms(x, y, key)
        return cls_B + self.weight * dev_B

    def _state_weights(self, key, num: int, batch: int) -> Array:
        """(S, 1) or (S, B): 1/m on the m sampled states, 0 elsewhere (all: 1/S)."""
        if self.num_states is None:
            return jnp.full((num, 1), 1.0 / num, jnp.float32)
        m = self.num_states

        def one(k):
            idx = jr.choice(jr.fold_in(k, tags.DIFFATTACK_STATES), num, (m,), replace=False)
            return jnp.zeros((num,), jnp.float32).at[idx].set(1.0 / m)

        if jnp.ndim(key) == 1:
            return jax.vmap(one)(key).T
        return one(key)[:, None]


def diffattack_loss(model, x_clean: Images, *, base: str = "ce", weight: float = 1.0,
                    num_states: int | None = None) -> DiffAttackLoss:
    """DiffAttack's loss ``L_cls + weight * L_dev`` for :func:`pgd` / :func:`apgd` ``loss=``.

    ``L_dev`` averages, over the purifier's reverse-chain states (all, or ``num_states`` drawn
    uniformly per evaluation), the per-example squared deviation of each state from the clean
    image diffused to that state's noise level with the purification's forward noise (module
    docstring for the exact semantics and where they differ from the paper). ``weight=0`` is the
    plain classification loss.

    Args:
      model: the defended model the attack attacks (a :class:`jaxrob.purify.DefendedModel`
        whose purifier is a :class:`jaxrob.purify.Purifier` or
        :class:`jaxrob.purify.GuidedPurifier` with exact gradients); pass the same object as
        the attack's ``model``.
      x_clean: (B, H, W, C) float32 clean images in [0, 1], the batch that will be attacked.
      base: ``"ce"`` (default), ``"dlr"`` or ``"cw"``.
      weight: ``lambda`` >= 0 (1.0: the paper's).
      num_states: states sampled per evaluation, 1 .. ``purifier.num_states``; None: all.

    Returns:
      A :class:`DiffAttackLoss` (``loss(x, y, key) -> (B,)``; ``loss.terms`` gives both terms).

    Raises:
      ValueError: a model without a purifier or whose purifier has no exact reverse chain
        (BPDA / surrogate / DiffDefense), bad ``x_clean``, unknown ``base``, negative or
        non-finite ``weight``, ``num_states`` outside 1 .. the purifier's states.

    Example::

      loss = jaxrob.attacks.diffattack_loss(defended, x, base="ce")
      res = jaxrob.attacks.pgd(defended, x, y, key, eps=0.3, num_steps=20, loss=loss)
    """
    pur = getattr(model, "purifier", None)
    if pur is None or not callable(getattr(model, "classifier", None)):
        raise ValueError("model: expected a jaxrob.purify.DefendedModel with a purifier "
                         "(DiffAttack scores the purifier's reverse-chain states), got "
                         f"{type(model).__name__}" + (" without a purifier" if pur is None
                                                       and hasattr(model, "purifier") else ""))
    if not hasattr(pur, "reconstruction_deviation"):
        raise ValueError(f"model.purifier: expected a Purifier or GuidedPurifier (with "
                         f"reverse-chain states), got {type(pur).__name__}")
    if getattr(pur, "gradient", "exact") not in ("exact", "guidance_constant"):
        raise ValueError(f"model.purifier: DiffAttack differentiates the purifier's own chain; "
                         f"expected gradient='exact', got gradient={pur.gradient!r}")
    check_images(x_clean, "x_clean")
    check_choice(base, LOSSES, "base")
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = None
    if w is None or not np.isfinite(w) or w < 0:
        raise ValueError(f"weight: expected a finite number >= 0, got {weight!r}")
    if num_states is not None:
        num_states = check_positive_int(num_states, "num_states")
        if num_states > pur.num_states:
            raise ValueError(f"num_states: expected 1..{pur.num_states} (the purifier's "
                             f"reverse-chain states), got {num_states}")
    return DiffAttackLoss(model, jnp.asarray(x_clean, jnp.float32),
                          jnp.asarray(weight, jnp.float32), base, num_states)
