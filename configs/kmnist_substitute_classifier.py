"""The black-box substitute for DiffDefense's KMNIST evaluation (trained on ``test[:8000]``).

    python experiments/train_classifier.py --config configs/kmnist_substitute_classifier.py --workdir runs/kmnist_substitute_classifier

The architecture of ``configs/mnist_substitute_classifier.py`` (built differently from the
target ``kmnist_classifier``) on KMNIST's first 8000 test images (the only KMNIST images here),
evaluated on ``test[8000:]``; 500 steps, about a minute on the 2-core CPU. Copy
``runs/kmnist_substitute_classifier/export`` to ``checkpoints/kmnist_substitute_classifier``.
Smoke variant: ``:smoke``.
"""

from configs import _common, kmnist_classifier, mnist_substitute_classifier


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = kmnist_classifier.get_config(arg)
    sub = mnist_substitute_classifier.get_config(arg)
    c.seed = sub.seed
    c.model = sub.model
    return c
