"""Helpers for the experiment tests (importable: conftest puts this folder on sys.path)."""

import importlib
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)`` (unlocked, so tests may edit it)."""
    return importlib.import_module(f"configs.{name}").get_config(arg)
