r"""ADDT's robustness table: a DDPM next to its ADDT fine-tune and the two ablations.

    python experiments/robust_eval.py --config configs/addt_robust.py:digits,addt --workdir runs/addt_robust/digits_addt
    python experiments/addt_table.py runs/addt_robust/digits_* --out docs/addt_robust/digits_linf.md

The arg is ``<dataset>,<model>[,l2][,smoke]`` (none: ``digits,base``): dataset ``digits`` (the
bundled 8x8 digits, all 360 test images, Linf eps 0.2 / L2 eps 1.0) or ``mnist`` (the first 256
test images, Linf eps 0.3 / L2 eps 2.0); model ``base`` (the committed ``<dataset>_ddpm``), ``addt`` (its ADDT
fine-tune: CGPO K = 5 + RBGM), ``no_rbgm`` (CGPO with the reference's Linf PGD delta) or
``no_cgpo`` (Gaussian delta: the control fine-tune of the same length), all
``checkpoints/<dataset>_addt[_<variant>]``; the classifier is always the committed
``<dataset>_classifier`` the fine-tunes were guided by.

Rows (one run per model; the same images, keys and attack for every model; in this order, so a
cut run has the main rows): the classifier alone, then per t* in (0.1, 0.2) DDPM and DDIM
purification (10 reverse steps; the DDPM forward-lock rows last) attacked with
PGD (10 iterations, EoT 4, CE, exact gradients through every step) in ADDT's settings:
``stochastic`` (fresh noise for every EoT sample and every scoring purification), ``fixed`` --
the DW-box: the forward noise and every reverse step's noise fixed per image and shared by the
attack and the scoring, EoT 1 -- and, for DDPM (DDIM with eta 0 has no reverse noise),
``forward_lock`` (the forward noise fixed, the reverse noise fresh; the reference code's
variant). Scored ``one_shot``, ``worst_of@10`` and ``fixed_aa@20`` (ADDT's Fixed-AA: the mean
over images of the fraction of 20 purifications classified correctly, minimised per image over
the clean input and the attack's result; with ``--config.eval.candidates="(5,)"`` also its 5th
iterate). Under ``fixed`` every protocol sees the one fixed purification.

Cost on the shared 2-core CPU: digits about an hour per model when four run side by side;
MNIST about two hours per model on the whole machine (the exact-gradient EoT rows dominate: 256
images x 40 gradients through 10 UNet steps, ~0.09 s each) -- an accelerator job. On a TPU VM
(``tpu_scripts/``), one run per model, then the table::

    for m in base addt no_rbgm no_cgpo; do tpu_scripts/run.sh NAME "python experiments/robust_eval.py \
        --config configs/addt_robust.py:mnist,$m --workdir runs/addt_robust/mnist_$m"; done

(``experiments/addt_table.py`` labels a run by the export it loaded, so ``tpu_scripts/sweep.sh``
over ``ddpm.path`` works too.) On a CPU, the main rows first (the MNIST rows of
``docs/addt_robust/``; the same workdir takes the other rows later)::

    python experiments/robust_eval.py --config configs/addt_robust.py:mnist,base --workdir runs/addt_robust/mnist_base \
        --config.only_rows=classifier,ddpm_t0.1_stochastic,ddpm_t0.1_dwbox

``,smoke``: the random tiny UNet, 4 images, 2 steps (the tests).
"""

from ml_collections import config_dict

from configs import _common

DATASETS = ("digits", "mnist")
MODELS = ("base", "addt", "no_rbgm", "no_cgpo")
# per dataset: test split and Linf / L2 radius (digits: robust_eval's digits radius; MNIST: the
# README table's)
_SETTINGS = {"digits": ("test", 0.2, 1.0), "mnist": ("test[:256]", 0.3, 2.0)}


def parse(arg: str | None) -> tuple[str, str, str, bool]:
    """``"<dataset>,<model>[,l2][,smoke]"`` -> ``(dataset, model, norm, smoke)``; without a
    dataset and model, ``digits,base``."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    flags = [t for t in tokens if t in ("l2", "smoke")]
    named = [t for t in tokens if t not in ("l2", "smoke")] or ["digits", "base"]
    if (len(named) != 2 or named[0] not in DATASETS or named[1] not in MODELS
            or len(set(flags)) != len(flags)):
        raise ValueError(f"config variant: expected '<dataset>,<model>[,l2][,smoke]' with dataset in "
                         f"{list(DATASETS)} and model in {list(MODELS)} (e.g. --config "
                         f"configs/addt_robust.py:digits,addt), got {arg!r}")
    return named[0], named[1], ("l2" if "l2" in flags else "linf"), "smoke" in flags


def model_path(dataset: str, model: str) -> str:
    """The committed export of ``model`` (repo-relative)."""
    return f"checkpoints/{dataset}_ddpm" if model == "base" else (
        f"checkpoints/{dataset}_addt" + ("" if model == "addt" else f"_{model}"))


def rows(t_stars=(0.1, 0.2)) -> tuple[dict, ...]:
    """The classifier, then per t*: DDPM and DDIM stochastic and DW-box; the DDPM forward-lock
    rows last (each row is its own resumable sub-workdir, so a cut run has the main rows)."""
    out = [{"name": "classifier", "purifier": {"enabled": False}}]
    lock = []
    for t in t_stars:
        for sampler in ("ddpm", "ddim"):
            pur = {"sampler": sampler, "t_star": t}
            tag = f"{sampler}_t{t:g}"
            out += [{"name": f"{tag}_stochastic", "purifier": pur},
                    # DW-box: one fixed key per image, so every EoT sample would be the same
                    {"name": f"{tag}_dwbox", "purifier": pur, "eval": {"randomness": "fixed"},
                     "attack": {"eot_samples": 1}}]
            if sampler == "ddpm":  # DDIM (eta 0) has no reverse noise: forward_lock == fixed
                lock.append({"name": f"{tag}_forward_lock", "purifier": pur,
                             "eval": {"randomness": "forward_lock"}})
    return tuple(out + lock)


def get_config(arg=None) -> config_dict.ConfigDict:
    dataset, model, norm, smoke = parse(arg)
    split, eps_linf, eps_l2 = _SETTINGS[dataset]
    c = _common.robust_eval_options(_common.robust_base())
    if dataset == "digits":
        _common.use_digits(c, split)
    else:
        c.data.test_split = split
    c.ddpm.path = model_path(dataset, model)
    c.attack.update(norm=norm, eps=eps_linf if norm == "linf" else eps_l2)
    c.eval.protocols = ("one_shot", "worst_of@10", "fixed_aa@20")
    c.rows = rows()
    # recorded in config.json and results.json's manifest, read by experiments/addt_table.py
    c.addt_table = config_dict.ConfigDict({"dataset": dataset, "model": model})
    if smoke:
        rows_ = c.rows
        _common.robust_smoke(c)
        c.rows = tuple(r for r in rows_ if r["name"] == "classifier"
                       or r["name"].startswith("ddpm_t0.1"))
        c.data.test_split = "test[:4]"
        c.data.num_images = 0
        c.eval.batch_size = 4
    return c
