"""DDPM on scikit-learn's 8x8 digits (bundled, no download) with the "digits" UNet (0.70 M).

    python experiments/train_diffusion.py --config configs/digits_ddpm.py --workdir runs/digits_ddpm

Takes about 5 minutes on the 2-core CPU (2 XLA host devices): 3000 steps of batch 128 at
~11-12 steps/s, then 64 DDPM samples (1000 steps) and the denoising MSE on the 360 test images.
Smoke variant (tests, ~20 s): ``--config configs/digits_ddpm.py:smoke``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.ddpm_base()
    if arg == "smoke":
        _common.ddpm_smoke(c)
    return c
