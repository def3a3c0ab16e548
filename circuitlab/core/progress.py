"""Progress bars for long work (tqdm on stderr; silent when disabled or in CI logs)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool = True, *, total: int | None = None, desc: str = "") -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when ``enabled`` (``CIRCUITLAB_PROGRESS=0`` turns all bars off)."""
    if not enabled or os.environ.get("CIRCUITLAB_PROGRESS", "1") == "0":
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
