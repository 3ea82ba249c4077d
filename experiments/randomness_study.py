"""Randomness decomposition of a purifier (Yuezhang & Wei, Fig. 2): input ball vs internal noise.

    python experiments/randomness_study.py --config configs/mnist_randomness.py \
        --workdir runs/mnist_randomness

For each image, ``num`` purification directions ``f(x_i, k_i) - x_i`` are collected in three
modes: (a) inputs drawn in the eps-ball, one purifier key; (b) the clean input, ``num`` keys;
(c) both varying. Writes ``results.json`` (per mode: mean off-diagonal Pearson correlation of
the directions and radius of the purified set, mean and std over images, next to the input
ball's radius and the paper's numbers; manifest), ``per_example.npz`` and ``randomness.png``.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_randomness.py")
MODES = ("fixed_noise", "fixed_input", "both")
# Yuezhang & Wei (arXiv 2505.22839), CIFAR-10, DDPM t* = 0.1: mean correlation of the
# directions with fixed noise / varying noise, and the radius of a unit L2 ball after
# purification with fixed / varying noise (ANCHORS.md section 4; their mode mapping inferred).
PAPER = {"mean_correlation": {"fixed_noise": 0.9954, "fixed_input": 0.2368},
         "radius": {"input": 1.004, "fixed_noise": 0.241, "varying_noise": 3.282}}


def _plot(path, summary, input_radius):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = ["inputs vary,\none key", "one input,\nkeys vary", "both vary"]
    corr = [summary[m]["mean_correlation"]["mean"] for m in MODES]
    err = [summary[m]["mean_correlation"]["std"] for m in MODES]
    a1.bar(names, corr, yerr=err, color=["C0", "C1", "C2"])
    a1.set_ylabel("mean pairwise correlation\nof purification directions")
    a1.set_ylim(0, 1.05)
    rad = [input_radius] + [summary[m]["radius"]["mean"] for m in MODES]
    a2.bar(["input ball"] + names, rad, color=["grey", "C0", "C1", "C2"])
    a2.set_ylabel("radius (mean L2 to centroid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    from jaxrob.analysis import randomness_decomposition

    timer, workdir, test, purifier, ddpm_info = _common.start_study(
        config, workdir, "randomness study")
    s = config.study
    res = randomness_decomposition(purifier, test.images, jr.key(int(config.seed)),
                                   eps=float(s.eps), num=int(s.num), norm=s.norm,
                                   chunk=s.get("chunk"), indices=test.indices)
    stats = lambda a: {"mean": float(np.mean(a)), "std": float(np.std(a))}
    summary = {m: {"mean_correlation": stats(getattr(res, m).mean_correlation),
                   "radius": stats(getattr(res, m).radius)} for m in MODES}
    input_radius = float(np.mean(res.input_radius))
    for m in MODES:
        summary[m]["radius_over_input"] = summary[m]["radius"]["mean"] / input_radius
    _common.save_npz(workdir / "per_example.npz", index=test.indices,
                     input_radius=np.asarray(res.input_radius),
                     **{f"{m}_{k}": np.asarray(getattr(getattr(res, m), k))
                        for m in MODES for k in ("mean_correlation", "radius")})
    _plot(workdir / "randomness.png", summary, input_radius)
    results = {"summary": summary, "input_radius": input_radius, "paper": PAPER,
               "purifier": purifier.manifest(), "ddpm": ddpm_info,
               "num_images": len(test), "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("mean correlation: %s; radius / input radius: %s",
                 {m: round(summary[m]["mean_correlation"]["mean"], 4) for m in MODES},
                 {m: round(summary[m]["radius_over_input"], 3) for m in MODES})
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
