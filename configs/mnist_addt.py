"""ADDT fine-tune of the committed MNIST DDPM against the committed MNIST classifier.

    python experiments/train_addt.py --config configs/mnist_addt.py --workdir runs/mnist_addt

Variants as in ``configs/digits_addt.py`` (``:addt`` default, ``:no_rbgm``, ``:no_cgpo``; append
``,smoke`` for a few steps on 64 training images). Starts from ``checkpoints/mnist_ddpm`` (6000
DDPM steps, 280,177 parameters) and ``checkpoints/mnist_classifier``; the reference's
hyper-parameters (see ``_common.addt_base``). Batch 64; one ADDT step costs about K + 1 = 6
forward-backward passes of the UNet (CGPO's K classifier gradients through it, then the
update): 300 steps (19,200 images, a third of an epoch) took about 50 min on the shared 2-core
CPU for ``addt`` (5-20 s per step depending on the load) and 5 min for ``no_cgpo``; the exports
are committed as ``checkpoints/mnist_addt[_<variant>]``. The learning rate is constant, so a
run stopped at a checkpoint and finished with a smaller ``--config.train.num_steps`` equals the
first steps of a longer one. On an accelerator raise ``--config.train.num_steps`` and
``--config.train.batch_size`` (the reference: 8 x 32 for 100 CIFAR-10 epochs).
"""

from configs import _common


def get_config(arg=None):
    variant, smoke = _common.parse_variant(arg)
    c = _common.addt_base(variant)
    c.data = _common.data("mnist", "train", "test")
    c.ddpm.path = "checkpoints/mnist_ddpm"
    c.classifier.path = "checkpoints/mnist_classifier"
    c.train.update(batch_size=64, num_steps=300, log_every=25, checkpoint_every=100)
    c.eval.update(num_images=1000, batch_size=250)
    if smoke:
        _common.addt_smoke(c)
        c.data.train_split = "train[:64]"
        c.data.test_split = "test[:16]"
    return c
