"""Constructor checks shared by every experiment's ``__post_init__`` (built on ``base.check``).

``check_types`` compares each parameter with its annotation (``int``, ``float``, ``bool``, ``str``,
``list[...]``, ``X | None``); ``check_at_least`` and ``check_fraction`` bound numbers and
``check_subset`` lists of choices. Every message
names the parameter, what it must be, and a working value (the default) in ``--set`` form, so
``ActivationPatching(n_pairs=-1)`` fails at construction, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

from circuitlab.experiments.base import check
from circuitlab.io.datasets import is_builtin

__all__ = ["check_types", "check_at_least", "check_fraction", "check_subset", "check_files", "check_prompt_sets",
           "example"]


def example(exp, name: str) -> str:
    """A working value for ``name`` in CLI ``--set`` form: ``name=<default>``."""
    field = {f.name: f for f in dataclasses.fields(exp)}[name]
    value = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"--set {name}={'none' if value is None else value}"


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # other annotations (tensors, callables) are not parameters a user types


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return f"a finite {hint.__name__}" if hint is float else getattr(hint, "__name__", str(hint))


def check_types(exp) -> None:
    """Every init parameter of the dataclass ``exp`` matches its type annotation."""
    hints = typing.get_type_hints(type(exp))
    for f in dataclasses.fields(exp):
        if f.init and f.name in hints:
            value = getattr(exp, f.name)
            check(_matches(value, hints[f.name]),
                  f"{f.name}={value!r} must be {_describe(hints[f.name])} (e.g. {example(exp, f.name)})")


def check_at_least(exp, minimum, *names: str) -> None:
    """Each named parameter (skipped when None) is >= ``minimum``; for lists, every entry."""
    for name in names:
        value = getattr(exp, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        check(value is None or all(v >= minimum for v in values),
              f"{name}={value!r} must be >= {minimum} (e.g. {example(exp, name)})")


def check_subset(exp, name: str, choices, *, allow_none: bool = False) -> None:
    """``name`` is a non-empty list drawn from ``choices`` (or None when ``allow_none``)."""
    value = getattr(exp, name)
    if value is None and allow_none:
        return
    unknown = sorted(set(value) - set(choices))
    check(len(value) > 0 and not unknown,
          f"{name}={value!r}: {'unknown ' + ', '.join(map(str, unknown)) if unknown else 'empty'}; choose a non-empty "
          f"list from {', '.join(choices)} (e.g. {example(exp, name)})")


def check_files(exp, *names: str) -> None:
    """Each named path parameter (skipped when None) is an existing file: fail before the model loads."""
    for name in names:
        value = getattr(exp, name)
        check(value is None or Path(value).is_file(), f"{name}={value!r} is not a file (give the path of an "
              f"existing file, or {example(exp, name)})")


def check_prompt_sets(exp, *names: str) -> None:
    """Each named prompt-set parameter (skipped when None) is a built-in set or an existing file."""
    for name in names:
        value = getattr(exp, name)
        check(value is None or is_builtin(value) or Path(value).is_file(),
              f"{name}={value!r} is neither a built-in prompt set nor a file (e.g. {example(exp, name)})")


def check_fraction(exp, *names: str, closed: bool = False) -> None:
    """Each named parameter lies in (0, 1) (``closed``: [0, 1])."""
    for name in names:
        value = getattr(exp, name)
        ok = 0 <= value <= 1 if closed else 0 < value < 1
        check(ok, f"{name}={value!r} must be in {'[0, 1]' if closed else '(0, 1)'} (e.g. {example(exp, name)})")
