"""Train a latent diffusion model in two stages: the KL autoencoder, then a DDPM on its codes.

    python experiments/train_ldm.py --config configs/mnist_vae.py --workdir runs/mnist_vae
    python experiments/train_ldm.py --config configs/mnist_ldm.py --workdir runs/mnist_ldm

``config.stage`` picks the stage. ``"autoencoder"`` trains a :class:`jaxrob.models.AutoencoderKL`
(L1 reconstruction + a small-weight KL term), sets the code scaling factor to 1 / std of the
codes of ``eval.scaling_images`` training images, measures the test reconstruction (MSE, L1,
PSNR) and writes ``reconstructions.png`` (rows of originals, then their reconstructions) and an
``"autoencoder"`` export. ``"ldm"`` encodes the training set with the autoencoder export
``autoencoder.path`` (posterior means and standard deviations), trains a DDPM on posterior
draws of the scaled codes, samples ``samples.png`` (decoded) and writes an ``"ldm"`` export
holding both networks (``jaxrob.models.load`` returns a :class:`LatentDiffusionModel`).

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/`` (rerunning
the same command after a kill resumes from the latest one), ``export/``, the PNGs and
``results.json`` (manifest, training summary, metrics).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import _common
from experiments import _train_ldm as _impl

run = _impl.run

if __name__ == "__main__":
    _common.cli(run)
