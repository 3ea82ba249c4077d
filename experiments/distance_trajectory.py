"""Distance to the clean image along purification (Yuezhang & Wei, Fig. 1 / S1).

    python experiments/distance_trajectory.py --config configs/mnist_distance.py \\
        --workdir runs/mnist_distance

Three starting points per image: the clean image, a PGD adversarial example against the
classifier alone (Linf, ``study.eps``), and a point drawn uniformly in the same Linf ball. Each
is forward-diffused to ``t_star`` (the path ``sqrt(abar_n) x + sqrt(1 - abar_n) eps`` at the
chain's positions, with the purifier's own noise) and then purified by the reverse chain with
the same key. Writes l2, linf and SSIM to the clean image at every state (mean and std over
images per start), ``trajectory.png`` and ``results.json`` (manifest included).
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_distance.py")
STARTS = ("clean", "adversarial", "random")
METRICS = ("l2", "linf", "ssim")


def forward_path(purifier, x01, key):
    """(steps, B, ...) states of the forward phase in [0, 1] space, ending at the purifier's
    ``x_t`` (same noise ``normal(fold_in(key, 0))``)."""
    import jaxrob.diffusion as jd
    from jaxrob._keys import PURIFY_FORWARD

    chain, = purifier.chains
    x = jd.to_model_space(x01)
    noise = jr.normal(jr.fold_in(key, PURIFY_FORWARD), x.shape, x.dtype)
    states = jax.vmap(lambda n: jd.q_sample(x, n, noise, chain))(jnp.arange(chain.num_steps))
    return jd.from_model_space(states, clip=False)


def _plot(path, curves, n_fwd):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, metric in zip(axes, METRICS, strict=True):
        for start in STARTS:
            mean = np.asarray(curves[start][metric]["mean"])
            std = np.asarray(curves[start][metric]["std"])
            steps = np.arange(len(mean))
            ax.plot(steps, mean, label=start)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.axvline(n_fwd, color="grey", ls=":")
        ax.set_xlabel("state (0 = input, forward, then reverse)")
        ax.set_title(f"{metric} to the clean image")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    from jaxrob.analysis import trajectory_distances
    from jaxrob.attacks import pgd

    timer, workdir, test, purifier, ddpm_info = _common.start_study(
        config, workdir, "distance study", single_stage=True)
    logits_fn, clf_info = _common.load_classifier(config.classifier, config.data)
    s = config.study
    eps = float(s.eps)
    key = jr.key(int(config.seed))
    x = jnp.asarray(test.images)
    y = jnp.asarray(test.labels)
    x_adv = pgd(logits_fn, x, y, jr.fold_in(key, 1), eps=eps,
                num_steps=int(s.pgd_steps)).x_adv
    x_rand = jnp.clip(x + jr.uniform(jr.fold_in(key, 2), x.shape, minval=-eps, maxval=eps),
                      0.0, 1.0)
    k_pur = jr.fold_in(key, 3)
    window = int(s.get("ssim_window") or 11)  # SSIM window side (at most the image side)

    @jax.jit
    def path(x0):
        fwd = forward_path(purifier, x0, k_pur)
        _, rev = purifier.trajectory(x0, k_pur)
        states = jnp.concatenate([x0[None], fwd, rev])
        return trajectory_distances(states, x, ssim_window=window)

    curves, final = {}, {}
    for start, x0 in zip(STARTS, (x, x_adv, x_rand), strict=True):
        d = jax.device_get(path(x0))
        curves[start] = {m: {"mean": np.mean(d[m], axis=1).tolist(),
                             "std": np.std(d[m], axis=1).tolist()} for m in METRICS}
        final[start] = {m: {"input": float(np.mean(d[m][0])),
                            "purified": float(np.mean(d[m][-1]))} for m in METRICS}
    acc = lambda xx: float(jnp.mean(jnp.argmax(logits_fn(xx, None), -1) == y))
    n_fwd = purifier.stages[0][1]
    _plot(workdir / "trajectory.png", curves, n_fwd)
    results = {"final": final, "curves": curves, "forward_states": n_fwd,
               "classifier_accuracy": {"clean": acc(x), "adversarial": acc(x_adv),
                                       "random": acc(x_rand)},
               "purifier": purifier.manifest(), "ddpm": ddpm_info, "classifier": clf_info,
               "num_images": len(test), "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("l2 to clean, input -> purified: %s",
                 {k: (round(v["l2"]["input"], 3), round(v["l2"]["purified"], 3))
                  for k, v in final.items()})
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
