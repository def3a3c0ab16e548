"""The one atomic write, and the fingerprint of circuitlab's own source files.

Atomic: readers see the old file or the whole new one, never half of it.

``atomic_path`` yields a uniquely named temporary path in the destination's folder (unique across
processes and hosts on a shared filesystem); on success the file is flushed to disk and renamed
over the destination, on failure it is removed. ``atomic_write`` writes bytes through it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write", "code_fingerprint", "PACKAGE_ROOT"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the circuitlab package folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as written:  # durable before it becomes visible
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the circuitlab package's Python sources (paths and bytes), computed once per process."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
