"""jaxrob: diffusion-based adversarial purification research in JAX/Flax.

Subpackages follow the one-way data flow of the design:
``data -> models -> diffusion -> purify -> attacks -> evaluation/analysis``. Each is reachable
from ``import jaxrob`` (imported on first use)::

    import jaxrob
    ddpm = jaxrob.models.load("checkpoints/mnist_ddpm", fast_vjp=True)
    clf = jaxrob.models.load("checkpoints/mnist_classifier")
    defended = jaxrob.purify.DefendedModel(clf, jaxrob.purify.diffpure(ddpm, t_star=0.1,
                                                                       num_steps=10))
    res = jaxrob.attacks.pgd(defended, x, y, key, eps=0.3, num_steps=10, eot_samples=4)
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("analysis", "attacks", "checkpoint", "data", "diffusion", "evaluation", "models",
               "parallel", "purify", "training")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxrob.{name}")
    raise AttributeError(f"module 'jaxrob' has no attribute {name!r}")


def __dir__():
    return sorted((*globals(), *_SUBMODULES))
