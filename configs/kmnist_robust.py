"""Robust accuracy of purification on Kuzushiji-MNIST (evaluated on ``test[8000:8256]``).

    python experiments/robust_eval.py --config configs/kmnist_robust.py --workdir runs/kmnist_robust

Only the 10k KMNIST test images exist here: the classifier (``checkpoints/kmnist_classifier``)
was trained on ``test[:8000]``, so images 8000+ are held out. The purifier is the MNIST DDPM
(``checkpoints/mnist_ddpm``: no KMNIST DDPM is committed; train one with
``configs/kmnist_ddpm.py`` and point ``--config.ddpm.path`` at its export), i.e. a
cross-domain purifier. Same attack and rows as ``mnist_robust.py`` at t_star 0.1.
Smoke variant: ``:smoke``.
"""

from configs import _common, mnist_robust


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_eval_options(_common.robust_base())
    c.data = _common.data("kmnist", "test[:8000]", "test[8000:8256]")
    c.data.num_images = 0
    c.classifier.path = "checkpoints/kmnist_classifier"
    c.rows = mnist_robust.rows(t_stars=(0.1,))
    if arg == "smoke":
        _common.robust_smoke(c)
        c.data.test_split = "test[8000:8008]"
        c.classifier.path = "checkpoints/mnist_classifier"
        c.rows = mnist_robust.rows(samplers=("ddpm",), t_stars=(0.1,))
    return c
