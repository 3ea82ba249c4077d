"""Scoring a randomised defence under a named protocol, and confidence intervals.

The same DiffPure model has published robust accuracies from ~71% to ~17% depending on how the
randomised defence is scored (../ANCHORS.md section 15), so the protocol is a required, recorded
argument:

* ``one_shot``: one purification of the (adversarial) input; correct or not;
* ``majority_vote@N``: the class most often predicted over N purifications (Lee & Kim);
* ``worst_of@N``: correct only if all N purifications are classified correctly (the attacker
  wins if any resubmission succeeds; DiffHammer / DiffBreak "Wor.Rob");
* ``average@N``: the fraction of the N purifications classified correctly ("fuzzy"
  robustness) of the one adversarial input;
* ``fixed_aa@N``: ADDT's Fixed-AutoAttack: every candidate input -- the clean input, the
  attack's result, and any further candidates (attack iterates, other attacks' results) -- is
  purified N times (the reference's ``eval_iter``, 20); an example's score is the lowest
  fraction of correctly classified purifications over its candidates. With the clean input and
  the attack's result alone it is ``min(average@N(clean), average@N(adv))`` on the same
  purifications as the other protocols.

Purification ``v`` of example ``i`` uses ``fold_in(fold_in(key, i), v)``, so scores do not
depend on batch size, chunking or device count.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from jaxrob._types import Array, Images, Keys, Labels, LogitsFn, PerExample

PROTOCOLS = ("one_shot", "majority_vote", "worst_of", "average", "fixed_aa")
RANDOMNESS = ("stochastic", "fixed", "forward_lock")

DefendedLogits = LogitsFn


def parse_protocol(protocol: str) -> tuple[str, int]:
    """``"worst_of@10"`` -> ``("worst_of", 10)``; ``"one_shot"`` -> ``("one_shot", 1)``."""
    m = re.fullmatch(r"([a-z_]+)(?:@(\d+))?", str(protocol))
    name, n = (m.group(1), m.group(2)) if m else (None, None)
    if name not in PROTOCOLS or (name == "one_shot") != (n is None) or (n is not None
                                                                         and int(n) < 1):
        raise ValueError(f"protocol: expected 'one_shot', 'majority_vote@N', 'worst_of@N', "
                         f"'average@N' or 'fixed_aa@N' with N >= 1, got {protocol!r}")
    return name, 1 if n is None else int(n)


def check_randomness(randomness: str) -> str:
    """``randomness`` if it names a mode of :data:`RANDOMNESS` (``stochastic``: fresh purifier
    noise everywhere; ``fixed``: one purifier key per example for attack and scoring;
    ``forward_lock``: the forward noise fixed per example, the reverse noise fresh)."""
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness: expected one of {list(RANDOMNESS)}, got {randomness!r}")
    return randomness


def sample_keys(example_keys: Keys, num: int) -> Array:
    """(num, B) keys: ``fold_in(example_keys[i], v)`` for v < num."""
    return jax.vmap(lambda v: jax.vmap(lambda k: jr.fold_in(k, v))(example_keys))(
        jnp.arange(num))


def predictions(defended: DefendedLogits, x: Images, example_keys: Keys, *, num: int,
                chunk: int | None = None, forward_keys: Keys | None = None) -> Array:
    """(num, B) predicted labels of ``num`` purifications (sample ``v`` uses
    ``fold_in(example_keys[i], v)``), computed ``chunk`` purifications at a time.

    With ``forward_keys`` ((B,), randomness="forward_lock") every purification of example ``i``
    gets ``forward_key=forward_keys[i]`` (its forward noise fixed, its reverse noise fresh).

    Each step calls ``defended`` once on ``B * c`` inputs ordered example-major (row
    ``i * c + v``: example ``i``, purification ``v``), so when ``x`` is split over a mesh's
    ``data`` axis every device purifies only its own examples. (Sample-major order, a map over
    purifications outside the per-example batch, merges a (c, B) batch whose sharded axis is
    the minor one: the partitioner then gathered the whole batch onto every device, purified it
    there and sliced its share back -- the work times the device count, and collectives in the
    chunk program that XLA:CPU miscompiled with its YNNPACK fusions off; docs/known_faults.md.)
    """
    chunk = num if chunk is None else max(1, min(int(chunk), num))
    keys_NB = sample_keys(example_keys, num)
    b = x.shape[0]

    def step(keys_CB):  # (c, B) keys -> (c, B) labels
        c = keys_CB.shape[0]
        keys = keys_CB.T.reshape(b * c)
        if forward_keys is None:
            logits = defended(jnp.repeat(x, c, axis=0), keys)
        else:
            logits = defended(jnp.repeat(x, c, axis=0), keys,
                              forward_key=jnp.repeat(forward_keys, c, axis=0))
        return jnp.argmax(logits, -1).astype(jnp.int32).reshape(b, c).T

    full, rest = divmod(num, chunk)
    parts = []
    if full:
        keys_SCB = keys_NB[: full * chunk].reshape(full, chunk, b)
        parts.append(jax.lax.map(step, keys_SCB).reshape(full * chunk, b))
    if rest:
        parts.append(step(keys_NB[full * chunk:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def score_predictions(preds_NB: Array, y: Labels, protocol: str, *,
                      num_classes: int | None = None) -> PerExample:
    """Per-example score under ``protocol`` from (N', B) predictions with N' >= N.

    ``X@N`` uses the first N rows, ``one_shot`` the first row, so one set of purifications
    scores every protocol consistently. Works on jax and numpy arrays. ``fixed_aa@N`` of one
    input is its ``average@N`` (the minimum over candidates: :func:`fixed_aa_score`).
    """
    name, n = parse_protocol(protocol)
    xp = np if isinstance(preds_NB, np.ndarray) else jnp
    if preds_NB.shape[0] < n:
        raise ValueError(f"protocol {protocol!r} needs {n} purifications per example, got "
                         f"{preds_NB.shape[0]}")
    preds_NB = preds_NB[:n]
    correct_NB = preds_NB == y[None, :]
    if name == "one_shot":
        score = correct_NB[0]
    elif name == "worst_of":
        score = xp.all(correct_NB, axis=0)
    elif name in ("average", "fixed_aa"):
        score = xp.mean(correct_NB, axis=0)
    else:  # majority vote; ties go to the lowest class index
        k = int(num_classes or int(preds_NB.max()) + 1)
        votes_BK = (preds_NB[:, :, None] == xp.arange(k)[None, None, :]).sum(0)
        score = xp.argmax(votes_BK, -1) == y
    return score.astype(xp.float32)


def fixed_aa_score(preds_CNB: Array, y: Labels, eval_iter: int) -> PerExample:
    """ADDT's Fixed-AutoAttack score: per example, the lowest fraction of correct purifications
    over its candidates.

    Args:
      preds_CNB: (C, N', B) predicted labels of N' >= ``eval_iter`` purifications of C
        candidate inputs per example (the clean input, the attack's result, iterates, other
        attacks' results); the first ``eval_iter`` purifications are used.
      y: (B,) true labels.
      eval_iter: purifications per candidate (the reference's ``eval_iter``, 20).

    Returns:
      (B,) float32 ``min_c mean_{v < eval_iter} [preds[c, v] == y]``; its mean is the
      reported robust accuracy.

    References:
      Liu et al. Towards Understanding the Robustness of Diffusion-Based Purification: A
      Stochastic Perspective. ICLR 2025 (Fixed-AutoAttack/autoattack/autoattack.py).
    """
    if isinstance(eval_iter, bool) or not isinstance(eval_iter, int | np.integer) \
            or eval_iter < 1:
        raise ValueError(f"eval_iter: expected an integer >= 1 (purifications per candidate), "
                         f"got {eval_iter!r}")
    if preds_CNB.ndim != 3 or preds_CNB.shape[0] < 1:
        raise ValueError(f"preds_CNB: expected (candidates >= 1, purifications, batch) "
                         f"predictions, got shape {preds_CNB.shape}")
    if preds_CNB.shape[1] < eval_iter:
        raise ValueError(f"eval_iter={eval_iter} needs {eval_iter} purifications per candidate, "
                         f"got {preds_CNB.shape[1]}")
    xp = np if isinstance(preds_CNB, np.ndarray) else jnp
    correct_CNB = preds_CNB[:, :eval_iter] == y[None, None, :]
    return xp.min(xp.mean(correct_CNB, axis=1), axis=0).astype(xp.float32)


def protocol_scores(defended: DefendedLogits, x: Images, y: Labels, example_keys: Keys, *,
                    protocol: str, chunk: int | None = None,
                    forward_keys: Keys | None = None) -> tuple[PerExample, jax.Array]:
    """Per-example score of a defended classifier under ``protocol``.

    Args:
      defended: ``defended(x, keys) -> logits`` with one key per example (e.g.
        ``purified_logits(logits_fn, purifier)``).
      x: images in [0, 1].
      y: true labels.
      example_keys: (B,) per-example keys (``jaxrob.purify.example_keys``).
      protocol: a name of :data:`PROTOCOLS` (``"one_shot"``, ``"worst_of@10"``, ...).
      chunk: purifications evaluated at once (``lax.map`` batch size; default all N).
      forward_keys: (B,) forward-noise keys held fixed over the N purifications (as
        :func:`predictions`), or None.

    Returns:
      ``(score, correct)``: (B,) float32 scores in [0, 1] (0/1 except for ``average@N``) and the
      (N, B) bool matrix of per-purification correctness.
    """
    _, n = parse_protocol(protocol)
    num_classes = jax.eval_shape(defended, x, example_keys).shape[-1]
    preds_NB = predictions(defended, x, example_keys, num=n, chunk=chunk,
                           forward_keys=forward_keys)
    return (score_predictions(preds_NB, y, protocol, num_classes=num_classes),
            preds_NB == y[None, :])


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``successes`` of ``total``)."""
    if total <= 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(scores, z: float = 1.96) -> tuple[float, float]:
    """95% interval of the mean of per-example scores in [0, 1].

    0/1 scores get the Wilson interval; fractional scores (``average@N``) a normal interval
    on the sample standard error, clipped to [0, 1].
    """
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return (0.0, 1.0)
    if np.all((s == 0) | (s == 1)):
        return wilson_interval(float(s.sum()), int(s.size), z)
    half = z * s.std(ddof=1) / math.sqrt(s.size) if s.size > 1 else 1.0
    return (max(0.0, float(s.mean() - half)), min(1.0, float(s.mean() + half)))


def summarize(scores) -> dict:
    """``{"accuracy", "ci95", "num_images"}`` of per-example scores."""
    s = np.asarray(scores, np.float64)
    return {"accuracy": float(s.mean()) if s.size else float("nan"),
            "ci95": list(mean_interval(s)), "num_images": int(s.size)}
