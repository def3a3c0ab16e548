"""What ``circuitlab list`` and ``describe`` print, without importing torch when nothing changed.

The registry needs every experiment module imported (torch, transformers: seconds). Its answer —
names, one-line descriptions, parameters with type, default and meaning — depends only on the
source code, so it is kept in the user cache under the sha256 of circuitlab's sources and
recomputed whenever any source file changes.
"""

from __future__ import annotations

import json
from typing import Callable

from circuitlab.io.files import atomic_write, code_fingerprint
from circuitlab.io.paths import cache_dir

__all__ = ["read_catalog", "build_catalog"]


def build_catalog(registry) -> dict:
    """``{name: {"description", "parameters": [{name, type, default (repr), meaning}]}}`` from the registry."""
    out = {}
    for name in registry.names():
        params = [dict(p, default=repr(p["default"])) for p in registry.parameters(registry.get(name))]
        out[name] = {"description": registry.describe(name), "parameters": params}
    return out


def read_catalog(load_registry: Callable) -> dict:
    """The cached catalog for the current sources; ``load_registry()`` (slow) only on a miss."""
    path = cache_dir() / "catalog" / f"{code_fingerprint()[:24]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    catalog = build_catalog(load_registry())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(catalog).encode())
    except OSError:  # a read-only cache only costs speed
        pass
    return catalog
