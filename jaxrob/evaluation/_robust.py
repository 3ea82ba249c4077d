"""Robust accuracy of a (randomised) defence under an adaptive attack and a named protocol.

Randomness, per example ``i`` with ``k_i = fold_in(key, index_i)``:

* ``stochastic``: the attack sees fresh purifier noise at every EoT sample and iteration
  (derived from ``fold_in(k_i, 1)``), and the final scoring uses independent noise
  (``fold_in(k_i, 2)`` for the clean and ``fold_in(k_i, 3)`` for the adversarial input);
* ``fixed`` (the deterministic white-box / "DW-box" setting): one purifier key per example,
  ``fold_in(k_i, 4)``, is used by every attack step AND by the scoring, so the defence is a
  deterministic function that the attacker knows exactly. Every protocol then reduces to
  ``one_shot`` (all N purifications are the same);
* ``forward_lock`` (ADDT's "forward lock" variant): the forward noise is fixed per example --
  the fixed mode's, from ``forward_key = fold_in(k_i, 4)`` -- in every attack step and every
  scoring purification, while the reverse noise is fresh as in ``stochastic`` (the attack's
  keys, ``fold_in(k_i, 2)`` / ``fold_in(k_i, 3)`` for scoring). The defence must take
  ``forward_key=`` (a :class:`jaxrob.purify.DefendedModel` around a
  :class:`jaxrob.purify.Purifier`); others are refused before any work.

Fixed-AutoAttack (protocol ``fixed_aa@N``, ADDT's fork of AutoAttack): per example, the lowest
fraction of correct purifications over its candidates: the clean input and the attack's result
(their N scoring purifications above), plus, when asked for, the attack's iterates ``candidates``
(indices into ``AttackResult.iterates``; the attack must return them, e.g.
``pgd(..., return_iterates=True)``) and the results of further attacks (``attack`` a sequence;
the first one is the attack the other protocols score). Extra candidate ``c`` is purified with
keys ``fold_in(fold_in(fold_in(k_i, 20), c), v)``; attack ``j >= 1`` runs with
``fold_in(fold_in(k_i, 21), j)``. Without extra candidates nothing is computed beyond the plain
evaluation.

An attack is any ``attack(model, x, y, key) -> AttackResult`` with ``model(x, key) -> logits``,
e.g. ``functools.partial(jaxrob.attacks.pgd, eps=0.3, num_steps=10)``. It is ``vmap``-ed over
examples: example ``i`` is attacked alone (as a batch of one)
with key ``fold_in(k_i, 1)``, and the keys the attack hands to ``model`` become that example's
purifier keys. The attack's random start, EoT noise and purifier noise of an example therefore
never depend on which other examples share its batch (vmap keeps the computation batched).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_images
from jaxrob._jit import filter_jit
from jaxrob._keys import example_keys
from jaxrob._types import DatasetImages, Images, Key, Keys, Labels, LogitsFn
from jaxrob.attacks._common import AttackResult, check_num_classes
from jaxrob.evaluation._protocols import (
    check_randomness,
    fixed_aa_score,
    parse_protocol,
    predictions,
    score_predictions,
    summarize,
)
from jaxrob.evaluation._runner import _host_array_like, run_chunks
from jaxrob.evaluation._store import ChunkStore
from jaxrob.parallel import DATA_AXIS

Model = LogitsFn
Attack = Callable[[Model, Images, Labels, Key], AttackResult]

_ATTACK, _CLEAN, _ADV, _FIXED = tags.ATTACK, tags.CLEAN, tags.ADV, tags.FIXED
_CANDIDATE, _ENSEMBLE = tags.CANDIDATE, tags.ENSEMBLE


def fixed_purifier_keys(key: Key, indices) -> Keys:
    """The purifier keys of ``randomness="fixed"``: ``fold_in(fold_in(key, index_i), 4)``.

    With these keys :func:`evaluate_robustness` attacks and scores example ``i`` (same
    ``key`` and global ``indices``), so a study of the same deterministic map (its Jacobian,
    its compression rate) can use exactly the function that was attacked. They are also the
    ``forward_key``s of ``randomness="forward_lock"``.

    Args:
      key: the evaluation's key.
      indices: (B,) global example indices.

    Returns:
      (B,) keys.
    """
    idx = jnp.asarray(indices)
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"indices: expected a 1-D integer array of example indices, got "
                         f"{idx.dtype} of shape {idx.shape}")
    return jax.vmap(lambda i: jr.fold_in(jr.fold_in(key, i), _FIXED))(idx)


def _fold_all(keys_B: Keys, data) -> Keys:
    return jax.vmap(lambda k: jr.fold_in(k, data))(keys_B)


def _check_labels(labels, indices, n: int, names=("labels", "indices")):
    """``(labels, indices)`` as NumPy arrays, after checking both are shaped (n,) and the labels
    are non-negative integers; ``names`` are how the error message calls them."""
    labels, indices = np.asarray(labels), np.asarray(indices)
    if labels.shape != (n,) or indices.shape != (n,):
        raise ValueError(f"{names[0]} and {names[1]}: expected shape ({n},), got "
                         f"{labels.shape} and {indices.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{names[0]}: expected non-negative integer class labels")
    return labels, indices


def _num_samples(protocols, randomness: str) -> int:
    """Purifications per example that score every protocol (1 in fixed mode)."""
    if isinstance(protocols, str):
        protocols = (protocols,)
    if not protocols:
        raise ValueError("protocols: expected at least one protocol")
    n = max(parse_protocol(p)[1] for p in protocols)
    return 1 if check_randomness(randomness) == "fixed" else n


def _as_attacks(attack) -> tuple | None:
    """None, or the attacks as a non-empty tuple (one callable or a sequence of them)."""
    if attack is None:
        return None
    attacks = tuple(attack) if isinstance(attack, list | tuple) else (attack,)
    if not attacks or not all(callable(a) for a in attacks):
        raise TypeError(f"attack: expected attack(model, x, y, key) -> AttackResult, a "
                        f"non-empty sequence of them, or None, got {attack!r}")
    return attacks


def _check_candidates(candidates, attacks, protocols) -> tuple[int, ...]:
    """The iterate indices to score as Fixed-AA candidates, checked (() when none)."""
    candidates = () if candidates is None else tuple(candidates)
    for c in candidates:
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0:
            raise ValueError(f"candidates: expected non-negative iterate indices (into "
                             f"AttackResult.iterates), got {candidates!r}")
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    extra = bool(candidates) or (attacks is not None and len(attacks) > 1)
    if extra and not any(parse_protocol(p)[0] == "fixed_aa" for p in protocols):
        raise ValueError("candidates / several attacks: only a 'fixed_aa@N' protocol scores "
                         f"extra candidates; add one to protocols={list(protocols)}")
    if candidates and attacks is None:
        raise ValueError("candidates: expected an attack whose iterates they index, got "
                         "attack=None")
    return tuple(int(c) for c in candidates)


def _check_splits(defended, randomness: str) -> None:
    if randomness == "forward_lock" and not getattr(defended, "splits_randomness", False):
        raise ValueError(
            "randomness='forward_lock': expected a defended model that takes forward_key= "
            "(a jaxrob.purify.DefendedModel around a jaxrob.purify.Purifier, whose forward and "
            f"reverse noise come from separate keys), got {_describe(defended)}")


def _describe(defended) -> str:
    pur = getattr(defended, "purifier", None)
    if pur is not None:
        return f"a {type(defended).__name__} around a {type(pur).__name__}"
    return f"{type(defended).__name__} {getattr(defended, '__name__', '')}".strip()


def _candidates_of(res: AttackResult, candidates: tuple[int, ...], final: bool):
    """(C, 1, H, W, C) candidate images of one example's attack result."""
    out = []
    if candidates:
        if res.iterates is None:
            raise ValueError("candidates: expected an attack that returns its iterates "
                             "(AttackResult.iterates, e.g. pgd(..., return_iterates=True)), "
                             "got iterates=None")
        num = res.iterates.shape[0]
        if max(candidates) >= num:
            raise ValueError(f"candidates: expected iterate indices below {num} (the attack "
                             f"returned {num} iterates), got {list(candidates)}")
        out.append(res.iterates[np.asarray(candidates)])
    if final:
        out.append(res.x_adv[None])
    return jnp.concatenate(out) if out else None


def robust_scores(defended: Model, attack: Attack | Sequence[Attack] | None, x: Images,
                  y: Labels, example_keys: Keys, *, protocols=("one_shot",),
                  randomness: str = "stochastic", vote_chunk: int | None = None,
                  candidates=None) -> dict:
    """Attack one batch and predict its clean and adversarial inputs (jit-able).

    Args:
      defended: ``defended(x, keys) -> logits`` with one purifier key per example, e.g.
        ``jaxrob.purify.purified_logits(logits_fn, purifier)``; an undefended classifier is
        ``lambda x, keys: logits_fn(x)``. ``randomness="forward_lock"`` also passes
        ``forward_key=`` (one key per example).
      attack: ``attack(model, x, y, key) -> AttackResult`` (None: clean evaluation only), or a
        sequence of them (Fixed-AA across attacks: the first one's result is ``x_adv``, the
        others' are extra ``fixed_aa`` candidates).
      x: images in [0, 1]; y: labels; example_keys: (B,) keys ``fold_in(key, index)``.
      protocols: the protocols to be scored (``one_shot``, ``majority_vote@N``,
        ``worst_of@N``, ``average@N``, ``fixed_aa@N``): enough purifications are made for
        all of them.
      randomness: ``stochastic``, ``fixed`` or ``forward_lock``.
      vote_chunk: purifications predicted at once.
      candidates: indices into every attack's ``AttackResult.iterates`` of the iterates that
        are extra ``fixed_aa`` candidates (None: none).

    Returns:
      ``{"pred_clean": (B, N), "pred_adv": (B, N), "x_adv", "linf": (B,), "l2": (B,)}``
      (without the adversarial entries when ``attack`` is None), and ``"pred_cand": (B, C, N)``
      when there are extra candidates; score them with :func:`score_record` (or
      :func:`jaxrob.evaluation.score_predictions`, transposed to (N, B)).
    """
    num = _num_samples(protocols, randomness)
    attacks = _as_attacks(attack)
    candidates = _check_candidates(candidates, attacks, protocols)
    _check_splits(defended, randomness)
    fixed, lock = randomness == "fixed", randomness == "forward_lock"
    fixed_B = _fold_all(example_keys, _FIXED)  # forward_lock: the forward noise's keys
    model = (lambda xx, _keys: defended(xx, fixed_B)) if fixed else defended

    def pred(xx, keys_B):  # (B, num) labels of num purifications keyed fold_in(keys_B[i], v)
        return predictions(model, xx, keys_B, num=num, chunk=vote_chunk,
                           forward_keys=fixed_B if lock else None).T

    out = {"pred_clean": pred(x, _fold_all(example_keys, _CLEAN))}
    if attacks is not None:
        def attack_one(x_i, y_i, k_i):
            k_fixed = jr.fold_in(k_i, _FIXED)[None]
            if fixed:
                model_i = lambda xx, _key: defended(xx, k_fixed)
            elif lock:
                model_i = lambda xx, key: defended(xx, key[None], forward_key=k_fixed)
            else:
                model_i = lambda xx, key: defended(xx, key[None])
            x_adv, cands = None, []
            for j, atk in enumerate(attacks):
                k_atk = (jr.fold_in(k_i, _ATTACK) if j == 0
                         else jr.fold_in(jr.fold_in(k_i, _ENSEMBLE), j))
                res = atk(model_i, x_i[None], y_i[None], k_atk)
                if not hasattr(res, "x_adv"):
                    raise TypeError(f"attack: expected an AttackResult, got "
                                    f"{type(res).__name__}")
                x_adv = res.x_adv[0] if j == 0 else x_adv
                c = _candidates_of(res, candidates, final=j > 0)
                if c is not None:
                    cands.append(c[:, 0])
            return x_adv, (jnp.concatenate(cands) if cands else None)

        x_adv, cands_BC = jax.vmap(attack_one)(x, y, example_keys)
        d = (x_adv - x).reshape(x.shape[0], -1)
        out.update(pred_adv=pred(x_adv, _fold_all(example_keys, _ADV)), x_adv=x_adv,
                   linf=jnp.max(jnp.abs(d), -1), l2=jnp.sqrt(jnp.sum(d * d, -1)))
        if cands_BC is not None:
            cand_keys = _fold_all(example_keys, _CANDIDATE)

            def score_candidate(args):
                x_c, c = args
                return pred(x_c, _fold_all(cand_keys, c))

            num_c = cands_BC.shape[1]
            out["pred_cand"] = jax.lax.map(
                score_candidate, (jnp.swapaxes(cands_BC, 0, 1),
                                  jnp.arange(num_c, dtype=jnp.uint32))).transpose(1, 0, 2)
    return out


def score_record(per_example: Mapping, protocols, randomness: str) -> dict:
    """Summaries (accuracy, 95% interval, count) per protocol of a per-example record.

    ``fixed_aa@N`` of the adversarial side is the per-example minimum over the clean input,
    ``x_adv`` and the extra candidates (``pred_cand``) of the fraction of correct purifications
    (:func:`jaxrob.evaluation.fixed_aa_score`); of the clean side, ``average@N``.
    """
    out = {}
    y = np.asarray(per_example["label"])
    for which in ("clean", "adv"):
        if f"pred_{which}" not in per_example:
            continue
        preds_NB = np.asarray(per_example[f"pred_{which}"]).T
        out[which] = {}
        for p in protocols:
            name, n = parse_protocol(p)
            # fixed randomness: every purification is the same one
            proto = "one_shot" if randomness == "fixed" else p
            if which == "adv" and name == "fixed_aa":
                stack = [np.asarray(per_example["pred_clean"]).T, preds_NB]
                if "pred_cand" in per_example:
                    stack += list(np.asarray(per_example["pred_cand"]).transpose(1, 2, 0))
                score = fixed_aa_score(np.stack(stack), y, 1 if randomness == "fixed" else n)
            else:
                score = score_predictions(preds_NB, y, proto)
            out[which][p] = summarize(score)
            per_example_key = f"{which}@{p}"
            if isinstance(per_example, dict):
                per_example[per_example_key] = score
    return out


def _robust_chunk(defended, attack, protocols, randomness, vote_chunk, candidates, batch,
                  keys):
    return robust_scores(defended, attack, batch["x"], batch["y"], keys, protocols=protocols,
                         randomness=randomness, vote_chunk=vote_chunk, candidates=candidates)


def evaluate_robustness(defended: Model, attack: Attack | Sequence[Attack] | None,
                        images: DatasetImages, labels: Labels, indices, *, key: Key,
                        protocols=("one_shot",),
                        randomness: str = "stochastic", batch_size: int = 64,
                        store: ChunkStore | None = None, mesh: jax.sharding.Mesh | None = None,
                        vote_chunk: int | None = None, keep_x_adv: bool = False,
                        progress: bool = True, log: Callable[[str], None] | None = None,
                        self_check: int = 4, candidates=None) -> dict:
    """Robust accuracy over a dataset, in resumable, sharded chunks of ``batch_size`` examples.

    The chunk function (attack + scoring) goes through :func:`run_chunks`: jitted once per
    defence architecture and attack, each chunk padded to ``batch_size`` and split over the
    ``data`` axis of ``mesh``, finished chunks written to ``store`` and skipped on rerun.
    Examples are keyed by their global ``indices``, so the per-example record does not depend
    on ``batch_size`` (a rerun with another one finishes the missing examples), the number of
    devices or restarts.

    Args:
      defended, attack, protocols, randomness, vote_chunk, candidates: as
        :func:`robust_scores`.
      images: (N, H, W, C) float32 in [0, 1] (an array, or a ``jaxrob.data.LazyImages``:
        each process then decodes only the rows it places); labels: (N,) ints.
      indices: (N,) global dataset indices of the examples (their keys).
      key: the run's key.
      batch_size: examples per chunk (a multiple of the mesh size).
      store: a :class:`ChunkStore` for resumable runs.
      mesh: device mesh (default: all devices); chunks are split over its ``data`` axis. A
        2-D ``(data, eot)`` mesh (``jaxrob.parallel.make_mesh(eot=E)``) given to the attack
        too (``pgd(..., eot_mesh=mesh)``) splits each example's EoT samples over ``eot``, so
        a batch smaller than the device count still uses every device; the record is the
        one-device record (per-example keys; up to the order of the EoT sum).
      keep_x_adv: also return the adversarial images.
      progress: show a progress bar with ETA.
      log: called with a line per finished chunk.
      self_check: recompute the first clean prediction of this many examples (the first of
        each device's share of the first chunk, then the last example) outside the chunk
        program, in a plain single-device jit, and compare (0: off). A guard against a
        miscompiled chunk program (docs/known_faults.md); its verdict is ``"self_check"``.

    Returns:
      ``{"clean": {protocol: summary}, "adv": {protocol: summary}, "per_example": {...},
      "randomness", "protocols", "candidates", "wall_s", "total_s", "chunks_run",
      "chunks_total", "self_check"}``; a summary holds accuracy, 95% interval and count;
      ``per_example`` the arrays ``index``, ``label``, ``pred_clean``/``pred_adv`` (B, N),
      ``linf``, ``l2``, ``seconds``, the per-protocol scores ``clean@P``/``adv@P`` [and
      ``x_adv``, and ``pred_cand`` (B, C, N) with extra Fixed-AA candidates]; ``total_s`` the
      compute seconds of the whole record (resumed chunks included), ``wall_s`` those of this
      call.
    """
    check_images(images, "images")
    n = images.shape[0]
    labels, indices = _check_labels(labels, indices, n)
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    _num_samples(protocols, randomness)
    if not callable(defended):
        raise TypeError(f"defended: expected a callable defended(x, keys) -> logits, got "
                        f"{type(defended).__name__}")
    attacks = _as_attacks(attack)
    attack = attacks if attacks is None or len(attacks) > 1 else attacks[0]
    candidates = _check_candidates(candidates, attacks, protocols)
    _check_splits(defended, randomness)
    # the number of classes, abstractly (one example; the labels are checked here)
    # abstractly: reading images[:1] would decode a row of a lazy dataset on every process
    k = check_num_classes(defended, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32),
                          labels[:1] * 0,
                          example_keys(key, indices[:1]))
    if labels.size and labels.max() >= k:
        raise ValueError(f"labels: expected labels in [0, {k}) for a model with {k} classes, "
                         f"got max {int(labels.max())}")

    def log_chunk(s, e, out):
        if log is None:
            return
        acc = lambda p: float((p[:, 0] == labels[s:e]).mean())
        log(f"chunk [{s}, {e}): one-shot clean {acc(out['pred_clean']):.3f}"
            + (f", adv {acc(out['pred_adv']):.3f}" if "pred_adv" in out else ""))

    run = run_chunks(
        _robust_chunk, {"x": host_images(images), "y": labels.astype(np.int32),
                        "index": indices},
        key=key, args=(defended, attack, protocols, randomness, vote_chunk, candidates),
        batch_size=batch_size, store=store, mesh=mesh, progress=progress,
        desc=f"robust eval ({randomness})",
        keep=lambda k: keep_x_adv or k != "x_adv", log=log_chunk)
    per = run.records
    per["label"] = labels
    ndev = (mesh.shape[DATA_AXIS] if mesh is not None else jax.device_count())
    check = _self_check(defended, images, labels, indices, per["pred_clean"][:, 0], key=key,
                        randomness=randomness, num=self_check,
                        stride=max(1, min(batch_size, n) // ndev))
    if check["mismatches"]:
        warnings.warn(f"evaluate_robustness: self-check failed: the chunk program's clean "
                      f"predictions differ from a single-device recomputation at examples "
                      f"{check['mismatches']} (docs/known_faults.md)", RuntimeWarning,
                      stacklevel=2)
    return {**score_record(per, protocols, randomness), "per_example": per,
            "randomness": randomness, "protocols": list(protocols),
            "candidates": list(candidates), "wall_s": run.wall_s, "total_s": run.total_s,
            "chunks_run": run.chunks_run, "chunks_total": run.chunks_total, "self_check": check}


def host_images(x):
    """``x`` as ``run_chunks`` data: a float32 host array-like that is read row by row as it
    is (a NumPy array, a memory map, a ``jaxrob.data.LazyImages`` that decodes only the rows a
    process reads), anything else (a JAX array) copied to a float32 NumPy array."""
    if _host_array_like(x) and np.dtype(x.dtype) == np.float32:
        return x
    return np.asarray(x, np.float32)


@filter_jit
def _recompute(defended, randomness, x, y, keys):
    out = robust_scores(defended, None, x, y, keys, protocols=("one_shot",),
                        randomness=randomness)
    return out["pred_clean"][:, 0]


def _self_check(defended, images, labels, indices, recorded, *, key, randomness, num: int,
                stride: int) -> dict:
    """Recompute the first clean prediction of a few examples in a plain single-device jit.

    Positions ``0, stride, 2 * stride, ...`` (the first example of each device's share of the
    first chunk, where XLA:CPU's concurrent-device fault struck) and the last one. Only the
    predicted label is compared: another program may round differently in the last bit,
    which can move a label only at an exact near-tie of two logits.
    """
    n = len(indices)
    if num <= 0:
        return {"checked": [], "agree": 0, "mismatches": []}
    first = list(range(0, n, stride))[: max(num - 1, 1)]
    pos = np.asarray(sorted(set(first) | {n - 1})[:num])
    device = jax.local_devices()[0]  # this process's own (jax.devices()[0] is process 0's)
    x = jax.device_put(np.asarray(images[pos], np.float32), device)
    keys = jax.device_put(example_keys(key, indices[pos]), device)
    y = jax.device_put(labels[pos].astype(np.int32), device)
    got = np.asarray(_recompute(defended, randomness, x, y, keys))
    want = np.asarray(recorded)[pos]
    bad = pos[got != want]
    return {"checked": [int(indices[p]) for p in pos], "agree": int((got == want).sum()),
            "mismatches": [int(indices[p]) for p in bad]}


def attack_nfe(purifier, *, iterations: int, restarts: int = 1, eot_samples: int = 1) -> int:
    """Network-function evaluations per image of a gradient attack through ``purifier``.

    Every iteration (and the final evaluation: ``iterations + 1``) of every restart runs
    ``eot_samples`` purifications forward and, for the gradient, the purifier's backward
    (``purifier.nfe_backward``: recomputation + VJP, 0 for BPDA). 0 without a purifier or
    without iterations.
    """
    if purifier is None or not iterations:
        return 0
    return ((int(iterations) + 1) * int(restarts) * int(eot_samples)
            * (int(purifier.nfe) + int(purifier.nfe_backward)))
