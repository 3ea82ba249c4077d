"""Jacobian spectra of fixed-key DiffPure-style purifiers on MNIST (paper Fig. 3a).

    python experiments/jacobian_spectrum.py --config configs/mnist_jacobian.py --workdir runs/mnist_jacobian

The committed MNIST DDPM (``checkpoints/mnist_ddpm``); the first 8 MNIST test images. Per
image and setting: the dense 784 x 784 Jacobian of the purifier with one fixed key (JVP chunks
sharded over the CPU devices), all 784 singular values, the top 10 by Lanczos (checked against
the dense ones) and the empirical compression rate in a unit L2 ball (32 samples). Settings:
DDPM t* in {0.02, 0.1, 0.3} and DDIM t* = 0.1 with 10 reverse steps. Cost on the 2-core CPU
alone: about 6 s (Jacobian + SVD) + 4 s (Lanczos) per image and setting and ~30 s of compiling
per setting (the README gives the measured wall time). Resumable: rerun the command after a
kill. Variant ``:full``: 16 images, top 20, DDPM t* in {0.02, 0.05, 0.1, 0.2, 0.3}, DDIM
t* = 0.1, DDPM t* = 0.1 without the output's [0, 1] clip and with 20 steps (~45 min alone).
Smoke variant (random tiny UNet, 2 images, two 2-step settings; 1-3 min, mostly compiling):
``:smoke``.
"""

from ml_collections import config_dict

from configs import _common

VARIANTS = ("", "smoke", "full")


def study(**overrides) -> config_dict.ConfigDict:
    """The ``study`` block of ``experiments/jacobian_spectrum.py`` (fields documented here)."""
    s = config_dict.ConfigDict({
        "method": "jvp_chunks",  # jacfwd | jacrev | jvp_chunks | vjp_chunks (dense Jacobian)
        "chunk": 112,  # directions per lax.map step (per device) and Lanczos/probe batches
        "images_per_chunk": 4,  # resume granularity: one ChunkStore file per this many images
        "dense": True,  # False: matrix-free top-k only (D x D too big, e.g. CIFAR/ImageNet)
        "max_dense_mib": 4096.0,  # refuse a dense Jacobian larger than this
        "topk": 20,  # top singular values without forming J (0: skip)
        "topk_method": "lanczos",  # lanczos | randomized
        "topk_iters": config_dict.placeholder(int),  # None: the library's default
        "low": 0.25,  # "compressed" threshold (the paper: > 90% of singular values below)
        "high": 1.0,  # "expanded" threshold (the paper: 1.3% above)
        "eps": 1.0,  # L2 radius of the empirical compression ball
        "num": 32,  # ball samples per image (0: skip the empirical rate)
        "empirical_chunk": config_dict.placeholder(int),  # purifications in parallel
        "unclipped": False,  # Jacobian of the last reverse state before the [0, 1] clip
    })
    s.update(overrides)
    return s


def settings(t_stars=(0.02, 0.05, 0.1, 0.2, 0.3), steps=10, more_steps=False, unclipped=True):
    """DDPM at several t*, DDIM at t* = 0.1, DDPM t* = 0.1 without the final [0, 1] clip of
    the output (``study.unclipped``: clipped output pixels have zero Jacobian rows) and, with
    ``more_steps``, DDPM t* = 0.1 with twice the reverse steps."""
    pur = lambda sampler, t, n=steps: {"sampler": sampler, "t_star": t, "num_steps": n}
    out = [{"name": f"ddpm_t{t:g}", "purifier": pur("ddpm", t)} for t in t_stars]
    out += [{"name": "ddim_t0.1", "purifier": pur("ddim", 0.1)},
            {"name": "ddpm_t0.1_unclipped", "purifier": pur("ddpm", 0.1),
             "study": {"unclipped": True}}][:None if unclipped else 1]
    if more_steps:
        out.append({"name": f"ddpm_t0.1_{2 * steps}steps",
                    "purifier": pur("ddpm", 0.1, 2 * steps)})
    return tuple(out)


def base() -> config_dict.ConfigDict:
    """robust_base with the blocks this study does not use removed."""
    c = _common.robust_base()
    c.study = study()
    c.settings = settings()
    # XLA:CPU's YNNPACK fusions stay on: with them off, jvp_chunks sharded over 2 host devices
    # returned a few wrong Jacobian columns, non-deterministically (benchmarks/README.md,
    # docs/known_faults.md); the experiment's per-image self-check (jacobian_check) records the
    # error either way
    c.mesh.cpu_ynn = "all"
    return c


def smoke(c: config_dict.ConfigDict, test_split: str = "test[:2]") -> config_dict.ConfigDict:
    """Random tiny UNet, 2 images, 2-step purifiers, one image per chunk."""
    _common.robust_smoke(c)
    c.data.test_split = test_split
    c.data.num_images = 0
    c.study.update(topk=3, num=4, images_per_chunk=1, chunk=16)
    c.settings = ({"name": "ddpm_t0.1", "purifier": {"t_star": 0.1}},
                  {"name": "ddim_t0.2_unclipped", "purifier": {"sampler": "ddim", "t_star": 0.2},
                   "study": {"unclipped": True}})
    return c


def finish(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    del c.attack, c.eval, c.rows, c.classifier, c.fast_vjp  # fast_vjp: picked per method
    return c


def get_config(arg=None):
    arg = _common.parse_arg(arg, VARIANTS)
    c = base()
    c.data.test_split = "test[:8]"
    c.study.update(topk=10, images_per_chunk=2)
    c.settings = settings(t_stars=(0.02, 0.1, 0.3), unclipped=False)
    if arg == "full":
        c.data.test_split = "test[:16]"
        c.study.update(topk=20, images_per_chunk=4)
        c.settings = settings(more_steps=True)
    if arg == "smoke":
        smoke(c)
    return finish(c)
