"""The module paths before the layer subpackages, kept importable for user code.

``import circuitlab.store`` (or ``from circuitlab import hooks``) gives the very module object that
now lives at ``circuitlab.io.store`` (``circuitlab.core.hooks``): one module, two names, so a
monkeypatch through either name patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# old dotted name (under circuitlab.) -> new home; docs/guide/architecture.md has the layer map
MOVED = {
    "hooks": "core.hooks", "components": "core.components", "progress": "core.progress",
    "generation": "core.generation", "model": "core.model", "weights": "core.weights",
    "datasets": "io.datasets", "provenance": "io.provenance", "plots": "io.plots", "results": "io.results",
    "unit_cache": "io.unit_cache", "store": "io.store",
    "embedded": "models.embedded", "tiny": "models.tiny", "planted": "models.planted", "loading": "models.loading",
    "metrics": "methods.metrics", "heretic_scoring": "methods.heretic_scoring", "directions": "methods.directions",
    "direction_eval": "methods.direction_eval", "interventions": "methods.interventions",
    "attribution": "methods.attribution", "ranking": "methods.ranking", "probes": "methods.probes",
    "abliteration": "methods.abliteration",
    "experiments.patching.engine": "methods.patching", "experiments.patching.pairs": "methods.pairs",
    "finetune": "defence.finetune", "tampering": "defence.tampering",
}
_FULL = {f"circuitlab.{old}": f"circuitlab.{new}" for old, new in MOVED.items()}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module at its new home."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _FULL:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_FULL[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    """Register the finder once per process."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
