"""Registered experiments. ``names()`` lists them; ``get(name)`` returns the class.

Every module in this package (and in ``patching/``) is imported here, so adding an experiment
is one new file with an ``@register("name")`` class: nothing else changes.
"""

import importlib
import pkgutil

from circuitlab.experiments.base import (Experiment, coerce_params, describe, get, names, params_from_sets,
    register)

__all__ = ["Experiment", "register", "get", "names", "describe", "coerce_params", "params_from_sets"]


def _import_all(package_name: str, path) -> None:
    for info in pkgutil.iter_modules(path):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        if info.ispkg:
            _import_all(module.__name__, module.__path__)


_import_all(__name__, __path__)
