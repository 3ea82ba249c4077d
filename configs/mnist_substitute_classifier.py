"""The black-box substitute for DiffDefense's MNIST evaluation: a differently built SmallCNN.

    python experiments/train_classifier.py --config configs/mnist_substitute_classifier.py --workdir runs/mnist_substitute_classifier

Three conv stages (16, 32, 64 channels; 28 -> 14 -> 7 -> 3), a 64-unit hidden layer, dropout
0.3, MNIST's mean/std input normalisation and another seed, against the target classifier's two
stages (32, 64), 128 hidden units and (0.5, 0.5) normalisation (``configs/mnist_classifier.py``),
the role of the DiffDefense paper's classifier B. One epoch (470 steps of batch 128): about a
minute on the 2-core CPU; the export was copied to ``checkpoints/mnist_substitute_classifier``.
Smoke variant: ``:smoke``.
"""

from configs import _common, mnist_classifier


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = mnist_classifier.get_config(arg)
    c.seed = 1
    c.model.kwargs = {"features": (16, 32, 64), "hidden": 64, "dropout": 0.3,
                      "mean": (0.1307,), "std": (0.3081,)}
    if arg == "smoke":
        c.model.kwargs.update(features=(4, 4, 8), hidden=16, dropout=0.0)
    else:
        c.train.update(num_steps=470, warmup_steps=50)
    return c
