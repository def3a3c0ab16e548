"""Content-keyed cache of experiment units' outputs, and the one round loop that reads and fills it.

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

``run_rounds`` is the one loop over a plan's rounds (units → outputs → ``next_plan`` → ... →
``merge``), shared by the local run (``UnitExperiment.run_plan``: one worker, this process) and the
Ray runner (``circuitlab.distributed``: the units of a round spread over actors). Both key units the
same way, so a unit computed by one is read back by the other.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import io
import os
import pickle
from pathlib import Path
from typing import Callable, Iterable

import torch

from circuitlab.io.files import atomic_write, code_fingerprint

__all__ = ["UnitCache", "digest", "class_source_digest", "run_rounds", "Rounds"]


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

    def keys(self, experiment, model, state, units: list, *, device: str | None = None,
             threads: int | None = None) -> list[str]:
        """One key per unit of a plan round (the state is hashed once). ``device`` (a device type) and
        ``threads``: where the units run when not in this process (a Ray replica); default the model's
        device and this process's torch thread count."""
        if device is None:
            device = getattr(getattr(model, "device", None), "type", str(getattr(model, "device", "")))
        run = [code_fingerprint(), class_source_digest(type(experiment)), type(experiment).__module__,
               type(experiment).__qualname__, repr(experiment),
               getattr(model, "fingerprint", ""), str(getattr(model, "dtype", "")), device,
               str(threads or torch.get_num_threads()), digest(state)]
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


@dataclasses.dataclass
class Rounds:
    """What ``run_rounds`` did: units per round, and how many outputs came from the cache or were computed."""

    sizes: list = dataclasses.field(default_factory=list)
    reused: int = 0
    computed: int = 0


def run_rounds(experiment, model, harmful, harmless, plan, run_units: Callable[..., Iterable[tuple]], *,
               cache: UnitCache | None = None, device: str | None = None, threads: int | None = None,
               record: Callable | None = None, before_merge: Callable[[], None] | None = None):
    """Every round from ``plan`` on, then ``merge``; returns ``(result, Rounds)``.

    Per round: with a ``cache``, each unit's key (``UnitCache.keys`` with ``device`` / ``threads``) and the
    outputs stored under it; the other units go to ``run_units(plan, todo)``, which yields ``(index,
    output)`` in any order (a unit answered twice is kept once), each saved as it arrives. Then the
    experiment's ``next_plan`` (where it has one) gives the next round, or None. ``record(round, plan,
    keys, done, final)``, where given, hears each step (``done``: the indices with an output so far);
    ``before_merge()`` runs once after the last round (the Ray runner frees its workers there).
    With a cache, the Result's config gets ``unit_cache``: this run's reused and computed counts, the root.
    """
    rounds = Rounds()
    while True:
        n = len(plan.units)
        keys = cache.keys(experiment, model, plan.state, plan.units, device=device, threads=threads) if cache else None
        outputs = {}
        for i, key in enumerate(keys or ()):
            found, output = cache.load(model, experiment, key)
            if found:
                outputs[i] = output
        rounds.sizes.append(n)
        rounds.reused += len(outputs)
        step = len(rounds.sizes) - 1
        if record:
            record(step, plan, keys, outputs.keys(), False)
        todo = [i for i in range(n) if i not in outputs]
        for i, output in run_units(plan, todo) if todo else ():
            if i in outputs:
                continue  # a unit that ran twice (a retried worker) is merged once
            outputs[i] = output
            rounds.computed += 1
            if cache:
                cache.save(model, experiment, keys[i], output)
            if record:
                record(step, plan, keys, outputs.keys(), False)
        if record:
            record(step, plan, keys, outputs.keys(), True)
        outputs = [outputs[i] for i in range(n)]
        following = getattr(experiment, "next_plan", None)  # duck-typed: one-round experiments need not define it
        following = following(model, harmful, harmless, plan, outputs) if callable(following) else None
        if following is None:
            break
        plan = following
    if before_merge:
        before_merge()
    result = experiment.merge(model, harmful, harmless, plan, outputs)
    if cache is not None and isinstance(getattr(result, "config", None), dict):
        result.config["unit_cache"] = {"reused": rounds.reused, "computed": rounds.computed, "root": str(cache.root)}
    return result, rounds
