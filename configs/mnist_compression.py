"""Compression rate vs fixed-randomness robust accuracy on MNIST (Yuezhang & Wei, Fig. 3b/3c).

    python experiments/compression_fit.py --config configs/mnist_compression.py --workdir runs/mnist_compression

Models: the committed exports ``checkpoints/mnist_ddpm`` and ``checkpoints/mnist_classifier``.
Images: the first 128 MNIST test images. Attack: PGD Linf eps 0.15, 10 iterations, CE loss,
exact gradients through every reverse step, fixed randomness (one purifier key per image,
EoT 1). At Linf 0.3 fixed-randomness robust accuracy is 5-10% for every setting (the README
table); a 32-image probe at 0.15 gave 19% (DDPM t* 0.5, clean 50%) to 81% (DDPM t* 0.05 and
DDIM t* 0.1), with adversarial compression rates 0.71-1.24; the classifier alone 22%.
Settings: DDPM t* in {0.02, 0.05, 0.1, 0.2, 0.3, 0.5} and DDIM t* in {0.1, 0.3}, 10 reverse
steps each. Compression rates: adversarial (per image) and empirical (8 random points of the
Linf 0.15 ball per image). Fig. 3c: the classifier alone at eps x rate, rates 0.1 .. 1.5.

Time on the 2-core CPU: per setting one fixed-randomness attack row, which keeps the
adversarial images (``eval.keep_x_adv``), plus the compression rates; the README gives the
measured wall time.
Resumable: rerun the same command. Smoke variant (random tiny UNet, 8 images, 3 settings of 2
steps; ~1 minute idle, 3.6 minutes measured under load): ``:smoke``.
"""

from ml_collections import config_dict

from configs import _common


def settings(samplers_t_stars, num_steps=10):
    """``{"name", "purifier": {...}}`` rows, one per (sampler, t_star)."""
    return tuple({"name": f"{sp}_t{t:g}",
                  "purifier": {"sampler": sp, "t_star": t, "num_steps": num_steps}}
                 for sp, t in samplers_t_stars)


def study(c, *, eps, norm="linf"):
    """The fixed-randomness exact-gradient protocol and the study block, in place."""
    c.attack.update(norm=norm, eps=eps, eot_samples=1)
    c.eval.update(randomness="fixed", protocols=("one_shot",))
    # robust_eval.run_row keeps the adversarial images for the adversarial compression rate
    c.eval.keep_x_adv = True
    c.study = config_dict.ConfigDict({
        "num": 8,  # random ball points per image (empirical rate)
        "ball_seed": 1,
        "level": 0.95,  # confidence level of the fitted parameters' intervals
        # Fig. 3c: the classifier alone attacked at eps * rate (() skips it)
        "classifier_rates": tuple(round(0.1 * i, 1) for i in range(1, 16)),
    })
    del c.rows  # the study's rows are its settings
    return c


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = study(_common.robust_base(), eps=0.15)
    c.data.test_split = "test[:128]"
    c.settings = settings([("ddpm", t) for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)]
                          + [("ddim", t) for t in (0.1, 0.3)])
    if arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:8]"
        c.attack.eot_samples = 1
        c.eval.protocols = ("one_shot",)
        c.study.num = 2
        c.study.classifier_rates = (0.5, 1.0)
        c.settings = settings([("ddpm", 0.05), ("ddpm", 0.3), ("ddim", 0.1)], num_steps=2)
    return c
