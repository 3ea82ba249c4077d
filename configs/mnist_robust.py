"""Robust accuracy of DiffPure-style purification on MNIST (the README table).

    python experiments/robust_eval.py --config configs/mnist_robust.py --workdir runs/mnist_robust

Models: the committed exports ``checkpoints/mnist_ddpm`` (280k-parameter UNet, 1000-step linear
schedule) and ``checkpoints/mnist_classifier`` (SmallCNN). Images: the first 256 MNIST test
images. Attack: PGD Linf eps 0.3 (or 0.1 / L2 2.0 with the variants), 10 iterations, EoT 4
samples per gradient, CE loss, exact gradients through every reverse step (scan + remat, fast
conv VJPs). Rows: the classifier alone; DDPM and DDIM purification at two t_star values with
10 reverse steps each, attacked with exact gradients in the stochastic setting, with BPDA, and
with exact gradients in the fixed-randomness setting; scored one-shot and worst-of-10.
Each row writes its own resumable sub-workdir; see the README for timings on the 2-core CPU.

Variants: ``:eps01`` (Linf 0.1), ``:l2`` (L2 eps 2.0), ``:fixed`` (only the classifier and the
fixed-randomness rows: the cheap ones, EoT 1), ``:stochastic`` (the others: the classifier
and the stochastic exact / BPDA rows), ``:dwbox`` (ADDT's randomness settings at
t_star 0.1: DDPM stochastic / fixed (DW-box, EoT 1) / forward_lock (forward noise fixed, reverse
noise fresh, EoT 4), DDIM stochastic / fixed; scored one-shot, average@20 and fixed_aa@20 --
ADDT's Fixed-AA with eval_iter 20; add attack iterates as Fixed-AA candidates with
``--config.eval.candidates="(5,)"``), ``:smoke`` (random tiny UNet, seconds), ``:autoattack_classifier`` (AutoAttack standard --
APGD-CE, APGD-T, FAB-T, Square 5000 queries, 100 iterations -- on the classifier alone, the
first 1000 test images, Linf 0.3, batch 250, scored one-shot; the per-attack progression and
AutoAttack's flags in results.json), ``:diffattack`` (the DDPM t* = 0.1 purifier on the first
64 images: the table's PGD x10 EoT 4 CE row, with the soundness checks on its first 16 images,
next to DiffAttack-PGD -- the same attack on CE + 1 x the deviated-reconstruction term over
every chain state, ``attack.loss="diffattack"``), ``:autoattack_rand`` (AutoAttack rand --
APGD-CE, APGD-DLR, 100 iterations, EoT 20 -- through the same purifier with exact gradients,
the first 16 images, chunks of 8); ``:diffattack_smoke`` / ``:autoattack_rand_smoke``: those
rows on the random tiny UNet, 4 images, 2 steps.
"""

from configs import _common

VARIANTS = ("", "smoke", "eps01", "l2", "fixed", "stochastic", "dwbox", "autoattack_classifier",
            "diffattack", "autoattack_rand", "diffattack_smoke", "autoattack_rand_smoke")


def rows(samplers=("ddpm", "ddim"), t_stars=(0.1, 0.3)):
    out = [{"name": "classifier", "purifier": {"enabled": False}}]
    for sampler in samplers:
        for t in t_stars:
            pur = {"sampler": sampler, "t_star": t}
            tag = f"{sampler}_t{t:g}"
            out += [{"name": f"{tag}_exact", "purifier": pur},
                    {"name": f"{tag}_bpda", "purifier": {**pur, "gradient": "bpda"}},
                    # one fixed key: every EoT sample would be the same (ADDT's DW-box: EoT 1)
                    {"name": f"{tag}_fixed", "purifier": pur, "eval": {"randomness": "fixed"},
                     "attack": {"eot_samples": 1}}]
    return tuple(out)


def dwbox_rows(t_star=0.1):
    """ADDT's randomness settings: stochastic, fixed (DW-box) and, for DDPM (whose reverse steps
    draw noise), forward_lock."""
    out = [{"name": "classifier", "purifier": {"enabled": False}}]
    for sampler in ("ddpm", "ddim"):
        pur = {"sampler": sampler, "t_star": t_star}
        tag = f"{sampler}_t{t_star:g}"
        out += [{"name": f"{tag}_exact", "purifier": pur},
                {"name": f"{tag}_fixed", "purifier": pur, "eval": {"randomness": "fixed"},
                 "attack": {"eot_samples": 1}}]
        if sampler == "ddpm":  # DDIM (eta 0) has no reverse noise: forward_lock == fixed
            out.append({"name": f"{tag}_forward_lock", "purifier": pur,
                        "eval": {"randomness": "forward_lock"}})
    return tuple(out)


def get_config(arg=None):
    arg = _common.parse_arg(arg, VARIANTS)
    c = _common.robust_eval_options(_common.robust_base())
    c.rows = rows()
    if arg == "eps01":
        c.attack.eps = 0.1
    elif arg == "l2":
        c.attack.update(norm="l2", eps=2.0)
    elif arg == "dwbox":
        c.rows = dwbox_rows()
        c.eval.protocols = ("one_shot", "average@20", "fixed_aa@20")
    elif arg == "fixed":
        c.rows = tuple(r for r in c.rows
                       if r["name"] == "classifier" or r["name"].endswith("_fixed"))
    elif arg == "stochastic":
        c.rows = tuple(r for r in c.rows if not r["name"].endswith("_fixed"))
    elif arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:8]"
        c.rows = rows(samplers=("ddpm",), t_stars=(0.1,))
    elif arg == "autoattack_classifier":
        _common.autoattack_classifier(c, "test[:1000]")
    elif arg in ("diffattack", "diffattack_smoke"):
        # the table's attack (PGD x10, EoT 4, CE) next to DiffAttack-PGD (the same attack on
        # CE + 1 x the deviated-reconstruction term over every chain state), on the DDPM
        # t* = 0.1 purifier; the soundness checks on the PGD row's first 16 images
        c.data.test_split = "test[:64]"
        pur = {"sampler": "ddpm", "t_star": 0.1}
        c.rows = ({"name": "ddpm_t0.1_pgd", "purifier": pur,
                   "eval": {"soundness": {"num_images": 16}}},
                  {"name": "ddpm_t0.1_diffattack", "purifier": pur,
                   "attack": {"loss": "diffattack"}})
    elif arg in ("autoattack_rand", "autoattack_rand_smoke"):
        # AutoAttack rand (APGD-CE, APGD-DLR; 100 iterations, EoT 20) on the DDPM t* = 0.1
        # purifier with exact gradients; chunks of 8 images (resumable)
        c.data.test_split = "test[:16]"
        c.attack.update(name="autoattack", num_steps=100)
        c.attack.autoattack.version = "rand"
        c.eval.batch_size = 8
        c.rows = ({"name": "ddpm_t0.1_aa_rand", "purifier": {"sampler": "ddpm", "t_star": 0.1}},)
    if arg.endswith("_smoke"):  # the same rows on the random tiny UNet, 4 images, 2 steps
        rows_ = c.rows
        _common.robust_smoke(c)
        c.rows = rows_
        c.data.test_split = "test[:4]"
        c.data.num_images = 0
        c.eval.batch_size = 4
        if c.attack.name == "autoattack":
            c.attack.num_steps = 2
            c.attack.autoattack.eot_samples = 2
        c.eval.soundness.update(factor=2, square_queries=4)
    return c
