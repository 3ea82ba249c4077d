"""The run-time type checker the test suite applies to jaxrob (installed by ``conftest.py``).

beartype with PEP 484's numeric tower (an ``int`` is a valid ``float``, as the annotations
mean). Only imported when checking is on: beartype is a test dependency, not a library one.
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
