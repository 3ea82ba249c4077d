"""Robust accuracy of a (randomised) defence under an adaptive attack and a named protocol.

Randomness, per example ``i`` with ``k_i = fold_in(key, index_i)``:

* ``stochastic``: the attack sees fresh purifier noise at every EoT sample and iteration
  (derived from ``fold_in(k_i, 1)``), and the final scoring uses independent noise
  (``fold_in(k_i, 2)`` for the clean and ``fold_in(k_i, 3)`` for the adversarial input);
* ``fixed`` (the deterministic white-box / "DW-box" setting): one purifier key per example,
  ``fold_in(k_i, 4)``, is used by every attack step AND by the scoring, so the defence is a
  deterministic function that the attacker knows exactly. Every protocol then reduces to
  ``one_shot`` (all N purifications are the same).

An attack is any ``attack(model, x, y, key) -> AttackResult`` with ``model(x, key) -> logits``,
e.g. ``functools.partial(jaxrob.attacks.pgd, eps=0.3, num_steps=10)``. It is ``vmap``-ed over
examples: example ``i`` is attacked alone (as a batch of one)
with key ``fold_in(k_i, 1)``, and the keys the attack hands to ``model`` become that example's
purifier keys. The attack's random start, EoT noise and purifier noise of an example therefore
never depend on which other examples share its batch (vmap keeps the computation batched).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from jaxrob._checks import check_images
from jaxrob._jit import filter_jit
from jaxrob._keys import example_keys
from jaxrob._types import Images, Key, Keys, Labels, LogitsFn
from jaxrob.attacks._common import AttackResult, check_num_classes
from jaxrob.evaluation._protocols import (
    check_randomness,
    parse_protocol,
    predictions,
    score_predictions,
    summarize,
)
from jaxrob.evaluation._runner import run_chunks
from jaxrob.evaluation._store import ChunkStore
from jaxrob.parallel import DATA_AXIS

Model = LogitsFn
Attack = Callable[[Model, Images, Labels, Key], AttackResult]

_ATTACK, _CLEAN, _ADV, _FIXED = tags.ATTACK, tags.CLEAN, tags.ADV, tags.FIXED


def fixed_purifier_keys(key: Key, indices) -> Keys:
    """The purifier keys of ``randomness="fixed"``: ``fold_in(fold_in(key, index_i), 4)``.

    With these keys :func:`evaluate_robustness` attacks and scores example ``i`` (same
    ``key`` and global ``indices``), so a study of the same deterministic map (its Jacobian,
    its compression rate) can use exactly the function that was attacked.

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


def _num_samples(protocols, randomness: str) -> int:
    """Purifications per example that score every protocol (1 in fixed mode)."""
    if isinstance(protocols, str):
        protocols = (protocols,)
    if not protocols:
        raise ValueError("protocols: expected at least one protocol")
    n = max(parse_protocol(p)[1] for p in protocols)
    return 1 if check_randomness(randomness) == "fixed" else n


def robust_scores(defended: Model, attack: Attack | None, x: Images, y: Labels,
                  example_keys: Keys, *, protocols=("one_shot",),
                  randomness: str = "stochastic", vote_chunk: int | None = None) -> dict:
    """Attack one batch and predict its clean and adversarial inputs (jit-able).

    Args:
      defended: ``defended(x, keys) -> logits`` with one purifier key per example, e.g.
        ``jaxrob.purify.purified_logits(logits_fn, purifier)``; an undefended classifier is
        ``lambda x, keys: logits_fn(x)``.
      attack: ``attack(model, x, y, key) -> AttackResult`` (None: clean evaluation only).
      x: images in [0, 1]; y: labels; example_keys: (B,) keys ``fold_in(key, index)``.
      protocols: the protocols to be scored (``one_shot``, ``majority_vote@N``,
        ``worst_of@N``, ``average@N``): enough purifications are made for all of them.
      randomness: ``stochastic`` or ``fixed``.
      vote_chunk: purifications predicted at once.

    Returns:
      ``{"pred_clean": (B, N), "pred_adv": (B, N), "x_adv", "linf": (B,), "l2": (B,)}``
      (without the adversarial entries when ``attack`` is None); score them with
      :func:`jaxrob.evaluation.score_predictions` (transpose to (N, B)).
    """
    num = _num_samples(protocols, randomness)
    fixed = randomness == "fixed"
    model = (lambda xx, _keys: defended(xx, _fold_all(example_keys, _FIXED))) if fixed \
        else defended
    pred = lambda xx, tag: predictions(model, xx, _fold_all(example_keys, tag), num=num,
                                       chunk=vote_chunk).T
    out = {"pred_clean": pred(x, _CLEAN)}
    if attack is not None:
        def attack_one(x_i, y_i, k_i):
            if fixed:
                k_fixed = jr.fold_in(k_i, _FIXED)[None]
                model_i = lambda xx, _key: defended(xx, k_fixed)
            else:
                model_i = lambda xx, key: defended(xx, key[None])
            res = attack(model_i, x_i[None], y_i[None], jr.fold_in(k_i, _ATTACK))
            if not hasattr(res, "x_adv"):
                raise TypeError(f"attack: expected an AttackResult, got {type(res).__name__}")
            return res.x_adv[0]

        x_adv = jax.vmap(attack_one)(x, y, example_keys)
        d = (x_adv - x).reshape(x.shape[0], -1)
        out.update(pred_adv=pred(x_adv, _ADV), x_adv=x_adv, linf=jnp.max(jnp.abs(d), -1),
                   l2=jnp.sqrt(jnp.sum(d * d, -1)))
    return out


def score_record(per_example: Mapping, protocols, randomness: str) -> dict:
    """Summaries (accuracy, 95% interval, count) per protocol of a per-example record."""
    out = {}
    for which in ("clean", "adv"):
        if f"pred_{which}" not in per_example:
            continue
        preds_NB = np.asarray(per_example[f"pred_{which}"]).T
        y = np.asarray(per_example["label"])
        out[which] = {}
        for p in protocols:
            # fixed randomness: every purification is the same one
            proto = "one_shot" if randomness == "fixed" else p
            score = score_predictions(preds_NB, y, proto)
            out[which][p] = summarize(score)
            per_example_key = f"{which}@{p}"
            if isinstance(per_example, dict):
                per_example[per_example_key] = score
    return out


def _robust_chunk(defended, attack, protocols, randomness, vote_chunk, batch, keys):
    out = robust_scores(defended, attack, batch["x"], batch["y"], keys, protocols=protocols,
                        randomness=randomness, vote_chunk=vote_chunk)
    return out


def evaluate_robustness(defended: Model, attack: Attack | None, images: Images, labels: Labels,
                        indices, *, key: Key, protocols=("one_shot",),
                        randomness: str = "stochastic", batch_size: int = 64,
                        store: ChunkStore | None = None, mesh: jax.sharding.Mesh | None = None,
                        vote_chunk: int | None = None, keep_x_adv: bool = False,
                        progress: bool = True, log: Callable[[str], None] | None = None,
                        self_check: int = 4) -> dict:
    """Robust accuracy over a dataset, in resumable, sharded chunks of ``batch_size`` examples.

    The chunk function (attack + scoring) goes through :func:`run_chunks`: jitted once per
    defence architecture and attack, each chunk padded to ``batch_size`` and split over the
    ``data`` axis of ``mesh``, finished chunks written to ``store`` and skipped on rerun.
    Examples are keyed by their global ``indices``, so the per-example record does not depend
    on ``batch_size`` (a rerun with another one finishes the missing examples), the number of
    devices or restarts.

    Args:
      defended, attack, protocols, randomness, vote_chunk: as :func:`robust_scores`.
      images: (N, H, W, C) float32 in [0, 1]; labels: (N,) ints.
      indices: (N,) global dataset indices of the examples (their keys).
      key: the run's key.
      batch_size: examples per chunk (a multiple of the mesh size).
      store: a :class:`ChunkStore` for resumable runs.
      mesh: device mesh (default: all devices).
      keep_x_adv: also return the adversarial images.
      progress: show a progress bar with ETA.
      log: called with a line per finished chunk.
      self_check: recompute the first clean prediction of this many examples (the first of
        each device's share of the first chunk, then the last example) outside the chunk
        program, in a plain single-device jit, and compare (0: off). A guard against a
        miscompiled chunk program (docs/known_faults.md); its verdict is ``"self_check"``.

    Returns:
      ``{"clean": {protocol: summary}, "adv": {protocol: summary}, "per_example": {...},
      "wall_s", "total_s", "chunks_run", "chunks_total", "self_check"}``; a summary holds
      accuracy, 95% interval and count; ``per_example`` the arrays ``index``, ``label``,
      ``pred_clean``/``pred_adv`` (B, N), ``linf``, ``l2``, ``seconds``, the per-protocol
      scores ``clean@P``/``adv@P`` [and ``x_adv``]; ``total_s`` the compute seconds of the
      whole record (resumed chunks included), ``wall_s`` those of this call.
    """
    check_images(images, "images")
    labels = np.asarray(labels)
    indices = np.asarray(indices)
    n = images.shape[0]
    if labels.shape != (n,) or indices.shape != (n,):
        raise ValueError(f"labels and indices: expected shape ({n},), got {labels.shape} and "
                         f"{indices.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError("labels: expected non-negative integer class labels")
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    _num_samples(protocols, randomness)
    if not callable(defended):
        raise TypeError(f"defended: expected a callable defended(x, keys) -> logits, got "
                        f"{type(defended).__name__}")
    if attack is not None and not callable(attack):
        raise TypeError(f"attack: expected attack(model, x, y, key) -> AttackResult or None, "
                        f"got {type(attack).__name__}")
    # the number of classes, abstractly (one example; the labels are checked here)
    k = check_num_classes(defended, jnp.asarray(images[:1]), labels[:1] * 0,
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
        _robust_chunk, {"x": np.asarray(images, np.float32), "y": labels.astype(np.int32),
                        "index": indices},
        key=key, args=(defended, attack, protocols, randomness, vote_chunk),
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
            "wall_s": run.wall_s, "total_s": run.total_s, "chunks_run": run.chunks_run,
            "chunks_total": run.chunks_total, "self_check": check}


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
    device = jax.devices()[0]
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
