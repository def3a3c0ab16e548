"""Reading a saved circuit-map or edge-attribution run folder, with one-line errors for bad input.

Only saved files are read (``config.json``, ``table.parquet`` or ``table.csv``, the extra
``<name>.csv`` tables ``Result.save`` writes); no model, no torch. pandas is imported on first use,
so importing the viewer stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from circuitlab.viewer.errors import ViewerError

__all__ = ["Run", "load_run", "EXPERIMENTS", "REQUIRED_COLUMNS"]

EXPERIMENTS = ("circuit-map", "edge-attribution")
# columns each experiment's table has had since its current format (circuit-map: the edge stage, issue 13)
REQUIRED_COLUMNS = {
    "circuit-map": ("stage", "stage_rule", "layer", "component", "head", "neuron", "patch_effect", "edge_node"),
    "edge-attribution": ("writer", "reader", "reader_layer", "score", "abs_rank", "method"),
}
EDGE_COLUMNS = ("writer", "reader", "score")


@dataclass
class Run:
    """One run folder: its experiment, config.json, main table and extra tables (by file stem)."""

    path: Path
    experiment: str
    config: dict
    table: "object"  # pandas.DataFrame
    tables: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        return self.config.get("summary") or {}

    @property
    def fingerprint(self) -> str | None:
        return (self.config.get("model") or {}).get("fingerprint")


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ViewerError(f"{path} is not a folder: pass a circuit-map or edge-attribution run folder")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ViewerError(f"{path} is not a circuit run: it has no config.json (pass a folder written by "
                          f"circuitlab run circuit-map or edge-attribution)")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as err:
        raise ViewerError(f"{cfg} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("experiment") not in EXPERIMENTS:
        what = config.get("experiment") if isinstance(config, dict) else None
        raise ViewerError(f"{path} is not a circuit run: its experiment is {what!r}, the viewer shows "
                          f"{' and '.join(EXPERIMENTS)} runs")
    return config


def _read_table(path: Path, name: str):
    """The run's ``name`` table: parquet if saved (exact dtypes), else csv; None when absent."""
    import pandas as pd

    parquet, csv = path / f"{name}.parquet", path / f"{name}.csv"
    try:
        if parquet.is_file():
            return pd.read_parquet(parquet)
        if csv.is_file():
            return pd.read_csv(csv) if csv.stat().st_size else pd.DataFrame()
    except pd.errors.EmptyDataError:  # a table with no rows and no columns (e.g. stability with n_boot=0)
        return pd.DataFrame()
    except Exception as err:  # a damaged file: say which, in one line
        raise ViewerError(f"{path}: cannot read {name} table ({type(err).__name__}: {err})") from None
    return None


def _missing(path: Path, experiment: str, name: str, why: str) -> ViewerError:
    return ViewerError(f"{path}: the {experiment} run has no {name} table ({name}.csv), which {why}; the run "
                       f"folder is incomplete: rerun circuitlab run {experiment} or restore the file")


def _check_format(path: Path, experiment: str, config: dict, table) -> None:
    """Refuse a run saved by an older circuitlab (its table lacks the current columns)."""
    lacking = [c for c in REQUIRED_COLUMNS[experiment] if c not in table.columns]
    if lacking or "provenance" not in config:
        what = f"its table has no {', '.join(lacking)} column{'s' * (len(lacking) > 1)}" if lacking else \
            "its config.json has no provenance record"
        raise ViewerError(f"{path} is a {experiment} run from an older format ({what}); rerun "
                          f"circuitlab run {experiment} with this version to view it")


def load_run(path) -> Run:
    """Read and validate a circuit-map or edge-attribution run folder (ViewerError on bad input)."""
    path = Path(path).expanduser()
    config = _read_config(path)
    experiment = config["experiment"]
    table = _read_table(path, "table")
    if table is None:
        raise ViewerError(f"{path}: the {experiment} run has no table.parquet or table.csv (its rows); the run "
                          f"folder is incomplete: rerun circuitlab run {experiment} or restore the file")
    _check_format(path, experiment, config, table)
    tables = {}
    if experiment == "circuit-map":
        if (config.get("summary") or {}).get("edge_circuit_edges") is not None:
            for name, why in (("circuit_edges", "holds the edge circuit's edges"),
                              ("edge_circuit", "holds the circuit's size and faithfulness")):
                tables[name] = _read_table(path, name)
                if tables[name] is None:
                    raise _missing(path, experiment, name, why)
            lacking = [c for c in EDGE_COLUMNS if c not in tables["circuit_edges"].columns]
            if lacking:
                raise ViewerError(f"{path}: circuit_edges.csv has no {', '.join(lacking)} column; rerun "
                                  f"circuitlab run circuit-map")
        layers = _read_table(path, "layers")
        if layers is not None:
            tables["layers"] = layers
    else:
        tables["curve"] = _read_table(path, "curve")
        if tables["curve"] is None:
            raise _missing(path, experiment, "curve", "holds the faithfulness curve")
        for name in ("summary", "graph", "stability"):
            extra = _read_table(path, name)
            if extra is not None:
                tables[name] = extra
    return Run(path, experiment, config, table, tables)
