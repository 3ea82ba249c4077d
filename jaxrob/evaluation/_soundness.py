"""Soundness checks of a robustness evaluation: is the attack doing its job on this defence?

A robust accuracy is only an upper bound: an attack that is too weak, or whose gradients the
defence masks, reports robustness that is not there. :func:`soundness_checks` runs, on a few
images, the cheap checks of Carlini et al.'s checklist and AutoAttack's warnings, each with a
verdict (``pass`` / ``fail`` / ``inconclusive``), the numbers behind it and its wall time:

* ``large_eps``: at a large radius (Linf 0.5 by default) the attack must drive the robust
  accuracy to about 0 (at most ``large_eps_accuracy``); if it cannot, the attack is broken or
  the gradients are masked.
* ``iterations``: ``factor`` x the iterations (and, for a randomised model attacked with fresh
  noise, ``eot_factor`` x the EoT samples) at the base step size must land inside the base
  run's 95% interval. Above it, more attack effort *helped the defence* (a broken attack);
  below it, the base attack has not converged.
* ``gradient_free``: Square (no gradients) must not be much stronger than the gradient attack
  (its accuracy below the gradient attack's interval: gradients are masked).
* ``transfer``: the attack run on the bare classifier (no purifier) and its result scored on the
  defence must not be stronger than the adaptive attack (below its interval: the adaptive
  attack does not use the defence's gradients well).
* ``flags`` (AutoAttack's checks): the model looks randomised (logits depend on the key) while
  the evaluation is deterministic (no EoT, or fixed randomness); the robust accuracy
  re-measured on ``x_adv`` with new purifier noise agrees with the recorded one; ``x_adv``
  lies in the eps-ball and in [0, 1]; the outputs are logits, not probabilities.

Where a stronger / other attack's accuracy lies between the base run's point estimate and the
edge of its interval, the verdict is ``inconclusive``: more images would tell.

Keys: example ``i`` has ``k_i = fold_in(key, index_i)``; each run of a check evaluates on
``fold_in(k_i, SOUND_<run>)`` (tags 60..65 of :mod:`jaxrob._keys`) exactly as
:func:`jaxrob.evaluation.evaluate_robustness` does on ``k_i``, so the checks can share the main
evaluation's key without reusing any of its noise. Under ``fixed`` (DW-box) and
``forward_lock`` randomness the key *is* the model under attack (its fixed noise), so there
every attack run uses the base run's tag (``SOUND_BASE``): the large-eps, stronger, Square and
transfer attacks face the very fixed-noise purifier the base attack faced, and their
per-example comparisons (``broken_only_by_*``) are paired. (With a tag per run, a DW-box check
would compare attacks on different deterministic models.) ``settings["keys"]`` records which.

References:
  Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry & Kurakin, "On
  Evaluating Adversarial Robustness", arXiv:1902.06705 (2019), section 5 / appendix checklist;
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020 (github.com/fra31/auto-attack, ``checks.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import jaxrob._keys as tags
from jaxrob._checks import check_images, check_positive_int
from jaxrob._jit import filter_jit
from jaxrob._keys import example_keys
from jaxrob._types import DatasetImages, Key, Labels
from jaxrob.attacks import apgd, pgd, square
from jaxrob.attacks._common import check_num_classes, check_scalar
from jaxrob.evaluation._protocols import check_randomness, parse_protocol
from jaxrob.evaluation._robust import Model, _check_splits, _fold_all, robust_scores, score_record
from jaxrob.evaluation._runner import run_chunks
from jaxrob.parallel import DATA_AXIS, make_mesh

CHECKS = ("large_eps", "iterations", "gradient_free", "transfer", "flags")
SOUNDNESS_ATTACKS = ("pgd", "apgd")
VERDICTS = ("pass", "fail", "inconclusive")
_PROBE_CALLS = 5  # AutoAttack's check_randomized calls the model five times
_RANDOMISED_TOL = 1e-4  # largest L2 distance of unit-normalised logits of a deterministic model


# --------------------------------------------------------------------------------------------
# Runs: every one goes through the chunk runner with the check's tag folded into k_i.


def _sound_chunk(defended, attack, protocols, randomness, vote_chunk, tag, batch, keys):
    return robust_scores(defended, attack, batch["x"], batch["y"], _fold_all(keys, tag),
                         protocols=protocols, randomness=randomness, vote_chunk=vote_chunk)


def _transfer(bare, attack, model, x, y, key):
    """Attack ``bare`` instead of the defended ``model`` (scored on the defence afterwards)."""
    del model
    return attack(bare, x, y, key)


@filter_jit
def _probe(defended, x, keys):
    """(calls, B, K) logits of ``_PROBE_CALLS`` calls, call j keyed ``fold_in(keys[i], j)``."""
    return jax.lax.map(lambda j: defended(x, _fold_all(keys, j)),
                       jnp.arange(_PROBE_CALLS, dtype=jnp.uint32))


def _gradient_attack(name, *, eps, norm, num_steps, step_size, eot_samples, loss, random_start,
                     num_restarts):
    kw = dict(eps=jnp.asarray(eps, jnp.float32), norm=norm, num_steps=int(num_steps), loss=loss,
              random_start=bool(random_start), num_restarts=int(num_restarts),
              eot_samples=int(eot_samples))
    if name == "pgd":
        kw["step_size"] = None if step_size is None else jnp.asarray(step_size, jnp.float32)
        return Partial(pgd, **kw)
    return Partial(apgd, **kw)


def _summary_fields(s: dict) -> dict:
    return {"accuracy": float(s["accuracy"]), "ci95": [float(v) for v in s["ci95"]],
            "num_images": int(s["num_images"])}


def _compare(value: float, ref: dict) -> str:
    """``"above"`` / ``"inside"`` / ``"below"`` ``ref``'s 95% interval."""
    lo, hi = ref["ci95"]
    if value > hi + 1e-12:
        return "above"
    if value < lo - 1e-12:
        return "below"
    return "inside"


def _worst(verdicts) -> str:
    verdicts = list(verdicts)
    if "fail" in verdicts:
        return "fail"
    if "inconclusive" in verdicts:
        return "inconclusive"
    return "pass"


def _bare_of(defended):
    """The defended model's classifier without its purifier (None when it has none)."""
    classifier = getattr(defended, "classifier", None)
    if classifier is None or not hasattr(defended, "purifier"):
        return None
    from jaxrob.purify import DefendedModel

    return DefendedModel(classifier, None)


# --------------------------------------------------------------------------------------------


def soundness_checks(defended: Model, x: DatasetImages, y: Labels, indices, *, key: Key,
                     eps: float, norm: str = "linf", attack: str = "pgd", num_steps: int = 10,
                     step_size: float | None = None, eot_samples: int = 1, loss: str = "ce",
                     random_start: bool | None = None, num_restarts: int = 1,
                     checks: Sequence[str] | None = None, randomness: str = "stochastic",
                     protocol: str = "one_shot", large_eps: float | None = None,
                     large_eps_accuracy: float = 0.1, factor: int = 4,
                     eot_factor: int | None = None, square_queries: int = 1000,
                     bare: Model | None = None, batch_size: int | None = None,
                     mesh: jax.sharding.Mesh | None = None, vote_chunk: int | None = None,
                     progress: bool = False,
                     log: Callable[[str], None] | None = None) -> dict:
    """Run the soundness checks of an evaluation of ``defended`` on a few images.

    See the module docstring for the checks and their verdicts. The base attack (``attack`` at
    ``eps`` with ``num_steps`` iterations and ``eot_samples`` EoT samples) is run once and
    shared by the checks that compare against it; every run is scored by ``protocol`` under
    ``randomness`` as :func:`jaxrob.evaluation.evaluate_robustness` scores it.

    Args:
      defended: ``defended(x, keys) -> logits`` with one key per example (a
        :class:`jaxrob.purify.DefendedModel`, or any such function).
      x: (N, H, W, C) float32 images in [0, 1]; y: (N,) labels; indices: (N,) global example
        indices (their keys).
      key: the run's key (it may be the main evaluation's: the checks fold their own tags).
      eps: the threat model's radius (> 0).
      norm: ``"linf"`` or ``"l2"``.
      attack: the gradient attack, ``"pgd"`` or ``"apgd"``.
      num_steps, step_size, eot_samples, loss, random_start, num_restarts: its options
        (``step_size`` None: PGD's ``2.5 eps / num_steps``; ``random_start`` None: PGD off,
        APGD on).
      checks: the checks to run, a subset of :data:`CHECKS` (None: all; ``transfer`` is then
        ``inconclusive`` when no bare classifier is known).
      randomness: ``stochastic``, ``fixed`` or ``forward_lock`` (as the evaluation checked;
        under the last two every check attacks the base run's fixed-noise model).
      protocol: the protocol every verdict compares (``one_shot``, ``worst_of@N``, ...).
      large_eps: the radius of ``large_eps`` (None: 0.5 for Linf, ``0.5 sqrt(H W C)`` for L2,
        the L2 ball holding the Linf 0.5 ball); a user ``step_size`` is scaled with it.
      large_eps_accuracy: the robust accuracy at ``large_eps`` that passes (0.1): above it with
        its whole interval fails, between is inconclusive.
      factor: iterations of the stronger run, as a multiple of ``num_steps`` (>= 2).
      eot_factor: EoT multiple of the stronger run when the model looks randomised and is
        attacked with fresh noise (None: ``factor``).
      square_queries: Square's query budget per image.
      bare: the classifier without the defence, ``bare(x, key) -> logits`` (None: the
        ``classifier`` of a :class:`jaxrob.purify.DefendedModel`).
      batch_size: examples per chunk (None: all N in one chunk, rounded up to the mesh size,
        at most 64).
      mesh: device mesh (default: all devices).
      vote_chunk: purifications predicted at once.
      progress: progress bars of the runs.
      log: called with one line per finished check.

    Returns:
      A JSON-serialisable dict: ``"verdict"`` (the worst of the checks'), ``"verdicts"``
      ``{check: verdict}``, ``"checks"`` ``{check: {"verdict", "reason", numbers...,
      "wall_s"}}``, ``"base"`` (the base attack's clean and robust accuracy, its wall time),
      ``"probe"`` (the randomness probe), ``"settings"``, ``"num_images"``, ``"indices"``,
      ``"wall_s"``. Accuracies are ``{"accuracy", "ci95", "num_images"}`` summaries; wall
      times include compilation.

    Raises:
      ValueError: before any work: an unknown check, attack, norm, protocol or randomness mode;
        ``eps <= 0``, ``large_eps <= eps``, ``large_eps_accuracy`` outside [0, 1),
        ``factor < 2``, non-positive counts; bad images, labels or indices; ``"transfer"``
        asked for without a bare classifier.
    """
    t_start = time.perf_counter()
    if checks is None:
        selected = CHECKS
    else:
        if isinstance(checks, str):
            checks = (checks,)
        selected = tuple(checks)
        unknown = [c for c in selected if c not in CHECKS]
        if unknown or not selected or len(set(selected)) != len(selected):
            raise ValueError(f"checks: expected distinct names from {list(CHECKS)}, got "
                             f"{list(selected)}")
    if attack not in SOUNDNESS_ATTACKS:
        raise ValueError(f"attack: expected one of {list(SOUNDNESS_ATTACKS)}, got {attack!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm: expected 'linf' or 'l2', got {norm!r}")
    check_scalar(eps, "eps", positive=True)
    eps = float(eps)
    check_images(x, "x")
    n = x.shape[0]
    labels, indices = np.asarray(y), np.asarray(indices)
    if labels.shape != (n,) or indices.shape != (n,) or n == 0:
        raise ValueError(f"y and indices: expected shape ({n},) with N >= 1, got {labels.shape} "
                         f"and {indices.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("y: expected non-negative integer class labels")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices: expected integer example indices, got {indices.dtype}")
    num_steps = check_positive_int(num_steps, "num_steps")
    eot_samples = check_positive_int(eot_samples, "eot_samples")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    factor = check_positive_int(factor, "factor")
    if factor < 2:
        raise ValueError(f"factor: expected an integer >= 2 (the stronger run's iterations as "
                         f"a multiple of num_steps), got {factor}")
    eot_factor = factor if eot_factor is None else check_positive_int(eot_factor, "eot_factor")
    square_queries = check_positive_int(square_queries, "square_queries")
    if step_size is not None:
        check_scalar(step_size, "step_size", positive=True)
        step_size = float(step_size)
    dim = int(np.prod(x.shape[1:]))
    if large_eps is not None:
        check_scalar(large_eps, "large_eps", positive=True)
    large = (0.5 if norm == "linf" else 0.5 * math.sqrt(dim)) if large_eps is None else float(
        large_eps)
    if large <= eps:
        raise ValueError(f"large_eps: expected a radius above eps={eps}, got {large}")
    if not 0.0 <= float(large_eps_accuracy) < 1.0:
        raise ValueError(f"large_eps_accuracy: expected a fraction in [0, 1), got "
                         f"{large_eps_accuracy!r}")
    parse_protocol(protocol)
    check_randomness(randomness)
    _check_splits(defended, randomness)
    if bare is None:
        bare = _bare_of(defended)
    elif not callable(bare):
        raise TypeError(f"bare: expected a callable bare(x, key) -> logits, got "
                        f"{type(bare).__name__}")
    if bare is None and checks is not None and "transfer" in selected:
        raise ValueError("checks: 'transfer' needs the bare classifier: pass bare=, or a "
                         "jaxrob.purify.DefendedModel (its classifier is used)")
    if random_start is None:
        random_start = attack == "apgd"
    check_num_classes(defended, jnp.asarray(x[:1]), labels[:1],
                      example_keys(key, indices[:1]))
    mesh = mesh or make_mesh()
    ndev = mesh.shape[DATA_AXIS]
    if batch_size is None:
        batch_size = ndev * math.ceil(min(n, 64) / ndev)
    protocols = (protocol,)
    images = np.asarray(x, np.float32)
    y32 = labels.astype(np.int32)
    say = log or (lambda _line: None)

    # fixed / forward-lock: the key fixes the purifier's noise, i.e. the model under attack --
    # every run attacks the base run's model (module docstring, "Keys")
    shared_keys = randomness in ("fixed", "forward_lock")

    def run(tag, atk, inputs=images, what=""):
        tag = tags.SOUND_BASE if shared_keys else tag
        data = {"x": inputs, "y": y32, "index": indices}
        out = run_chunks(_sound_chunk, data, key=key,
                         args=(defended, atk, protocols, randomness, vote_chunk, tag),
                         batch_size=batch_size, mesh=mesh, progress=progress,
                         desc=f"soundness {what}")
        per = dict(out.records)
        per["label"] = labels
        scores = score_record(per, protocols, randomness)
        return per, {k: _summary_fields(v[protocol]) for k, v in scores.items()}

    opts = dict(norm=norm, num_steps=num_steps, step_size=step_size, eot_samples=eot_samples,
                loss=loss, random_start=random_start, num_restarts=num_restarts)
    base_step = (2.5 * eps / num_steps if step_size is None else step_size)
    settings = {"attack": attack, "eps": eps, "norm": norm, "num_steps": num_steps,
                "step_size": step_size, "base_step_size": base_step if attack == "pgd" else None,
                "eot_samples": eot_samples, "loss": loss, "random_start": bool(random_start),
                "num_restarts": num_restarts, "randomness": randomness, "protocol": protocol,
                "checks": list(selected), "large_eps": large,
                "large_eps_accuracy": float(large_eps_accuracy), "factor": factor,
                "eot_factor": eot_factor, "square_queries": square_queries,
                "batch_size": batch_size,
                "keys": "shared (the base run's fixed noise)" if shared_keys else "per run"}
    results: dict = {}

    def finished(name):
        r = results[name]
        say(f"soundness {name}: {r['verdict']} ({r['reason']}; {r['wall_s']:.0f} s)")

    # The randomness probe: five calls with different keys (AutoAttack's check_randomized).
    t0 = time.perf_counter()
    keys = _fold_all(example_keys(key, indices), tags.SOUND_PROBE)
    logits = np.asarray(_probe(defended, jnp.asarray(images), keys), np.float64)
    unit = logits / (np.linalg.norm(logits, axis=-1, keepdims=True) + 1e-10)
    spread = max(float(np.linalg.norm(unit[a] - unit[b], axis=-1).max())
                 for a in range(_PROBE_CALLS) for b in range(a + 1, _PROBE_CALLS))
    preds = logits.argmax(-1)
    looks_randomised = bool(spread > _RANDOMISED_TOL or np.any(preds != preds[:1]))
    probabilities = bool(logits.min() > -1e-5 and logits.max() < 1 + 1e-5
                         and np.all(np.abs(logits.sum(-1) - 1) < 1e-5))
    probe = {"looks_randomised": looks_randomised, "randomness": spread,
             "outputs_probabilities": probabilities, "calls": _PROBE_CALLS,
             "wall_s": time.perf_counter() - t0}
    # more EoT samples only where the attack sees fresh noise of a randomised model
    scale_eot = looks_randomised and randomness != "fixed"

    base = None
    if any(c in selected for c in ("iterations", "gradient_free", "transfer", "flags")):
        t0 = time.perf_counter()
        per_base, s_base = run(tags.SOUND_BASE, _gradient_attack(attack, eps=eps, **opts),
                               what="base")
        base = {"clean": s_base["clean"], "adv": s_base["adv"],
                "wall_s": time.perf_counter() - t0}
        say(f"soundness base: robust {s_base['adv']['accuracy']:.3f} "
            f"(clean {s_base['clean']['accuracy']:.3f})")

    if "large_eps" in selected:
        t0 = time.perf_counter()
        large_opts = dict(opts, step_size=None if step_size is None else step_size * large / eps)
        _, s = run(tags.SOUND_LARGE_EPS, _gradient_attack(attack, eps=large, **large_opts),
                   what="large eps")
        acc, (lo, _hi) = s["adv"]["accuracy"], s["adv"]["ci95"]
        thr = float(large_eps_accuracy)
        if acc <= thr:
            verdict, reason = "pass", f"robust accuracy at eps={large:g} is at most {thr:g}"
        elif lo > thr:
            verdict, reason = "fail", (f"robust accuracy at eps={large:g} stays above {thr:g} "
                                       f"(whole 95% interval): the attack cannot break even "
                                       f"unbounded-like perturbations (broken attack or masked "
                                       f"gradients)")
        else:
            verdict, reason = "inconclusive", (f"robust accuracy at eps={large:g} is above "
                                               f"{thr:g} but its interval reaches below it")
        results["large_eps"] = {"verdict": verdict, "reason": reason, "eps": large,
                                "threshold": thr, "adv": s["adv"], "clean": s["clean"],
                                "wall_s": time.perf_counter() - t0}
        finished("large_eps")

    if "iterations" in selected:
        t0 = time.perf_counter()
        strong_eot = eot_samples * eot_factor if scale_eot else eot_samples
        strong_opts = dict(opts, num_steps=num_steps * factor, eot_samples=strong_eot,
                           step_size=base_step if attack == "pgd" else None)
        _, s = run(tags.SOUND_STRONGER, _gradient_attack(attack, eps=eps, **strong_opts),
                   what="stronger")
        where = _compare(s["adv"]["accuracy"], base["adv"])
        verdict = "pass" if where == "inside" else "fail"
        reason = {"inside": "the stronger attack's accuracy lies inside the base run's 95% "
                            "interval",
                  "above": "more iterations helped the defence (the stronger attack's accuracy "
                           "is above the base run's interval): the attack is not working as "
                           "intended",
                  "below": f"not converged: {factor}x the iterations"
                           + (f" and {eot_factor}x the EoT samples" if scale_eot else "")
                           + " lower the robust accuracy below the base run's interval"}[where]
        results["iterations"] = {"verdict": verdict, "reason": reason, "base": base["adv"],
                                 "stronger": s["adv"], "num_steps": num_steps * factor,
                                 "eot_samples": strong_eot,
                                 "drop": base["adv"]["accuracy"] - s["adv"]["accuracy"],
                                 "wall_s": time.perf_counter() - t0}
        finished("iterations")

    def versus(name, per, s, what):
        """Verdict of another attack's accuracy against the base (gradient, adaptive) run's."""
        acc = s["adv"]["accuracy"]
        where = _compare(acc, base["adv"])
        correct_base = per_base[f"adv@{protocol}"] > 0.5
        correct_other = per[f"adv@{protocol}"] > 0.5
        if where == "below":
            verdict, reason = "fail", (f"the {what} attack is much stronger than the gradient "
                                       f"attack (its accuracy is below the gradient attack's "
                                       f"95% interval): gradients are masked or unused")
        elif acc < base["adv"]["accuracy"]:
            verdict, reason = "inconclusive", (f"the {what} attack is somewhat stronger than "
                                               f"the gradient attack, inside its interval")
        else:
            verdict, reason = "pass", f"the {what} attack is not stronger than the gradient one"
        return {"verdict": verdict, "reason": reason, "base": base["adv"], name: s["adv"],
                "broken_only_by_" + name: int(np.sum(correct_base & ~correct_other)),
                "broken_only_by_base": int(np.sum(~correct_base & correct_other))}

    if "gradient_free" in selected:
        t0 = time.perf_counter()
        atk = Partial(square, eps=jnp.asarray(eps, jnp.float32), norm=norm,
                      n_queries=square_queries)
        per, s = run(tags.SOUND_SQUARE, atk, what="square")
        results["gradient_free"] = {**versus("square", per, s, "gradient-free (Square)"),
                                    "queries": square_queries,
                                    "wall_s": time.perf_counter() - t0}
        finished("gradient_free")

    if "transfer" in selected:
        t0 = time.perf_counter()
        if bare is None:
            results["transfer"] = {"verdict": "inconclusive",
                                   "reason": "no bare classifier (pass bare=)", "wall_s": 0.0}
        else:
            # the bare classifier is attacked with one EoT sample (it is not purified)
            atk = Partial(_transfer, bare,
                          _gradient_attack(attack, eps=eps, **dict(opts, eot_samples=1)))
            per, s = run(tags.SOUND_TRANSFER, atk, what="transfer")
            undefended = getattr(defended, "purifier", 0) is None
            results["transfer"] = {**versus("transfer", per, s, "transfer"),
                                   "undefended": undefended,
                                   "wall_s": time.perf_counter() - t0}
        finished("transfer")

    if "flags" in selected:
        t0 = time.perf_counter()
        sub = {}
        # (1) a randomised model evaluated deterministically
        if not looks_randomised:
            sub["randomised"] = {"verdict": "pass", "reason": "the logits do not depend on "
                                                              "the key"}
        elif randomness == "fixed":
            sub["randomised"] = {"verdict": "inconclusive", "reason": (
                "the model is randomised and the evaluation fixes its randomness: the numbers "
                "hold for the fixed-noise (DW-box) model, not the randomised defence")}
        elif eot_samples == 1:
            sub["randomised"] = {"verdict": "fail", "reason": (
                "the model is randomised (logits depend on the key) but is attacked without "
                "EoT (eot_samples=1): use EoT (AutoAttack's version='rand')")}
        else:
            sub["randomised"] = {"verdict": "pass", "reason": f"randomised, attacked with "
                                                              f"EoT {eot_samples}"}
        sub["randomised"].update(looks_randomised=looks_randomised, randomness=spread)
        # (2) the robust accuracy re-measured on x_adv (new scoring noise, same fixed keys)
        per_re, s_re = run(tags.SOUND_BASE, None, inputs=np.asarray(per_base["x_adv"]),
                           what="re-measure")
        re_correct = per_re[f"clean@{protocol}"]
        agree_per = int(np.sum((re_correct > 0.5) == (per_base[f"adv@{protocol}"] > 0.5)))
        if not looks_randomised:
            ok = agree_per == n
            reason = ("the re-measured predictions agree on every example" if ok else
                      f"a deterministic model's re-measure disagrees on {n - agree_per} "
                      f"examples")
        else:
            ok = _compare(s_re["clean"]["accuracy"], base["adv"]) == "inside"
            reason = ("the re-measured accuracy lies inside the recorded one's 95% interval"
                      if ok else "the re-measured accuracy lies outside the recorded one's "
                                 "95% interval")
        sub["remeasure"] = {"verdict": "pass" if ok else "fail", "reason": reason,
                            "recorded": base["adv"], "remeasured": s_re["clean"],
                            "agree": agree_per}
        # (3) x_adv in the threat model
        d = np.asarray(per_base["x_adv"], np.float64) - images
        dist = (np.abs(d).reshape(n, -1).max(1) if norm == "linf"
                else np.sqrt((d * d).reshape(n, -1).sum(1)))
        x_adv = np.asarray(per_base["x_adv"])
        inside = bool(dist.max() <= eps * (1 + 1e-5) + 1e-6 and x_adv.min() >= 0
                      and x_adv.max() <= 1)
        sub["perturbation"] = {"verdict": "pass" if inside else "fail",
                               "reason": ("x_adv lies in the eps-ball and in [0, 1]" if inside
                                          else "x_adv leaves the eps-ball or [0, 1]"),
                               "max_distance": float(dist.max()),
                               "min": float(x_adv.min()), "max": float(x_adv.max())}
        # (4) logits, not probabilities
        sub["logits"] = {"verdict": "fail" if probabilities else "pass",
                         "reason": ("the outputs look like probabilities; the attack losses "
                                    "expect logits" if probabilities
                                    else "the outputs are not probabilities")}
        verdict = _worst(v["verdict"] for v in sub.values())
        results["flags"] = {"verdict": verdict,
                            "reason": "; ".join(f"{k}: {v['verdict']}" for k, v in sub.items()),
                            **sub, "wall_s": time.perf_counter() - t0}
        finished("flags")

    verdicts = {name: results[name]["verdict"] for name in selected}
    return {"verdict": _worst(verdicts.values()), "verdicts": verdicts, "checks": results,
            "base": base, "probe": probe, "settings": settings, "num_images": int(n),
            "indices": [int(i) for i in indices], "wall_s": time.perf_counter() - t_start}
