"""AutoAttack (Croce & Hein 2020): an ensemble of attacks, each run on the examples still robust.

Follows AutoAttack's ``autoattack.py`` (``run_standard_evaluation``, ``set_version``) and
``checks.py``. The versions:

* ``"standard"``: APGD-CE (1 restart), APGD-T (targeted DLR, 9 target classes, 1 restart each),
  FAB-T (9 target classes, 1 restart each), Square (5000 queries); 100 iterations each;
* ``"plus"``: APGD-CE, APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T, FAB-T;
* ``"rand"`` (randomised defences): APGD-CE and APGD-DLR, 1 restart, EoT over 20 samples;
* ``"custom"``: the ``attacks`` given, with the original's defaults (APGD-CE / APGD-DLR / FAB 5
  restarts, APGD-T / FAB-T 1 restart per target).

With ``norm="l1"`` (Croce & Hein 2021), ``"standard"`` is the original's L1 version: APGD-CE (5
restarts) and APGD-T (5 target classes), both APGD-L1 with the ``use_largereps`` schedule (radii
3, 2, 1 x eps over 30/30/40% of the iterations), then FAB-T (9 target classes) and L1 Square
(5000 queries, ``p_init`` 0.8). ``"plus"``, ``"rand"`` and ``"custom"`` run APGD-L1 without the
schedule, as the original does; ``"plus"`` with L1 warns, as the original does (it was designed
for Linf and L2).

Each attack runs in *stages*, as the original's loops do: a restart, or (APGD-T, FAB-T) a target
class, the 2nd .. (n + 1)-th most likely at the clean input. A stage runs only on the examples
no earlier stage has broken: between stages the still-robust examples are gathered on the host
and run in chunks of ``batch_size``, each padded to a bucket size (``batch_size`` and the powers
of two from 8 below it), so each attack compiles at most a few times. After a stage its points
are checked by one more model evaluation (the original's ``get_logits(adv_curr)``); a
misclassified one replaces ``x_adv`` and the example is broken by that attack.

Per-example keys: example ``i`` (global index ``indices[i]``) has ``k_i = fold_in(key,
indices[i])``, and every attack is ``vmap``-ed over single examples, so an example's outcome
depends only on ``(x_i, y_i, k_i)``: not on the batch size, on the chunking, or on which other
examples are still robust. Hence AutoAttack's robust set is exactly the intersection of the
robust sets of its attacks run alone (``version="custom"``) with the same key. Stage ``s`` of an
attack runs on ``fold_in(fold_in(k_i, AA_<attack>), s)`` (tags of :mod:`jaxrob._keys`); inside,
each attack derives its keys as documented in its module.

Differences from the original: the target count is checked (an error, where the original warns);
randomness is explicit (keys), so the randomised-defence check compares five calls with
different keys; the APGD runs report an example broken when any iterate was misclassified
(AutoAttack's ``x_best_adv``), with the prediction of that iterate's EoT sample 0 (the
original takes its last EoT sample's logits); Square's window schedule is rescaled to its
query budget (the original's AutoAttack runs it with ``resc_schedule=False``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_choice, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._types import Array, Images, Key, Labels
from jaxrob.attacks._apgd import _apgd_run
from jaxrob.attacks._common import (
    check_attack_inputs,
    check_num_classes,
    check_scalar,
    per_example_norm,
)
from jaxrob.attacks._fab import check_target_count, fab_run, fab_targets
from jaxrob.attacks._losses import LogitsFn, LogitsLoss, TargetedLogitsLoss
from jaxrob.attacks._square import _square

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_VERSIONS = ("standard", "plus", "rand", "custom")
_NORMS = {"apgd-ce": ("linf", "l2", "l1"), "apgd-dlr": ("linf", "l2", "l1"),
          "apgd-t": ("linf", "l2", "l1"), "fab": ("linf", "l2", "l1"),
          "fab-t": ("linf", "l2", "l1"), "square": ("linf", "l2", "l1")}
_TAGS = {"apgd-ce": tags.AA_APGD_CE, "apgd-dlr": tags.AA_APGD_DLR, "apgd-t": tags.AA_APGD_T,
         "fab": tags.AA_FAB, "fab-t": tags.AA_FAB_T, "square": tags.AA_SQUARE}
_VERSION_ATTACKS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
                    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
                    "rand": ("apgd-ce", "apgd-dlr")}
# Restarts of the untargeted APGD and FAB per version (the original's set_version; custom keeps
# the constructor's 5). Targeted attacks: one restart per target class in every version.
_RESTARTS = {"standard": 1, "plus": 5, "rand": 1, "custom": 5}
# The original's L1 standard version (set_version with norm='L1'): APGD-CE with 5 restarts and
# APGD-T with 5 target classes, both with the use_largereps schedule; FAB-T and Square as for
# Linf / L2.
_L1_APGD_RESTARTS, _L1_APGD_TARGETS = 5, 5
_MIN_BUCKET = 8


class AutoAttackResult(NamedTuple):
    """What :func:`autoattack` returns (host numpy arrays and Python values).

    Attributes:
      x_adv: (N, H, W, C) the first point that broke each example (``x`` where none did, and
        where the clean input is misclassified).
      robust: (N,) bool, not broken by any attack (and classified correctly at ``x``).
      broken_by: (N,) int, the index into ``stages`` of what broke the example (0: misclassified
        at ``x``), -1 where robust.
      stages: ``("clean",) + attacks``, the names ``broken_by`` indexes.
      accuracy: the running robust accuracy after each of ``stages`` (``"clean"`` first), as the
        original prints it.
      looks_randomised: the logits differed across five calls with different keys (or the
        number of correct predictions did) on the first batch: use ``version="rand"``.
      randomness: the largest L2 distance between two calls' logits, each scaled to unit norm.
      outputs_probabilities: the outputs look like probabilities (in [0, 1], summing to 1): the
        attacks expect logits.
      square_unreliable: Square lowered the robust accuracy by more than 0.2% after the
        gradient attacks, a sign of gradient masking.
      final_accuracy: the robust accuracy re-measured on ``x_adv`` (a new model evaluation).
      consistent: the re-measure agrees with ``robust`` on every example (it need not for a
        randomised model).
      max_perturbation: the largest ``||x_adv - x||`` in the attack's norm.
      version, attacks, norm, eps: what was run.
    """

    x_adv: np.ndarray
    robust: np.ndarray
    broken_by: np.ndarray
    stages: tuple[str, ...]
    accuracy: dict[str, float]
    looks_randomised: bool
    randomness: float
    outputs_probabilities: bool
    square_unreliable: bool
    final_accuracy: float
    consistent: bool
    max_perturbation: float
    version: str
    attacks: tuple[str, ...]
    norm: str
    eps: float


# --------------------------------------------------------------------------------------------
# Jitted pieces: every one maps single examples (vmap), so nothing couples examples.


@filter_jit
def _logits(model, x, keys):
    return jax.vmap(lambda xi, ki: model(xi[None], ki)[0])(x, keys)


@filter_jit
def _stage(model, x, y, keys, eps, stage, *, attack, norm, n_iter, eot_samples, n_queries,
           largereps):
    """Stage ``stage`` of ``attack`` on each example: ``(x_adv (B, ...), broken (B,))``."""

    def one(xi, yi, ki):
        x1, y1 = xi[None], yi[None]
        k = jr.fold_in(ki, stage)
        apgd_opts = dict(norm=norm, num_steps=n_iter, rho=0.75, alpha=0.75, random_start=True,
                         eot_samples=eot_samples, eot_chunk=None, eot_mesh=None,
                         return_iterates=False, track_fn=model, use_largereps=largereps)
        fab_opts = dict(norm=norm, num_steps=n_iter, alpha_max=0.1, eta=1.05, beta=0.9)
        if attack in ("apgd-ce", "apgd-dlr"):
            loss_fn = LogitsLoss(model, "ce" if attack == "apgd-ce" else "dlr")
            x_adv = _apgd_run(loss_fn, x1, y1, k, eps, **apgd_opts).x_adv
        elif attack == "apgd-t":
            target = fab_targets(model, x1, k, stage + 2)
            loss_fn = TargetedLogitsLoss(model, target, "dlr")
            x_adv = _apgd_run(loss_fn, x1, y1, k, eps, **apgd_opts).x_adv
        elif attack in ("fab", "fab-t"):
            target = fab_targets(model, x1, k, stage + 2) if attack == "fab-t" else None
            rand_start = (stage > 0) if attack == "fab" else False
            adv, dist = fab_run(model, x1, y1, k, eps, rand_start, target, **fab_opts)
            x_adv = jnp.where(dist[:, None, None, None] <= eps, adv, x1)
        else:
            x_adv = _square(model, x1, y1, k, eps, norm=norm, n_queries=n_queries,
                            p_init=0.8).x_adv
        broken = jnp.argmax(model(x_adv, jr.fold_in(k, tags.AA_SCORE)), axis=1) != y1
        return x_adv[0], broken[0]

    return jax.vmap(one)(x, y, keys)


def _buckets(batch_size: int) -> list[int]:
    sizes = {batch_size}
    b = min(_MIN_BUCKET, batch_size)
    while b < batch_size:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def _chunks(ids: np.ndarray, batch_size: int):
    """``(ids of the chunk, padded ids)``: the padding repeats the chunk's first example."""
    buckets = _buckets(batch_size)
    for start in range(0, ids.size, batch_size):
        chunk = ids[start:start + batch_size]
        size = next(b for b in buckets if b >= chunk.size)
        yield chunk, np.concatenate([chunk, np.full(size - chunk.size, chunk[0], chunk.dtype)])


def _batched_logits(model, x, keys, ids, batch_size):
    out = []
    for chunk, padded in _chunks(ids, batch_size):
        z = _logits(model, x[padded], keys[padded])
        out.append(np.asarray(z)[: chunk.size])
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Input checks.


def _plan(version, attacks, norm, n_target_classes) -> list[tuple[str, int]]:
    """``[(attack, number of stages)]`` of a version (and norm)."""
    check_choice(version, AA_VERSIONS, "version")
    if version == "custom":
        if attacks is None or isinstance(attacks, str) or not len(attacks):
            raise ValueError(f"attacks: version='custom' runs the attacks listed, expected a "
                             f"non-empty sequence of names from {list(AA_ATTACKS)}, got "
                             f"{attacks!r}")
        attacks = tuple(attacks)
        for a in attacks:
            check_choice(a, AA_ATTACKS, "attacks")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks: expected each attack once, got {list(attacks)}")
    else:
        if attacks is not None:
            raise ValueError(f"attacks: version={version!r} runs "
                             f"{list(_VERSION_ATTACKS[version])}; pass version='custom' to "
                             f"choose the attacks")
        attacks = _VERSION_ATTACKS[version]
    check_choice(norm, ("linf", "l2", "l1"), "norm")
    if version == "standard" and norm == "l1":
        return [("apgd-ce", _L1_APGD_RESTARTS),
                ("apgd-t", min(_L1_APGD_TARGETS, n_target_classes)),
                ("fab-t", n_target_classes), ("square", 1)]
    if version == "plus" and norm == "l1":  # the original's set_version prints the same
        warnings.warn("autoattack: version 'plus' was designed for Linf and L2; with L1 it "
                      "runs as the original does (please check)", stacklevel=3)
    for a in attacks:
        if norm not in _NORMS[a]:
            raise ValueError(f"norm: {a} supports {list(_NORMS[a])}, got {norm!r} (version "
                             f"{version!r} runs {list(attacks)})")
    restarts = _RESTARTS[version]
    return [(a, n_target_classes if a in ("apgd-t", "fab-t") else restarts) for a in attacks]


def _check_indices(indices, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(indices)
    if idx.shape != (n,) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices: expected ({n},) int global example indices, got "
                         f"{idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or np.unique(idx).size != n):
        raise ValueError("indices: expected distinct non-negative example indices")
    return idx


# --------------------------------------------------------------------------------------------


def autoattack(model: LogitsFn, x: Images, y: Labels, key: Key, *, eps: float,
               norm: str = "linf", version: str = "standard",
               attacks: Sequence[str] | None = None, n_iter: int = 100,
               n_target_classes: int = 9, n_queries: int = 5000,
               eot_samples: int | None = None, batch_size: int = 250,
               indices: Array | None = None, verbose: bool = False) -> AutoAttackResult:
    """AutoAttack: APGD-CE, APGD-T, FAB-T and Square (standard), each on the still-robust.

    See the module docstring for the versions, the stages, the per-example keys and the
    differences from the original. Checks like the original's ``checks.py``: whether the model
    looks randomised (five calls with different keys on the first ``batch_size`` examples;
    warns unless ``version="rand"``), whether it outputs probabilities, whether Square broke
    more than the gradient attacks; and whether the robust accuracy re-measured on the final
    ``x_adv`` matches the running one.

    Args:
      model: ``logits_fn(x, key) -> (B, K)`` (deterministic models ignore the key); called on
        single examples under ``vmap`` with one key each.
      x: (N, H, W, C) float32 images in [0, 1] (a host or device array).
      y: (N,) int labels.
      key: the run's key; example ``i`` uses ``fold_in(key, indices[i])``.
      eps: the radius of the threat model (> 0).
      norm: ``"linf"``, ``"l2"`` or ``"l1"`` (the original's L1 version, see the module
        docstring).
      version: ``"standard"``, ``"plus"``, ``"rand"`` or ``"custom"``.
      attacks: with ``version="custom"``, the attacks in order, from ``"apgd-ce"``,
        ``"apgd-dlr"``, ``"apgd-t"``, ``"fab"``, ``"fab-t"``, ``"square"``.
      n_iter: iterations of APGD and FAB (100).
      n_target_classes: target classes of APGD-T and FAB-T, at most K - 1 (9; APGD-T of the
        L1 standard version uses at most 5, as the original).
      n_queries: Square's query budget per example (5000).
      eot_samples: EoT samples of the APGD gradients; None: 20 for ``"rand"``, else 1.
      batch_size: examples per compiled call (the largest bucket).
      indices: (N,) global example indices for the per-example keys (default ``arange(N)``),
        so a dataset split into parts gives the same result as in one call.
      verbose: print the original's progress lines.

    Returns:
      :class:`AutoAttackResult`.

    Raises:
      ValueError: before any model evaluation: bad images, labels or indices; an unknown
        version or attack name, ``attacks`` with a predefined version or none with
        ``"custom"``; a norm an attack does not support; ``eps <= 0``; non-positive counts;
        more target classes than K - 1, or too few classes for the (targeted) DLR loss.

    References:
      Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
      parameter-free attacks", ICML 2020; github.com/fra31/auto-attack,
      ``autoattack/autoattack.py``, ``checks.py``.
    """
    y = check_attack_inputs(x, y)
    eps_f = float(check_scalar(eps, "eps", positive=True))
    n_iter = check_positive_int(n_iter, "n_iter")
    n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
    n_queries = check_positive_int(n_queries, "n_queries")
    batch_size = check_positive_int(batch_size, "batch_size")
    if eot_samples is None:
        eot_samples = 20 if version == "rand" else 1
    eot_samples = check_positive_int(eot_samples, "eot_samples")
    plan = _plan(version, attacks, norm, n_target_classes)
    names = tuple(a for a, _ in plan)
    largereps = version == "standard" and norm == "l1"
    if largereps and n_iter < 3:
        raise ValueError(f"n_iter: the L1 standard version's APGD splits its iterations over "
                         f"three radii (use_largereps), expected at least 3, got {n_iter}")
    num_classes = check_num_classes(model, x, y, key)
    for a in names:
        if a in ("apgd-t", "fab-t"):
            check_target_count(n_target_classes, num_classes, a.upper())
        if a == "apgd-t" and num_classes < 4:
            raise ValueError(f"attacks: APGD-T's targeted DLR needs at least 4 classes, the "
                             f"model has {num_classes}")
        if a == "apgd-dlr" and num_classes < 3:
            raise ValueError(f"attacks: the DLR loss needs at least 3 classes, the model has "
                             f"{num_classes}")
    n = x.shape[0]
    idx = _check_indices(indices, n)
    say = print if verbose else (lambda *a: None)

    x_np, y_np = np.asarray(x), np.asarray(y)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
    fold = lambda ks, tag: jax.vmap(lambda k: jr.fold_in(k, tag))(ks)
    eps_a = jnp.float32(eps_f)
    all_ids = np.arange(n)
    say(f"using {version} version including {', '.join(names)}.")

    # Checks on the type of defence (the original's check_randomized / check_range_output), on
    # the first batch.
    first = all_ids[:batch_size]
    base = fold(keys, tags.AA_RANDOMISED)
    outs = [_batched_logits(model, x_np, fold(base, j), first, batch_size) for j in range(5)]
    unit = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outs]
    randomness = max(float(np.linalg.norm(unit[a] - unit[b], axis=1).max())
                     for a in range(5) for b in range(a + 1, 5)) if n else 0.0
    correct = {int((o.argmax(1) == y_np[first]).sum()) for o in outs}
    looks_randomised = len(correct) > 1 or randomness > 1e-4
    if looks_randomised and version != "rand":
        warnings.warn("autoattack: the model's logits depend on its key: it seems to be a "
                      "randomised defence; use version='rand' (EoT)", stacklevel=2)
    o = outs[0]
    outputs_probabilities = bool(n and o.max() < 1 + 1e-5 and o.min() > -1e-5
                                 and np.all(np.abs(o.sum(-1) - 1) < 1e-5))
    if outputs_probabilities:
        warnings.warn("autoattack: the model's outputs look like probabilities; the attacks "
                      "expect logits", stacklevel=2)

    z = _batched_logits(model, x_np, fold(keys, tags.AA_CLEAN), all_ids, batch_size)
    robust = z.argmax(1) == y_np
    broken_by = np.where(robust, -1, 0)
    x_adv = x_np.copy()
    accuracy = {"clean": float(robust.mean()) if n else 0.0}
    say(f"initial accuracy: {accuracy['clean']:.2%}")

    for a_idx, (attack, n_stages) in enumerate(plan):
        opts = dict(attack=attack, norm=norm, n_iter=n_iter, n_queries=n_queries,
                    eot_samples=eot_samples if attack in ("apgd-ce", "apgd-dlr") else 1,
                    largereps=largereps and attack in ("apgd-ce", "apgd-t"))
        attack_keys = fold(keys, _TAGS[attack])
        for s in range(n_stages):
            ids = np.flatnonzero(robust)
            if not ids.size:
                break
            n_broken = 0
            for chunk, padded in _chunks(ids, batch_size):
                xa, broken = _stage(model, x_np[padded], y_np[padded], attack_keys[padded],
                                    eps_a, jnp.int32(s), **opts)
                broken = np.asarray(broken)[: chunk.size]
                hit = chunk[broken]
                x_adv[hit] = np.asarray(xa)[: chunk.size][broken]
                robust[hit] = False
                broken_by[hit] = a_idx + 1
                n_broken += hit.size
            say(f"{attack} - stage {s + 1}/{n_stages} - {n_broken} out of {ids.size} "
                f"successfully perturbed")
        accuracy[attack] = float(robust.mean())
        say(f"robust accuracy after {attack.upper()}: {accuracy[attack]:.2%}")

    # The original's check_square_sr: Square breaking more than the gradient attacks.
    square_unreliable = False
    if "square" in accuracy and len(accuracy) > 2:
        best_other = min(v for k, v in accuracy.items() if k != "square")
        square_unreliable = accuracy["square"] < best_other - 0.002
        if square_unreliable:
            warnings.warn(f"autoattack: Square lowered the robust accuracy by "
                          f"{best_other - accuracy['square']:.2%} after the gradient attacks; "
                          f"the evaluation may be unreliable (gradient masking?)", stacklevel=2)

    z = _batched_logits(model, x_adv, fold(keys, tags.AA_FINAL), all_ids, batch_size)
    final_robust = z.argmax(1) == y_np
    final_accuracy = float(final_robust.mean()) if n else 0.0
    consistent = bool(np.array_equal(final_robust, robust))
    if not consistent:
        warnings.warn(f"autoattack: the robust accuracy re-measured on x_adv "
                      f"({final_accuracy:.2%}) differs from the running one "
                      f"({float(robust.mean()):.2%})"
                      + (" (expected for a randomised model)" if looks_randomised else ""),
                      stacklevel=2)
    norm_np = np.asarray(per_example_norm(jnp.asarray(x_adv - x_np), norm)) if n else np.zeros(0)
    max_pert = float(norm_np.max()) if n else 0.0
    say(f"max {norm} perturbation: {max_pert:.5f}, nan in tensor: "
        f"{int(np.isnan(x_adv).sum())}, max: {x_adv.max():.5f}, min: {x_adv.min():.5f}")
    say(f"robust accuracy: {float(robust.mean()):.2%}")
    return AutoAttackResult(
        x_adv=x_adv, robust=robust, broken_by=broken_by, stages=("clean",) + names,
        accuracy=accuracy, looks_randomised=bool(looks_randomised), randomness=randomness,
        outputs_probabilities=outputs_probabilities, square_unreliable=bool(square_unreliable),
        final_accuracy=final_accuracy, consistent=consistent, max_perturbation=max_pert,
        version=version, attacks=names, norm=norm, eps=eps_f)
