"""Experiment base class and the registry every experiment joins by decorator.

Contract (checked by tests/test_conformance.py for every registered experiment):
parameters only in ``__init__`` (a dataclass), data and model only in
``run(model, harmful, harmless, *, store=None) -> Result``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import tokenize
import typing
from typing import Callable

from circuitlab.io import provenance
from circuitlab.core.progress import progress_bar
from circuitlab.io.datasets import PromptSet
from circuitlab.core.model import HookedModel
from circuitlab.io.results import Result, run_config
from circuitlab.io.unit_cache import run_rounds

__all__ = ["Experiment", "register", "get", "names", "describe", "coerce_params", "params_from_sets", "check",
           "check_choice",
           "check_layers", "ParameterError", "parameters",
           "Plan", "UnitExperiment"]

_REGISTRY: dict[str, type["Experiment"]] = {}


class ParameterError(ValueError):
    """An experiment parameter that is out of range or of the wrong type (raised in ``__post_init__``)."""


def check(ok: bool, message: str) -> None:
    """Raise ParameterError(message) unless ``ok``: constructors validate before any compute."""
    if not ok:
        raise ParameterError(message)


def check_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices``."""
    check(value in choices, f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_layers(name: str, layers, *, allow_none: bool = True) -> None:
    """``layers``: None (all) or a non-empty list of non-negative ints (the model's range is checked in run)."""
    if layers is None and allow_none:
        return
    check(isinstance(layers, (list, tuple)) and len(layers) > 0
          and all(isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in layers),
          f"{name} must be {'None or ' if allow_none else ''}a non-empty list of layer indices >= 0 "
          f"(e.g. --set {name}=0,1), got {layers!r}")


class Experiment:
    """Base class: subclasses are dataclasses of parameters with a ``run`` method."""

    name: typing.ClassVar[str] = ""
    seed: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _recorded(cls.__dict__["run"])

    def run(self, model: HookedModel, harmful: PromptSet, harmless: PromptSet, *, store=None) -> Result:
        raise NotImplementedError

    def params(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def config(self, model: HookedModel, **datasets) -> dict:
        """Provenance record for this run (see ``results.run_config``)."""
        return run_config(self.name, self.params(), model, datasets, seed=getattr(self, "seed", None))


def _recorded(run):
    """Wrap ``run`` so its Result's config carries provenance taken when the run STARTED (code, load, time)."""
    @functools.wraps(run)
    def wrapper(self, model, *args, **kwargs):
        record = provenance.start()
        result = run(self, model, *args, **kwargs)
        if isinstance(result, Result) and "provenance" not in result.config:
            result.config["provenance"] = provenance.finish(record, model)
            if record.get("dirty"):
                result.summary.setdefault("dirty_tree", f"uncommitted changes (diff {record['diff_sha256']}) "
                                                        f"on {str(record['commit'])[:10]}")
        return result
    return wrapper


@dataclasses.dataclass
class Plan:
    """What ``UnitExperiment.plan`` (and ``next_plan``) returns: independent, idempotent ``units``, the
    shared ``state`` (picklable: tensors, tables, prompt lists) every unit needs, and ``context``: what
    ``next_plan`` / ``merge`` need and the units do not (kept where the plan was made, never shipped)."""

    units: list
    state: dict = dataclasses.field(default_factory=dict)
    context: dict = dataclasses.field(default_factory=dict)
    label: str = ""  # what the units do, for progress bars


class UnitExperiment(Experiment):
    """An experiment whose work is independent units (patching pairs, grid points, candidates) and a merge.

    ``run`` = ``plan`` → ``run_unit`` for every unit → ``merge``; a distributed runner
    (``circuitlab.distributed``) calls the same methods with the units spread over workers, so a
    local run is the same code with one worker and both give the same table. ``run_unit`` must depend
    only on ``(model, plan.state, unit)`` (idempotent: a retried unit gives the same output).

    Rounds: where which units to run depends on earlier units' outputs (judge where the scores say,
    score the finalists of a screen), ``next_plan(model, harmful, harmless, plan, outputs)`` returns
    the next round's Plan (its ``context`` carries what later rounds and ``merge`` need), or None;
    ``merge`` then gets the last round's plan and outputs.
    """

    def plan(self, model: HookedModel, harmful: PromptSet, harmless: PromptSet, *, store=None) -> Plan:
        raise NotImplementedError

    def run_unit(self, model: HookedModel, state: dict, unit):
        raise NotImplementedError

    def next_plan(self, model: HookedModel, harmful: PromptSet, harmless: PromptSet, plan: Plan,
                  outputs: list) -> Plan | None:
        return None  # one round: merge right away

    def merge(self, model: HookedModel, harmful: PromptSet, harmless: PromptSet, plan: Plan, outputs: list) -> Result:
        raise NotImplementedError

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        return self.run_plan(model, harmful, harmless, self.plan(model, harmful, harmless, store=store), store=store)

    def run_plan(self, model, harmful, harmless, plan: Plan, *, store=None) -> Result:
        """Every round from ``plan`` on in this process, then ``merge``: ``unit_cache.run_rounds``, the round
        loop the distributed runner uses too, with one worker.

        With a ``store`` that keeps a unit cache (an on-disk ``ActivationStore``), each unit's output is
        read back when the same code, parameters, model, state and unit computed it before (here or on
        Ray), else computed and saved; the Result's config says how many were reused (``unit_cache``).
        """
        def here(plan: Plan, todo: list[int]):
            for i in progress_bar(todo, True, total=len(todo), desc=plan.label or self.name):
                yield i, self.run_unit(model, plan.state, plan.units[i])

        cache = store.unit_cache() if store is not None else None
        return run_rounds(self, model, harmful, harmless, plan, here, cache=cache)[0]


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an experiment findable by ``name``; duplicate names are refused."""
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"experiment name {name!r} is already registered by {_REGISTRY[name].__module__}")
        if not issubclass(cls, Experiment):
            raise TypeError(f"{cls.__name__} must subclass circuitlab.experiments.Experiment")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def get(name: str) -> type[Experiment]:
    """The experiment class registered as ``name`` (error lists the nearest names)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"no experiment named {name!r}.{hint} Registered: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """First line of the experiment's docstring."""
    doc = get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def coerce_params(cls: type[Experiment], raw: dict[str, str]) -> dict:
    """Turn ``key=value`` strings (from the CLI) into typed parameters of ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{cls.name} has no parameter {key!r}; parameters: {', '.join(fields) or 'none'}")
        out[key] = _coerce(value, hints.get(key, str), key)
    return out


def params_from_sets(cls: type[Experiment], pairs) -> dict:
    """Typed parameters of ``cls`` from ``--set`` strings ``["key=value", ...]`` (the CLI's and the scripts')."""
    raw = {}
    for pair in pairs:
        if "=" not in pair:
            raise ParameterError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        raw[key.strip()] = value.strip()
    return coerce_params(cls, raw)


def _coerce(value: str, hint, key: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"parameter {key}: cannot read {value!r} as "
                         f"{_type_name(hint)} ({'; '.join(errors)})")
    if origin in (list, tuple):
        inner = args[0] if args else str
        body = value.strip()
        if body.startswith("[") and body.endswith("]"):  # accept Python/JSON list syntax too
            body = body[1:-1]
        items = [v.strip().strip("'\"") for v in body.split(",")]
        if items == [""]:
            raise ValueError(f"parameter {key}: an empty list; give values like {key}=0,1 or {key}=[0,1], "
                             f"or {key}=none for the default")
        if "" in items:  # "1,,2" is a typo, not [1, 2]
            raise ValueError(f"parameter {key}: {value!r} has an empty item; separate values by single commas "
                             f"({key}=0,1)")
        return (list if origin is list else tuple)(_coerce(v, inner, key) for v in items)
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint in (int, float, str):
            return hint(value)
    except ValueError:
        raise ValueError(f"parameter {key}: {value!r} is not a valid {hint.__name__}") from None
    return value


def _field_comments(cls) -> dict[str, str]:
    """``{field: its trailing '# comment'}`` read from the class source (the one-line meaning of each field)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        pending = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and pending is None:
                pending = (tok.string, tok.start[0])
            elif tok.type == tokenize.COMMENT and pending and tok.start[0] == pending[1]:
                out[pending[0]] = tok.string.lstrip("#").strip()
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                pending = None
    return out


def _type_name(hint) -> str:
    text = str(hint) if typing.get_origin(hint) or not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def parameters(cls: type[Experiment]) -> list[dict]:
    """Every parameter of an experiment: ``{name, type, default, meaning}`` (the CLI's ``--set`` keys)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, str)), "default": default,
                    "meaning": comments.get(f.name, "")})
    return out
