"""Train an image classifier, report its test accuracy and export it.

    python experiments/train_classifier.py \\
        --config configs/digits_classifier.py --workdir runs/digits_classifier

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/`` (rerunning
after a kill resumes), ``export/`` (Flax variables: params + batch_stats, with metadata),
``predictions.npz`` (per-example test predictions) and ``results.json`` (manifest, training
summary, test accuracy with a 95 % Wilson interval).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _train_classifier as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run)
