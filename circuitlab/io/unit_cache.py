"""Content-keyed cache of experiment units' outputs: a unit computed once is read back on the next run.

A ``UnitExperiment``'s ``run_unit`` depends only on ``(model, plan.state, unit)`` (the contract in
``experiments.base``), so its output is keyed by a sha256 over exactly that and what runs it:

- the circuitlab source code (every ``.py`` file of the installed package) and the source file of the
  experiment's class (an experiment registered from outside the package): any code change recomputes;
- the experiment's class and parameters (its ``repr``);
- the model's weights fingerprint, dtype and device type, and torch's thread count (CPU kernels split
  sums by thread count, so another count can round differently in the last digits);
- the plan's state and the unit itself (tensors hashed by dtype, shape and bytes).

Layout: ``root/<model fingerprint>/<experiment name>/<key>.pkl``, each written atomically (temp
file, fsync, rename). A file that does not unpickle, or whose stored key differs from its name, is
recomputed, never trusted. These are pickles: only point the cache at a directory you trust (the
activation store's own directory is the default, see ``ActivationStore.unit_cache``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import pickle
from pathlib import Path

import torch

from circuitlab.io.files import atomic_write, code_fingerprint

__all__ = ["UnitCache", "digest", "class_source_digest"]


class _StablePickler(pickle.Pickler):
    """Pickles tensors as (dtype, shape, bytes): torch's own pickle of two equal tensors differs."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            raw = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return tuple, ((str(obj.dtype), tuple(obj.shape), raw),)
        return NotImplemented


def digest(obj) -> str:
    """sha256 of ``obj``'s pickle, equal for equal content (tensors by dtype, shape and bytes)."""
    buffer = io.BytesIO()
    _StablePickler(buffer, protocol=4).dump(obj)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def class_source_digest(cls) -> str:
    """sha256 of the file defining ``cls`` ('' where there is none: an interactive session's class)."""
    try:
        return _file_digest(inspect.getsourcefile(cls) or "")
    except (TypeError, OSError):
        return ""


class UnitCache:
    """Unit outputs on disk under ``root``; ``reused`` / ``computed`` count this object's lookups."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.reused = self.computed = 0

    def keys(self, experiment, model, state, units: list) -> list[str]:
        """One key per unit of a plan round (the state is hashed once)."""
        device = getattr(getattr(model, "device", None), "type", str(getattr(model, "device", "")))
        run = [code_fingerprint(), class_source_digest(type(experiment)), type(experiment).__module__,
               type(experiment).__qualname__, repr(experiment),
               getattr(model, "fingerprint", ""), str(getattr(model, "dtype", "")), device,
               str(torch.get_num_threads()), digest(state)]
        prefix = "\x1e".join(run)
        return [hashlib.sha256(f"{prefix}\x1e{digest(unit)}".encode()).hexdigest() for unit in units]

    def _path(self, model, experiment, key: str) -> Path:
        name = getattr(experiment, "name", "") or type(experiment).__name__
        return self.root / str(getattr(model, "fingerprint", "unknown")) / name / f"{key}.pkl"

    def load(self, model, experiment, key: str):
        """``(True, output)`` for a stored, intact unit output; ``(False, None)`` otherwise."""
        try:
            record = pickle.loads(self._path(model, experiment, key).read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError):
            return False, None
        if isinstance(record, dict) and record.get("key") == key:
            self.reused += 1
            return True, record["output"]
        return False, None

    def save(self, model, experiment, key: str, output) -> None:
        path = self._path(model, experiment, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, pickle.dumps({"key": key, "output": output}))
        self.computed += 1
