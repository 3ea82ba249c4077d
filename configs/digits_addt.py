"""ADDT fine-tune of the committed digits DDPM against the committed digits classifier.

    python experiments/train_addt.py --config configs/digits_addt.py --workdir runs/digits_addt
    python experiments/train_addt.py --config configs/digits_addt.py:no_rbgm --workdir runs/digits_addt_no_rbgm
    python experiments/train_addt.py --config configs/digits_addt.py:no_cgpo --workdir runs/digits_addt_no_cgpo

Variants (the ``:arg``): ``addt`` (default: CGPO with K = 5 and RBGM), ``no_rbgm`` (CGPO's delta
from the reference's Linf PGD step, ``train_ADDT_linf.py``), ``no_cgpo`` (plain Gaussian delta:
the control run of the same length, so a gain of ADDT is not just "more training"); append
``,smoke`` for the tests' few-step version (``:no_cgpo,smoke``). Starts from
``checkpoints/digits_ddpm`` (1500 DDPM steps) with the reference's optimizer (AdamW 2e-4, betas
(0.95, 0.999), weight decay 1e-6, clip 1.0, EMA 0.9999 with power-3/4 warm-up) and ratio
(lambda 0.03 in [0, 0.3]), 200 steps of batch 32 on 2 XLA host devices. Measured on the 2-core
CPU shared with other jobs (load 8-12): ``addt`` 7:13 wall (0.62 steps/s, 80 s first step incl.
compilation), ``no_rbgm`` 5:43 (0.85 steps/s), ``no_cgpo`` 1:45 (6.6 steps/s); an idle machine
should be several times faster. The exports are committed as ``checkpoints/digits_addt``,
``digits_addt_no_rbgm``, ``digits_addt_no_cgpo`` (with ``*_results.json`` / ``*_metrics.jsonl``).
"""

from configs import _common


def get_config(arg=None):
    variant, smoke = _common.parse_variant(arg)
    c = _common.addt_base(variant)
    if smoke:
        _common.addt_smoke(c)
    return c
