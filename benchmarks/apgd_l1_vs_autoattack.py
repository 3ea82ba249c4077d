"""APGD-L1 and L1 Square: jaxrob's robust accuracy next to the original's, same weights, images.

    nice -n 5 python benchmarks/apgd_l1_vs_autoattack.py --reference-path /work/ext/auto-attack
    # --n 200 (digits test images), --n-iter 30; about 2 minutes on 2 loaded cores
    nice -n 5 python benchmarks/apgd_l1_vs_autoattack.py --reference-path /work/ext/auto-attack \
        --attack square --eps 2 4 6
    # L1 Square, 100 and 1000 queries (--n-queries), seeds 0 1 2; about 4 minutes

The model is a softmax regression on scikit-learn's 8x8 digits (the attack tests' classifier:
200 Adam steps, lr 0.1, from zeros), whose weights both sides use: jaxrob as a ``logits_fn``,
the original (fra31/auto-attack's ``APGDAttack(norm="L1")``, imported from
``--reference-path``, not a dependency of jaxrob) as the same matrix product in PyTorch. For
each eps, loss (CE, DLR) and schedule (plain, ``use_largereps``) it records the robust accuracy
of each side's returned points and their largest L1 perturbation. The two sides draw different
random starts (PyTorch's and JAX's generators), so the accuracies agree up to the attack's own
run-to-run spread, not exactly; the original returns its last misclassified iterate
(``perturb``), jaxrob its highest-loss point.

``--attack square``: the original's ``SquareAttack(norm="L1", p_init=0.8)`` against
:func:`jaxrob.attacks.square` with ``norm="l1"``, at the same budget (jaxrob's ``n_queries``
counts the clean check and the start, the original's only the updates after its start: it gets
``n_queries - 2``), over seeds 0, 1, 2 on each side (torch's seed, jaxrob's key).

Output: a table on stdout and ``benchmarks/results/apgd_l1_vs_autoattack.json`` (or
``square_l1_vs_autoattack.json``; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-path", required=True,
                   help="checkout of github.com/fra31/auto-attack")
    p.add_argument("--n", type=int, default=200, help="digits test images")
    p.add_argument("--n-iter", type=int, default=30)
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--attack", choices=("apgd", "square"), default="apgd")
    p.add_argument("--n-queries", type=int, nargs="+", default=[100, 1000],
                   help="Square's budgets (--attack square)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.out is None:
        args.out = str(HERE / "results" / ("apgd_l1_vs_autoattack.json" if args.attack == "apgd"
                                           else "square_l1_vs_autoattack.json"))
    ref = pathlib.Path(args.reference_path)
    if not (ref / "autoattack" / "autopgd_base.py").is_file():
        raise SystemExit(f"--reference-path: no autoattack/autopgd_base.py under {ref} (a "
                         f"checkout of github.com/fra31/auto-attack)")
    sys.path.insert(0, str(ref))

    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax
    import torch
    from autoattack.autopgd_base import APGDAttack
    from autoattack.square import SquareAttack

    import jaxrob.attacks as ja
    from jaxrob.data import load_dataset

    train = load_dataset("digits", "train")
    x_tr, y_tr = jnp.asarray(train.images), jnp.asarray(train.labels)
    lin = lambda prm, x: x.reshape(x.shape[0], -1) @ prm["w"] + prm["b"][None, :]
    opt = optax.adam(0.1)

    @jax.jit
    def fit(prm):
        def step(carry, _):
            q, s = carry
            g = jax.grad(lambda q: ja.ce_loss(lin(q, x_tr), y_tr).mean())(q)
            u, s = opt.update(g, s)
            return (optax.apply_updates(q, u), s), None

        return jax.lax.scan(step, (prm, opt.init(prm)), None, length=200)[0][0]

    prm = fit({"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))})
    test = load_dataset("digits", f"test[:{args.n}]")
    x, y = jnp.asarray(test.images), jnp.asarray(test.labels, jnp.int32)
    f = lambda x_, key: lin(prm, x_)
    w_t, b_t = torch.tensor(np.asarray(prm["w"])), torch.tensor(np.asarray(prm["b"]))
    torch_model = lambda xx: xx.permute(0, 2, 3, 1).reshape(xx.shape[0], -1) @ w_t + b_t
    x_t = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    y_t = torch.tensor(np.asarray(y)).long()
    clean = float((jnp.argmax(f(x, None), 1) == y).mean())

    robust_t = lambda adv: float((torch_model(adv).argmax(1) == y_t).float().mean())
    robust_j = lambda xa: float((np.asarray(jnp.argmax(f(xa, None), 1)) == np.asarray(y)).mean())
    max_l1 = lambda d: float(np.abs(np.asarray(d)).reshape(d.shape[0], -1).sum(1).max())
    if args.attack == "square":
        rows = []
        for eps in args.eps:
            for nq in args.n_queries:
                row = {"eps": eps, "n_queries": nq, "robust_original": [], "robust_jaxrob": [],
                       "max_l1_original": 0.0, "max_l1_jaxrob": 0.0,
                       "seconds_original": 0.0, "seconds_jaxrob_incl_compile": 0.0}
                for seed in range(3):
                    t0 = time.time()
                    attack = SquareAttack(torch_model, norm="L1", n_queries=nq - 2, eps=eps,
                                          p_init=0.8, seed=seed, device="cpu")
                    adv = attack.perturb(x_t, y_t).detach()
                    t1 = time.time()
                    res = ja.square(f, x, y, jr.key(seed), eps=eps, norm="l1", n_queries=nq)
                    x_adv = np.asarray(res.x_adv)
                    t2 = time.time()
                    row["robust_original"].append(robust_t(adv))
                    row["robust_jaxrob"].append(robust_j(res.x_adv))
                    row["max_l1_original"] = max(row["max_l1_original"],
                                                 max_l1((adv - x_t).numpy()))
                    row["max_l1_jaxrob"] = max(row["max_l1_jaxrob"], max_l1(x_adv - np.asarray(x)))
                    row["seconds_original"] += t1 - t0
                    row["seconds_jaxrob_incl_compile"] += t2 - t1
                rows.append(row)
        lines = [f"L1 Square, digits softmax regression, n={args.n}, seeds 0-2, clean accuracy "
                 f"{clean:.3f}",
                 "eps   queries  robust original (mean; seeds)  robust jaxrob (mean; seeds)"
                 "  max L1 orig / jaxrob"]
        for r in rows:
            fmt = lambda v: f"{np.mean(v):.3f}; " + " ".join(f"{a:.3f}" for a in v)
            lines.append(f"{r['eps']:<5} {r['n_queries']:<8} {fmt(r['robust_original']):<30} "
                         f"{fmt(r['robust_jaxrob']):<28} {r['max_l1_original']:.5f} / "
                         f"{r['max_l1_jaxrob']:.5f}")
        _write(args, lines, {"n": args.n, "clean": clean, "rows": rows,
                             "jax": jax.__version__, "torch": torch.__version__})
        return

    rows = []
    for eps in args.eps:
        for largereps in (False, True):
            for loss in ("ce", "dlr"):
                t0 = time.time()
                attack = APGDAttack(torch_model, n_iter=args.n_iter, norm="L1", eps=eps,
                                    loss=loss, use_largereps=largereps, seed=0, device="cpu")
                adv = attack.perturb(x_t, y_t).detach()
                t1 = time.time()
                res = ja.apgd(f, x, y, jr.key(0), eps=eps, norm="l1", num_steps=args.n_iter,
                              loss=loss, use_largereps=largereps)
                x_adv = np.asarray(res.x_adv)
                t2 = time.time()
                rows.append({
                    "eps": eps, "largereps": largereps, "loss": loss,
                    "robust_original": float((torch_model(adv).argmax(1) == y_t).float().mean()),
                    "robust_jaxrob": float((np.asarray(jnp.argmax(f(res.x_adv, None), 1))
                                            == np.asarray(y)).mean()),
                    "max_l1_original": float((adv - x_t).abs().flatten(1).sum(1).max()),
                    "max_l1_jaxrob": float(np.abs(x_adv - np.asarray(x)).reshape(
                        x_adv.shape[0], -1).sum(1).max()),
                    "seconds_original": t1 - t0, "seconds_jaxrob_incl_compile": t2 - t1,
                })
    lines = [f"APGD-L1, digits softmax regression, n={args.n}, {args.n_iter} iterations, "
             f"clean accuracy {clean:.3f}",
             "eps   schedule   loss  robust original  robust jaxrob  max L1 orig / jaxrob"]
    for r in rows:
        lines.append(f"{r['eps']:<5} {'largereps' if r['largereps'] else 'plain':<10} "
                     f"{r['loss']:<5} {r['robust_original']:<16.3f} {r['robust_jaxrob']:<14.3f}"
                     f" {r['max_l1_original']:.5f} / {r['max_l1_jaxrob']:.5f}")
    _write(args, lines, {"n": args.n, "n_iter": args.n_iter, "clean": clean, "rows": rows,
                         "jax": jax.__version__, "torch": torch.__version__})


def _write(args, lines, record) -> None:
    print("\n".join(lines))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
