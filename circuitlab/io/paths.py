"""Where circuitlab keeps what it computes once: the user cache root."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The user cache root: ``$CIRCUITLAB_CACHE`` or ``~/.cache/circuitlab``."""
    root = Path(os.environ.get("CIRCUITLAB_CACHE", Path.home() / ".cache" / "circuitlab"))
    root.mkdir(parents=True, exist_ok=True)
    return root
