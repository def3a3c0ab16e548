"""Registered experiments. ``names()`` lists them; ``get(name)`` returns the class.

Every module in this package (and in ``patching/``) is imported on the first ``names()`` or
``get()``, so adding an experiment is one new file with an ``@register("name")`` class: nothing else
changes. ``catalog()`` answers "which experiments, which parameters" from a cache keyed by the source
code, without importing torch (the CLI's ``list`` and ``describe``).
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["Experiment", "register", "get", "names", "describe", "coerce_params", "params_from_sets", "catalog",
           "add_set_option", "set_overrides"]

_BASE_NAMES = ("Experiment", "register", "coerce_params", "params_from_sets")
_loaded = False


def _import_all(package_name: str, path) -> None:
    for info in pkgutil.iter_modules(path):
        if info.name.startswith("_") or info.name in ("base", "registry_cache"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        if info.ispkg:
            _import_all(module.__name__, module.__path__)


def _registry():
    """The base module, with every experiment module imported (so the registry is full)."""
    global _loaded
    from circuitlab.experiments import base

    if not _loaded:
        _loaded = True
        _import_all(__name__, __path__)
    return base


def names() -> list[str]:
    """Every registered experiment name, sorted."""
    return _registry().names()


def get(name: str):
    """The experiment class registered as ``name`` (KeyError with the nearest names otherwise)."""
    return _registry().get(name)


def describe(name: str) -> str:
    """First line of the experiment's docstring."""
    return _registry().describe(name)


def add_set_option(parser) -> None:
    """A script's ``--set KEY=VALUE`` (repeatable): one parameter of its experiment, as ``circuitlab run --set``."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter of the script's experiment (as circuitlab run --set; repeatable)")


def set_overrides(parser, name: str, sets) -> dict:
    """The typed ``--set`` overrides for experiment ``name``, checked against its defaults; a bad key or value
    is the parser's one-line error (exit 2), before the script loads a model."""
    try:
        overrides = _registry().params_from_sets(get(name), sets)
        get(name)(**overrides)  # the constructor checks every value
    except ValueError as err:
        parser.error(str(err))
    return overrides


def catalog() -> dict:
    """``{name: {"description", "parameters"}}`` for every experiment, cached by source fingerprint."""
    from circuitlab.experiments.registry_cache import read_catalog

    return read_catalog(_registry)


def __getattr__(name: str):
    if name in _BASE_NAMES:
        from circuitlab.experiments import base

        return getattr(base, name)
    raise AttributeError(f"module 'circuitlab.experiments' has no attribute {name!r}")
