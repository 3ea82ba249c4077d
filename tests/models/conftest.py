"""tests/models helpers (the PyTorch twins ``_twin_ncsnpp``, ``_twin_adm``) importable by name."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
