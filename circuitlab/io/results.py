"""Result: a tidy table plus everything needed to reproduce it, saved as one run folder.

``save(dir)`` writes ``table.parquet``, ``table.csv``, ``config.json``, extra tables (``<name>.csv``)
and figures (``<name>.png``) into a temporary sibling folder and renames it into place, so an
interrupted save never leaves a half-written run behind.

The run-folder rule (a user's files are never deleted or moved): ``dir`` may be a new path, an empty
folder, or — with ``overwrite=True`` — a previous circuitlab run folder (it holds the
``.circuitlab-run`` manifest and nothing but the files that run wrote). Anything else (a file, a
folder with other content) is refused with ``OutputError`` before anything is touched;
``check_output_dir`` applies the same rule before an experiment starts computing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from circuitlab.core import components
from circuitlab.io import provenance

__all__ = ["Result", "SavedFigure", "check_table", "SHARED_COLUMNS", "load_result", "run_config", "check_output_dir", "check_writable",
           "OutputError", "MANIFEST"]

SHARED_COLUMNS = ("layer", "component", "head", "neuron", "position")
MANIFEST = ".circuitlab-run"


class OutputError(ValueError):
    """An output folder that cannot be written without touching a user's files."""


def check_table(table: pd.DataFrame) -> None:
    """Raise ValueError unless ``table`` follows the tidy contract (shared names, known components)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"Result.table must be a pandas DataFrame, got {type(table).__name__}")
    if "component" in table.columns:
        kinds = _known_kinds()
        unknown = set(table["component"].dropna().unique()) - kinds
        if unknown:
            raise ValueError(f"unknown component values {sorted(unknown)}; allowed: {sorted(kinds)} "
                             "(register a new kind with circuitlab.core.components.register_kind)")
    if "layer" in table.columns and len(table) and not pd.api.types.is_integer_dtype(table["layer"].dropna()):
        raise ValueError("column 'layer' must hold integers")
    if table.columns.duplicated().any():
        raise ValueError("duplicate column names")


def _known_kinds() -> set[str]:
    return set(components.known_kinds())


def _run_files(directory: Path) -> set[str] | None:
    """The files a previous circuitlab run wrote there (its manifest), or None if it is not a run folder."""
    try:
        return set(json.loads((directory / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # runs saved before the manifest existed: config.json names the experiment
        json.loads((directory / "config.json").read_text())["experiment"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {p.name for p in directory.iterdir() if p.suffix in (".csv", ".png", ".parquet") or p.name == "config.json"}


def check_output_dir(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise OutputError unless a run can be saved at ``directory`` without touching a user's files.

    Cheap and side-effect free: call it before computing, so a bad ``--out`` fails in a second.
    """
    directory = Path(os.path.abspath(Path(directory).expanduser()))  # "." and "" name the current folder
    cwd = Path(os.getcwd())
    if directory == cwd or directory in cwd.parents:  # saving replaces the folder: never the one we stand in
        raise OutputError(f"output {directory} is the current folder (or holds it); choose a new folder path "
                          "such as runs/my_run (nothing was written)")
    check_writable(directory)
    if directory.is_dir():
        entries = {p.name for p in directory.iterdir()}
        if entries:
            ours = _run_files(directory)
            if ours is None:
                raise OutputError(f"output folder {directory} already holds files that are not a circuitlab run "
                                  f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); "
                                  "choose a new or empty folder (nothing was touched)")
            foreign = entries - ours
            if foreign:
                raise OutputError(f"output folder {directory} is a circuitlab run but also holds other files "
                                  f"({', '.join(sorted(foreign)[:3])}); move them or choose another folder")
            if not overwrite:
                raise OutputError(f"output folder {directory} holds a previous circuitlab run; pass --overwrite "
                                  "(Result.save(..., overwrite=True)) to replace it, or choose another folder")
    return directory


def check_writable(directory: str | os.PathLike, what: str = "--out") -> Path:
    """Raise OutputError unless a folder can be created or written at ``directory`` (a real probe)."""
    directory = Path(os.path.abspath(Path(directory).expanduser()))
    for parent in [directory, *directory.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == directory else f"is inside {parent}, which is a file"
            raise OutputError(f"{what} {directory} {where}; choose a folder path (nothing was written)")
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    try:  # a real probe: permission bits say nothing for root or on read-only filesystems
        os.rmdir(tempfile.mkdtemp(prefix=".circuitlab-probe.", dir=existing))
    except OSError as err:
        raise OutputError(f"cannot write under {existing} ({err.strerror}); choose a writable {what} folder") from None
    return directory


def run_config(experiment: str, params: dict, model=None, datasets: dict | None = None, seed: int | None = None) -> dict:
    """The provenance record written as config.json (code state and timing are added by the run)."""
    return {
        "experiment": experiment,
        "parameters": params,
        "model": None if model is None else {"id": model.name, "fingerprint": model.fingerprint,
                                            "refusal_tokens": getattr(model, "refusal_token_record", None)},
        "datasets": {k: {"name": getattr(v, "name", k), "hash": getattr(v, "hash", None), "n": len(v)}
                     for k, v in (datasets or {}).items()},
        "seed": seed,
        "versions": provenance.versions(),
    }


@dataclass
class Result:
    """What an experiment returns: ``table`` (tidy), ``config`` (provenance), extras and figures."""

    table: pd.DataFrame
    config: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # name -> matplotlib Figure
    summary: dict = field(default_factory=dict)  # headline numbers, also saved in config.json
    files: dict[str, bytes | str] = field(default_factory=dict)  # other artifacts (name -> content), saved atomically too

    def __post_init__(self):
        check_table(self.table)

    @property
    def experiment(self) -> str:
        return self.config.get("experiment", "")

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the run folder atomically under the run-folder rule (module docstring); returns its path."""
        directory = check_output_dir(directory, overwrite)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; a run folder is an ordinary folder
            self.table.to_parquet(tmp / "table.parquet", index=False)
            self.table.to_csv(tmp / "table.csv", index=False)
            for name, df in self.tables.items():
                df.to_csv(tmp / f"{name}.csv", index=False)
            for name, fig in self.figures.items():
                fig.savefig(tmp / f"{name}.png", dpi=120, bbox_inches="tight")
            for name, content in self.files.items():
                if Path(name).name != name or name in ("config.json", MANIFEST):
                    raise ValueError(f"extra file name {name!r} must be a plain file name other than config.json")
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
            config = dict(self.config)
            config.setdefault("provenance", {**provenance.git_state(), "recorded": "at save (not inside a run)"})
            config["summary"] = self.summary  # last, so a loaded run saves back byte for byte
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / MANIFEST).write_text(json.dumps({"files": files}))
            old = None
            if directory.exists():  # an empty folder, or a previous run (checked above): only our files
                old = directory.with_name(f".{directory.name}.{tmp.name[-8:]}.old")
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def plot(self):
        """The result's figures (``{name: Figure}``)."""
        return self.figures

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Result":
        """The Result that ``save`` wrote to ``directory``: table, config, tables, figures, summary, files."""
        return load_result(directory)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple, Path)):
        return list(obj) if not isinstance(obj, Path) else str(obj)
    return str(obj)


class SavedFigure:
    """A figure read back from a run folder: its PNG bytes, written unchanged by ``savefig``."""

    def __init__(self, png: bytes):
        self.png = png

    def savefig(self, path, **_ignored) -> None:
        Path(path).write_bytes(self.png)

    def _repr_png_(self) -> bytes:  # shown inline in notebooks
        return self.png


def load_result(directory: str | os.PathLike) -> Result:
    """Read a run folder written by ``Result.save``: table, config, extra tables, figures and files.

    Raises ``OutputError`` (one line) for a folder that is not a run or lacks its table.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise OutputError(f"{directory} is not a folder; give the folder a circuitlab run was saved to")
    try:
        config = json.loads((directory / "config.json").read_text())
        config["experiment"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{directory} is not a circuitlab run (no readable config.json naming its experiment)") from None
    if not (directory / "table.parquet").is_file():
        raise OutputError(f"{directory} is a circuitlab run without its table.parquet; it cannot be loaded")
    written = _run_files(directory) or set()
    tables = {p.stem: pd.read_csv(p) for p in sorted(directory.glob("*.csv")) if p.stem != "table"}
    figures = {p.stem: SavedFigure(p.read_bytes()) for p in sorted(directory.glob("*.png"))}
    known = {"table.parquet", "table.csv", "config.json", MANIFEST} | {f"{n}.csv" for n in tables} | \
        {f"{n}.png" for n in figures}
    files = {name: (directory / name).read_bytes() for name in sorted(written - known) if (directory / name).is_file()}
    summary = config.pop("summary", {})
    return Result(pd.read_parquet(directory / "table.parquet"), config, tables=tables, figures=figures,
                  summary=summary, files=files)
