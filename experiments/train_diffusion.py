"""Train a DDPM eps-model, then export its EMA params, sample a grid and measure denoising.

    python experiments/train_diffusion.py \\
        --config configs/digits_ddpm.py --workdir runs/digits_ddpm

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/`` (rerunning
the same command after a kill resumes from the latest one), ``export/`` (EMA params + metadata,
see ``jaxrob.checkpoint.save_params``), ``samples.png`` / ``samples.npz`` and ``results.json``
(manifest, training summary, denoising MSE at each ``eval.t_stars`` on the test split).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _train_diffusion as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run)
