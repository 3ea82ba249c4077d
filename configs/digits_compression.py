"""Compression rate vs fixed-randomness robust accuracy on the 8x8 digits (bundled, no data dir).

    python experiments/compression_fit.py --config configs/digits_compression.py --workdir runs/digits_compression

Models: ``checkpoints/digits_ddpm`` and ``checkpoints/digits_classifier``. 128 test images,
PGD Linf eps 0.1, 10 iterations, exact gradients, fixed randomness (EoT 1); DDPM t* in
{0.02, 0.05, 0.1, 0.2, 0.3, 0.5} and DDIM t* in {0.1, 0.3} with 10 reverse steps; 8 ball
points per image; Fig. 3c rates 0.1 .. 1.5. Measured: 15.4 minutes on the shared 2-core CPU
(load ~7; per setting ~45 s attack row, ~33 s of it compilation, the same again for the
attack recomputed while robust_eval.run_row does not keep x_adv, ~5 s compression rates);
expect about a third of that on an idle machine, and half again once run_row keeps x_adv.
Resumable (rerun the same command). Smoke variant (the committed digits models, 8 images, 3
settings of 2 steps; ~5 minutes measured under load, mostly compilation): ``:smoke``.
"""

from configs import _common
from configs.mnist_compression import settings, study


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.use_digits(_common.robust_base(), "test[:128]")
    study(c, eps=0.1)
    c.settings = settings([("ddpm", t) for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)]
                          + [("ddim", t) for t in (0.1, 0.3)])
    if arg == "smoke":
        c.data.test_split = "test[:8]"
        c.attack.num_steps = 2
        c.eval.batch_size = 8
        c.study.num = 2
        c.study.classifier_rates = (0.5, 1.0)
        c.settings = settings([("ddpm", 0.05), ("ddpm", 0.3), ("ddim", 0.1)], num_steps=2)
    return c
