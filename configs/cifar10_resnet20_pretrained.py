"""Evaluate akamaster's pretrained CIFAR-10 ResNet-20 (``.npz`` under the data dir), no training.

    python experiments/eval_classifier.py --config configs/cifar10_resnet20_pretrained.py --workdir /tmp/resnet20

Accuracy on the 1000 lossless CIFAR-10 test images (official test 0..999): ~91.5 %
(upstream reports 91.25 % on all 10k). Takes ~20 s on the 2-core CPU.
Other depths: ``--config.model.path=pretrained_cifar10_resnet_akamaster/resnet56-4bfd9763.npz``.
Smoke variant (64 images): ``:smoke``.
"""

from ml_collections import config_dict

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = config_dict.ConfigDict()
    c.seed = 0
    c.data = _common.data("cifar10", "test", "test")
    c.model = config_dict.ConfigDict({
        "source": "akamaster",  # "akamaster" (.npz/.th weights) or "export" (jaxrob export)
        # relative paths are resolved against the data dir (akamaster) or the repo (export)
        "path": "pretrained_cifar10_resnet_akamaster/resnet20-12fca82f.npz",
    })
    c.eval = config_dict.ConfigDict({"num_images": 0, "batch_size": 250})
    c.mesh = _common.mesh()
    if arg == "smoke":
        c.data.test_split = "test[:64]"
        c.eval.batch_size = 32
    return c
