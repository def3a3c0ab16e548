"""Save a fitted request monitor as one small file with its provenance; load it only onto the same weights.

The file (``torch.save`` of plain values and tensors, read back with ``weights_only=True``) holds the
monitor's fields, the model's name and weight fingerprint (``HookedModel.fingerprint``), the package
versions and git state, and any caller provenance. ``load_monitor(path, model)`` refuses a model whose
fingerprint differs: a monitor's weights are read-outs of one model's residual stream, meaningless on
another's (and a changed fingerprint is itself what the integrity monitor alarms on).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from circuitlab.core.model import HookedModel
from circuitlab.io.provenance import git_state, versions
from circuitlab.monitor.cascade import UnionMonitor
from circuitlab.monitor.circuit import units_from_plain, units_to_plain
from circuitlab.monitor.decision import FeatureMonitor
from circuitlab.monitor.request import RequestMonitor

__all__ = ["save_monitor", "load_monitor", "MonitorFileError", "FORMAT"]

FORMAT = "circuitlab-monitor/1"
_CLASSES = {c.__name__: c for c in (RequestMonitor, FeatureMonitor, UnionMonitor)}


class MonitorFileError(ValueError):
    """A monitor file that cannot be used as given (wrong model, not a monitor file)."""


def _to_plain(mon: RequestMonitor) -> dict:
    if type(mon).__name__ not in _CLASSES:
        raise MonitorFileError(f"cannot save a {type(mon).__name__}; save one of {', '.join(_CLASSES)}")
    fields = {}
    for f in dataclasses.fields(mon):
        v = getattr(mon, f.name)
        if f.name == "members":
            v = [_to_plain(m) for m in v]
        elif f.name == "units":
            v = units_to_plain(v)  # Components become [kind, layer, index]
        elif isinstance(v, dict):
            v = {str(k): v2 for k, v2 in v.items()}  # layer keys become strings (weights_only-safe)
        elif isinstance(v, tuple):
            v = list(v)
        fields[f.name] = v
    return {"class": type(mon).__name__, "fields": fields}


def _from_plain(d: dict) -> RequestMonitor:
    cls = _CLASSES.get(d.get("class"))
    if cls is None:
        raise MonitorFileError(f"unknown monitor class {d.get('class')!r}; the file is from another version")
    f = dict(d["fields"])
    if "members" in f:
        f["members"] = [_from_plain(m) for m in f["members"]]
    if "units" in f:
        f["units"] = units_from_plain(f["units"])
    if "layers" in f:
        f["layers"] = tuple(f["layers"])
    if "layer_scores" in f:
        f["layer_scores"] = {int(k): v for k, v in f["layer_scores"].items()}
    return cls(**f)


def save_monitor(monitor: RequestMonitor, model: HookedModel, path, *, provenance: dict | None = None) -> Path:
    """Write ``monitor`` (fitted on ``model``) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "monitor": _to_plain(monitor), "model": model.name,
              "fingerprint": model.fingerprint, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": versions(), "git": git_state(), "provenance": dict(provenance or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def load_monitor(path, model: HookedModel | None = None) -> tuple[RequestMonitor, dict]:
    """Read a monitor file; with ``model``, refuse it unless its weight fingerprint matches.
    Returns ``(monitor, record)`` (the record: provenance, model id, fingerprint)."""
    path = Path(path)
    if not path.is_file():
        raise MonitorFileError(f"{path}: no such monitor file (write one with `circuitlab monitor fit`)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise MonitorFileError(f"{path} is not a circuitlab monitor file ({type(err).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MonitorFileError(f"{path} is not a circuitlab monitor file (format {FORMAT} expected)")
    if model is not None and model.fingerprint != record["fingerprint"]:
        raise MonitorFileError(f"{path} was fitted on {record['model']} weights {record['fingerprint']}, but this "
                               f"model's weights are {model.fingerprint}; refit the monitor on this model")
    return _from_plain(record["monitor"]), record
