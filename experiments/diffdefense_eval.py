"""DiffDefense under white-box, black-box and adaptive attacks; detection by reconstruction error.

    python experiments/diffdefense_eval.py --config configs/mnist_diffdefense.py \
        --workdir runs/mnist_diffdefense

One run evaluates the rows of ``config.rows`` (each a dict of overrides: the attack, the model it
is crafted on -- the classifier (white-box), a substitute classifier (black-box) or the defended
classifier itself (adaptive: BPDA, exact gradients through the unrolled reconstruction with EoT
over its initial noise, detection-aware) -- and the gradient the defence exposes) on the same
images. The clean images are reconstructed once (shared by every row); each row attacks, then
reconstructs the attacked images. Per row ``results.json`` holds clean and robust accuracy with
and without the defence (95% intervals), the detection AUC and the detection rate at
``eval.fpr`` (threshold on the clean reconstruction errors), the fraction of attacked images
classified correctly after reconstruction or detected, perturbation norms and seconds per
image; ``table.md`` lists them. Per-example records are kept under ``<row>/chunks/`` and
``clean/chunks/`` (resumable: rerun the same command, finished chunks are kept) and as
``per_example.npz``. ``reconstruction_timing.json`` holds the measured seconds per reconstructed
image (compilation excluded).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _diffdefense_eval as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run, _impl.DEFAULT_CONFIG)
