"""circuitlab: find, verify, stress-test and monitor the components behind a model's refusal.

The package is laid out by layer (docs/guide/architecture.md): ``core`` (the model and its
vocabulary), ``io`` (datasets, results, provenance, caches), ``models`` (embedded, tiny, planted),
``methods`` (one implementation each), ``graph`` / ``monitor`` / ``defence`` / ``distributed``
(capabilities), ``experiments`` (registered Experiment classes) and ``cli``. Names are imported
on first use, so ``import circuitlab`` (and the CLI's ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib

from circuitlab import compat

compat.install()

__all__ = ["load_model", "HookedModel", "datasets", "hooks", "metrics", "experiments",
           "ActivationStore", "Result"]
__version__ = "0.1.0"

_LAZY = {
    "load_model": ("circuitlab.models.loading", "load_model"),
    "HookedModel": ("circuitlab.core.model", "HookedModel"),
    "Result": ("circuitlab.io.results", "Result"),
    "ActivationStore": ("circuitlab.io.store", "ActivationStore"),
    "experiments": ("circuitlab.experiments", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        return value if attr is None else getattr(value, attr)
    if name in compat.MOVED:  # circuitlab.hooks, circuitlab.metrics, ... (old homes)
        return importlib.import_module(f"circuitlab.{name}")
    raise AttributeError(f"module 'circuitlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
