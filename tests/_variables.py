"""Random model variables for tests: :func:`jaxrob.models.random_variables` (structure from
``jax.eval_shape(module.init, ...)``, values from a seeded NumPy generator; no compilation)."""

from jaxrob.models import random_variables as random_variables
