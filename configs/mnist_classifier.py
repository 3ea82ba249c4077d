"""SmallCNN on MNIST (60k train / 10k test IDX files in the data dir).

    python experiments/train_classifier.py --config configs/mnist_classifier.py --workdir runs/mnist_classifier

2 epochs (940 steps of batch 128) take a few minutes on the 2-core CPU; expect ~99 % test
accuracy. Smoke variant: ``:smoke``.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.classifier_base()
    c.data = _common.data("mnist", "train", "test")
    c.train.update(num_steps=940, learning_rate=2e-3, warmup_steps=100, log_every=50,
                   checkpoint_every=250)
    if arg == "smoke":
        _common.classifier_smoke(c)
        c.data.train_split = "train[:64]"
        c.data.test_split = "test[:32]"
    return c
