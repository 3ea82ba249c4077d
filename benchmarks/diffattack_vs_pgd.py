"""Plain exact-gradient PGD vs DiffAttack-PGD on the committed MNIST purifier (a small comparison).

Defence: ``checkpoints/mnist_ddpm`` DiffPure-style DDPM purifier (t_star, steps below) in front of
``checkpoints/mnist_classifier``. Both attacks: Linf PGD, the same eps, steps, EoT samples and
keys, exact gradients through the purifier (remat); they differ only in the loss: CE vs
``diffattack_loss(..., base="ce", weight)``. Robust accuracy is scored on fresh purifier keys
(``--votes`` purifications per image, each counted: the mean accuracy over them, and the
fraction of images correct under all of them).

Run (a few minutes on 2 CPU cores)::

  JAXROB_DATA_DIR=../shared/datasets python benchmarks/diffattack_vs_pgd.py --n 16

One run with the defaults (16 test images, t_star=0.2 in 5 steps, eps=0.3, 10 steps, 2 EoT
samples, weight 1, all states; 8 scoring purifications; 2 shared cores at load ~7, 3.7 min):
clean 100% / 100%; PGD-CE mean 54.7%, correct under all 8 votes 18.75%; DiffAttack-PGD mean
61.7%, all votes 18.75%. At this size (16 images, untuned weight) the extra term does not help;
nothing here supports or refutes the paper's CIFAR-10 gains.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob.attacks as ja
from jaxrob.data import load_dataset
from jaxrob.models import load
from jaxrob.purify import DefendedModel, diffpure, example_keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--t-star", type=float, default=0.2)
    ap.add_argument("--purify-steps", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--eot", type=int, default=2)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--num-states", type=int, default=None)
    ap.add_argument("--votes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    ddpm = load("checkpoints/mnist_ddpm", fast_vjp=True)
    clf = load("checkpoints/mnist_classifier", fast_vjp=True)
    data = load_dataset("mnist", f"test[:{a.n}]")
    x, y = jnp.asarray(data.images), jnp.asarray(data.labels, jnp.int32)
    defended = DefendedModel(clf, diffpure(ddpm, t_star=a.t_star, num_steps=a.purify_steps))
    key = jr.key(a.seed)
    k_attack, k_score = jr.fold_in(key, 1), jr.fold_in(key, 2)

    @jax.jit
    def score(x_adv):
        def one(v):
            keys = example_keys(jr.fold_in(k_score, v), jnp.arange(x.shape[0]))
            return jnp.argmax(defended(x_adv, keys), -1) == y
        return jax.lax.map(one, jnp.arange(a.votes))  # (votes, B)

    common = dict(eps=a.eps, num_steps=a.attack_steps, eot_samples=a.eot)
    rows = {}
    for name, loss in [
            ("clean", None),
            ("pgd-ce", "ce"),
            ("diffattack-pgd", ja.diffattack_loss(defended, x, base="ce", weight=a.weight,
                                                  num_states=a.num_states))]:
        t = time.time()
        x_adv = x if loss is None else ja.pgd(defended, x, y, k_attack, loss=loss,
                                              **common).x_adv
        ok = np.asarray(score(x_adv))
        rows[name] = {"mean_acc": float(ok.mean()), "all_votes_acc": float(ok.all(0).mean()),
                      "linf": float(jnp.abs(x_adv - x).max()),
                      "seconds": round(time.time() - t, 1)}
        print(name, json.dumps(rows[name]), flush=True)
    print(json.dumps({"settings": vars(a), "results": rows}))


if __name__ == "__main__":
    main()
