"""DiffDefense on Kuzushiji-MNIST (the paper's second dataset), evaluated on ``test[8000:8256]``.

    python experiments/diffdefense_eval.py --config configs/kmnist_diffdefense.py --workdir runs/kmnist_diffdefense

Only the 10k KMNIST test images exist here, so every KMNIST model trains on ``test[:8000]``
and images 8000+ are held out. Needs three exports:

* ``checkpoints/kmnist_classifier`` (committed; ``configs/kmnist_classifier.py``);
* ``checkpoints/kmnist_ddpm`` (committed; made by ``python experiments/train_diffusion.py
  --config configs/kmnist_ddpm.py --workdir runs/kmnist_ddpm``, ~40 min on the 2-core CPU).
  An MNIST DDPM would reconstruct KMNIST glyphs poorly, so there is no cross-domain fallback;
* ``checkpoints/kmnist_substitute_classifier`` (the black-box substitute; committed, made by
  ``python experiments/train_classifier.py --config configs/kmnist_substitute_classifier.py
  --workdir runs/kmnist_substitute_classifier``, about a minute).

The run stops with the commands above, before any work, while an export is missing. Rows and
variants as ``configs/mnist_diffdefense.py`` (``:small``: 32 images; ``:smoke``: digits).
"""

from configs import _common, mnist_diffdefense

VARIANTS = mnist_diffdefense.VARIANTS


def get_config(arg=None):
    arg = _common.parse_arg(arg, VARIANTS)
    c = mnist_diffdefense.get_config(arg)
    if arg == "smoke":
        return c
    c.data = _common.data("kmnist", "test[:8000]", "test[8000:8256]")
    c.data.num_images = 0
    if arg == "small":
        c.data.test_split = "test[8000:8032]"
    c.ddpm.path = "checkpoints/kmnist_ddpm"
    c.classifier.path = "checkpoints/kmnist_classifier"
    c.substitute.path = "checkpoints/kmnist_substitute_classifier"
    return c
