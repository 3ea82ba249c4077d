"""SmallCNN on Kuzushiji-MNIST: train on ``test[:8000]``, evaluate on ``test[8000:]``.

Only the 10k KMNIST *test* images exist in the data directory (the train images are not
there), so the classifier trains on the first 8000 test images and is evaluated on the other
2000; accuracies are not comparable to the official train/test protocol (~95 %+ there).

    python experiments/train_classifier.py --config configs/kmnist_classifier.py --workdir runs/kmnist_classifier

~8 epochs of the 8000 images (500 steps of batch 128): about 1-2 minutes on the 2-core CPU.
Smoke variant: ``:smoke``.
"""

from configs import _common, mnist_classifier


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = mnist_classifier.get_config(arg)
    c.data = _common.data("kmnist", "test[:8000]", "test[8000:]")
    c.train.num_steps = 500 if not arg else c.train.num_steps
    if arg == "smoke":
        c.data.train_split = "test[:64]"
        c.data.test_split = "test[8000:8032]"
    return c
