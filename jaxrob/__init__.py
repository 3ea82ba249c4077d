"""jaxrob: diffusion-based adversarial purification research in JAX/Flax.

Subpackages follow the one-way data flow of the design:
``data -> models -> diffusion -> purify -> attacks -> evaluation/analysis``.
"""

__version__ = "0.1.0"
