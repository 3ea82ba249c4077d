"""SmallCNN on scikit-learn's 8x8 digits (bundled, no download).

    python experiments/train_classifier.py --config configs/digits_classifier.py --workdir runs/digits_classifier

Takes well under a minute on the 2-core CPU (500 steps of batch 128, then the 360 test images);
expect ~97-99 % test accuracy. Smoke variant: ``--config configs/digits_classifier.py:smoke``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.classifier_base()
    if arg == "smoke":
        _common.classifier_smoke(c)
    return c
