"""Fine-tune a DDPM export with ADDT (adversarial diffusion training) against a frozen classifier.

    python experiments/train_addt.py \\
        --config configs/digits_addt.py --workdir runs/digits_addt

Variants of the config (``:addt``, ``:no_rbgm``, ``:no_cgpo``; see ``configs/digits_addt.py``)
are the paper's ablations. Writes into ``--workdir``: ``config.json``, ``metrics.jsonl`` (loss,
grad_norm, delta_rms, ratio, lr, steps/s), ``checkpoints/<step>/`` (rerunning the same command
after a kill resumes from the latest one and ends with the same parameters, bit for bit),
``export/`` (EMA params; a DDPM export that ``jaxrob.models.load`` reads, its metadata's
``finetune`` naming the method, variant, options, and the base DDPM and classifier exports by
path and parameter checksum) and ``results.json`` (manifest, timing, and the base vs fine-tuned
eps-MSE, x0-MSE and classifier accuracy on the one-step x0 estimate at ``eval.t_stars``).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _train_addt as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run)
