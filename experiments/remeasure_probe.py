"""Is a stochastic row's recorded one-shot score of ``x_adv`` biased by its keys?

    python experiments/remeasure_probe.py --config digits,base --row ddim_t0.2_stochastic

Reruns the soundness checks' base attack of one ``configs/addt_robust.py`` row (the first
``--n`` test images, the checks' keys ``fold_in(k_i, SOUND_BASE)``), then scores the same
``x_adv`` with 20 purifications under each key family: the recorded scoring keys (ADV), the
re-measure's (CLEAN) and two fresh ones. Equal means up to sampling error = the keys are not
correlated with the attack; the one-shot columns show how far a single draw per image moves.
39 s for digits on the 2-core CPU alone (1 min 46 s next to two other runs).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob._keys as tags
from configs.addt_robust import get_config
from experiments import _common
from jaxrob._keys import example_keys
from jaxrob.evaluation._protocols import predictions
from jaxrob.evaluation._robust import _fold_all, robust_scores
from jaxrob.purify import DefendedModel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="digits,base", help="configs/addt_robust.py arg")
    p.add_argument("--row", default="ddim_t0.2_stochastic")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--num", type=int, default=20, help="purifications per key family")
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    rows = [r for r in cfg.rows if r["name"] == args.row]
    if not rows:
        p.error(f"--row: expected one of {[r['name'] for r in cfg.rows]}, got {args.row!r}")
    rc = _common.row_config(cfg, rows[0])
    if rc.eval.randomness != "stochastic" or not rc.purifier.enabled:
        p.error(f"--row: expected a stochastic purifier row, got {args.row!r}")
    test = _common.load_split(rc.data, rc.data.test_split, num_images=int(rc.data.num_images))
    fast = bool(rc.fast_vjp)  # as robust_eval loads them
    ddpm, _ = _common.load_ddpm(rc.ddpm, tuple(test.image_shape), fast_vjp=fast)
    clf, _ = _common.load_classifier(rc.classifier, rc.data, fast_vjp=fast)
    defended = DefendedModel(clf, _common.make_purifier(rc.purifier, ddpm))
    attack = _common.make_attack(rc.attack)
    n = min(args.n, len(test))
    x, y = jnp.asarray(test.images[:n]), np.asarray(test.labels[:n])
    keys = _fold_all(example_keys(jr.key(int(rc.seed)), np.asarray(test.indices[:n])),
                     tags.SOUND_BASE)
    out = jax.jit(lambda xx, yy, kk: robust_scores(
        defended, attack, xx, yy, kk, protocols=("one_shot",), randomness="stochastic"))(
        x, jnp.asarray(y), keys)
    x_adv = out["x_adv"]
    print(f"{args.config} {args.row}, first {n} images, {args.num} purifications per family")
    print("keys         one-shot  mean of all")
    for name, tag in (("ADV", tags.ADV), ("CLEAN", tags.CLEAN), ("fresh 777", 777),
                      ("fresh 778", 778)):
        pred = np.asarray(predictions(defended, x_adv, _fold_all(keys, tag), num=args.num))
        correct = (pred == y[None]).astype(np.float64)  # (num, n)
        print(f"{name:<12} {100 * correct[0].mean():7.1f}  {100 * correct.mean():10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
