"""Robust accuracy of purification on scikit-learn's 8x8 digits (bundled, no data dir).

    python experiments/robust_eval.py --config configs/digits_robust.py --workdir runs/digits_robust

Models: ``checkpoints/digits_ddpm`` and ``checkpoints/digits_classifier``. 64 test images,
PGD Linf eps 0.2, 10 iterations, EoT 4, DDPM purification t_star 0.1 / 10 steps with exact
gradients (stochastic and fixed randomness) and BPDA, scored one-shot and worst-of-10; about
2 minutes on the 2-core CPU. ``experiments/main.py`` runs this config's rows too.

Variants: ``:smoke``; ``:soundness`` (the classifier and exact-gradient DDPM rows, each with the
soundness checks of ``jaxrob.evaluation.soundness_checks`` on its first 32 images: large eps,
4x iterations and EoT, Square, transfer from the bare classifier, AutoAttack's flags -- a
column and a section of table.md, ``soundness`` in results.json); ``:autoattack`` (AutoAttack
rows: standard on the classifier, rand -- APGD-CE + APGD-DLR with EoT 20 -- on the DDPM
purifier; 10 iterations each; the per-attack progression and flags in results.json and
table.md). Any row gets the checks with ``--config.eval.soundness.num_images=32``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg, ("", "smoke", "soundness", "autoattack"))
    c = _common.use_digits(_common.robust_eval_options(_common.robust_base()), "test[:64]")
    c.attack.eps = 0.2
    c.rows = ({"name": "classifier", "purifier": {"enabled": False}},
              {"name": "ddpm_exact"},
              {"name": "ddpm_bpda", "purifier": {"gradient": "bpda"}},
              {"name": "ddpm_fixed", "eval": {"randomness": "fixed"}, "attack": {"eot_samples": 1}})
    if arg == "soundness":
        c.rows = c.rows[:2]
        c.eval.soundness.num_images = 32
    elif arg == "autoattack":
        c.rows = ({"name": "classifier_aa", "purifier": {"enabled": False},
                   "attack": {"name": "autoattack"}},
                  {"name": "ddpm_aa_rand",
                   "attack": {"name": "autoattack", "autoattack": {"version": "rand"}}})
    elif arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[:8]"
        c.ddpm.source = "export"  # the committed digits exports are small: the real path
    return c
