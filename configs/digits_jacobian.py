"""Jacobian spectra of fixed-key purifiers on scikit-learn's 8x8 digits (paper Fig. 3a).

    python experiments/jacobian_spectrum.py --config configs/digits_jacobian.py --workdir runs/digits_jacobian

The committed ``checkpoints/digits_ddpm`` (bundled data, no data dir); the first 32 test digits.
Per image and setting: the dense 64 x 64 Jacobian of the purifier with one fixed key, all 64
singular values, the top 5 by Lanczos (vs the dense ones) and the empirical compression rate in
an L2 ball of radius 0.5 (32 samples). Settings as ``configs/mnist_jacobian.py``: DDPM t* in
{0.02, 0.05, 0.1, 0.2, 0.3} and DDIM t* = 0.1 (10 steps), DDPM t* = 0.1 unclipped. About 3-4
minutes on the 2-core CPU alone, mostly compiling (8.8 min measured with the CPU shared by
four jobs; the top-5 Lanczos costs 7x the dense 64 x 64 Jacobian per image).
Smoke variant (the real digits DDPM, 2 images, two 2-step settings; ~1-2 min, mostly
compiling): ``:smoke``.
"""

from configs import _common, mnist_jacobian


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.use_digits(mnist_jacobian.base(), "test[:32]")
    c.study.update(topk=5, eps=0.5, images_per_chunk=8, chunk=64)
    if arg == "smoke":
        mnist_jacobian.smoke(c)
        c.ddpm.source = "export"  # the committed digits DDPM is small: the real path
    return mnist_jacobian.finish(c)
