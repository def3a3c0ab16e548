"""Result: a tidy table plus everything needed to reproduce it, saved as one run directory.

``save(dir)`` writes ``table.parquet``, ``table.csv``, ``config.json``, extra tables
(``<name>.csv``) and figures (``<name>.png``) into a temporary sibling directory and renames it
into place, so an interrupted save never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

__all__ = ["Result", "check_table", "COMPONENTS", "SHARED_COLUMNS", "load_result", "run_config"]

SHARED_COLUMNS = ("layer", "component", "head", "neuron", "position")
COMPONENTS = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron",
              "direction", "embed", "logits"}
_PACKAGES = ("circuitlab", "torch", "transformer-lens", "transformers", "scikit-learn", "pandas", "numpy")


def check_table(table: pd.DataFrame) -> None:
    """Raise ValueError unless ``table`` follows the tidy contract (shared names, known components)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"Result.table must be a pandas DataFrame, got {type(table).__name__}")
    if "component" in table.columns:
        unknown = set(table["component"].dropna().unique()) - COMPONENTS
        if unknown:
            raise ValueError(f"unknown component values {sorted(unknown)}; allowed: {sorted(COMPONENTS)}")
    if "layer" in table.columns and len(table) and not pd.api.types.is_integer_dtype(table["layer"].dropna()):
        raise ValueError("column 'layer' must hold integers")
    if table.columns.duplicated().any():
        raise ValueError("duplicate column names")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_config(experiment: str, params: dict, model=None, datasets: dict | None = None, seed: int | None = None) -> dict:
    """The provenance record written as config.json."""
    return {
        "experiment": experiment,
        "parameters": params,
        "model": None if model is None else {"id": model.name, "fingerprint": model.fingerprint},
        "datasets": {k: {"name": getattr(v, "name", k), "hash": getattr(v, "hash", None), "n": len(v)}
                     for k, v in (datasets or {}).items()},
        "seed": seed,
        "versions": _versions(),
        "git_commit": _git_commit(),
    }


@dataclass
class Result:
    """What an experiment returns: ``table`` (tidy), ``config`` (provenance), extras and figures."""

    table: pd.DataFrame
    config: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # name -> matplotlib Figure
    summary: dict = field(default_factory=dict)  # headline numbers, also saved in config.json

    def __post_init__(self):
        check_table(self.table)

    @property
    def experiment(self) -> str:
        return self.config.get("experiment", "")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the run directory atomically; returns its path."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.table.to_parquet(tmp / "table.parquet", index=False)
            self.table.to_csv(tmp / "table.csv", index=False)
            for name, df in self.tables.items():
                df.to_csv(tmp / f"{name}.csv", index=False)
            for name, fig in self.figures.items():
                fig.savefig(tmp / f"{name}.png", dpi=120, bbox_inches="tight")
            config = dict(self.config, summary=self.summary)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
            old = directory.with_name(f".{directory.name}.old")
            if directory.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def plot(self):
        """The result's figures (``{name: Figure}``)."""
        return self.figures


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple, Path)):
        return list(obj) if not isinstance(obj, Path) else str(obj)
    return str(obj)


def load_result(directory: str | os.PathLike) -> Result:
    """Read a run directory written by ``Result.save``."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    tables = {p.stem: pd.read_csv(p) for p in directory.glob("*.csv") if p.stem != "table"}
    return Result(pd.read_parquet(directory / "table.parquet"), config, tables=tables,
                  summary=config.get("summary", {}))
