"""Component kinds (the one vocabulary) and Component: one addressable unit of a model.

Every ``component`` label a result table may hold is a *kind* registered here: the hook-addressable
ones (a neuron, a head, a layer's output, a residual-stream point) and plain table labels
(``direction``, ``embed``, ``logits``). A new patching variant that reports a new label registers it
in its own file (``register_kind("pattern")``); ``results.check_table`` accepts every known kind, so
nothing else changes.

A Component is the shared currency between experiments: a ranking table or a circuit map becomes a
list of Components that ablation, fine-tuning and monitoring accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from circuitlab.core import hooks as hk

__all__ = ["Component", "Kind", "register_kind", "known_kinds", "addressable_kinds", "kind_info", "from_table",
           "hook_name", "UNIT_KINDS"]


@dataclass(frozen=True)
class Kind:
    """A component label: ``hook`` builds the hook holding its activation (None: a table label only);
    ``unit_axis`` is the axis from the end that indexes its units (neurons -1, heads -2; None: whole)."""

    name: str
    hook: Callable[[int], str] | None = None
    unit_axis: int | None = None
    doc: str = ""


_KINDS: dict[str, Kind] = {}


def register_kind(name: str, *, hook: Callable[[int], str] | None = None, unit_axis: int | None = None,
                  doc: str = "") -> Kind:
    """Add a component label (idempotent for an identical definition; a conflicting one is refused)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a component kind must be an identifier such as 'pattern', got {name!r}")
    kind = Kind(name, hook, unit_axis, doc)
    old = _KINDS.get(name)
    if old is not None and (old.hook, old.unit_axis) != (hook, unit_axis):
        raise ValueError(f"component kind {name!r} is already registered with another hook or unit axis")
    _KINDS.setdefault(name, kind)
    return _KINDS[name]


def known_kinds() -> tuple[str, ...]:
    """Every registered component label (what a result table's ``component`` column may hold)."""
    return tuple(sorted(_KINDS))


def addressable_kinds() -> tuple[str, ...]:
    """The kinds a Component can be: those with a hook that holds their activation."""
    return tuple(sorted(k for k, v in _KINDS.items() if v.hook is not None))


def kind_info(name: str) -> Kind:
    """The registered Kind ``name`` (error lists the known kinds)."""
    if name not in _KINDS:
        raise ValueError(f"component kind {name!r} is not one of {', '.join(known_kinds())}; "
                         "register a new one with circuitlab.core.components.register_kind")
    return _KINDS[name]


for _name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
    register_kind(_name, hook=getattr(hk, _name), doc=f"the whole {_name} activation of a layer")
register_kind("neuron", hook=hk.mlp_post, unit_axis=-1, doc="one MLP neuron (mlp_post, before W_out)")
register_kind("head", hook=hk.attn_z, unit_axis=-2, doc="one attention head (attn_z, before W_O)")
register_kind("direction", doc="a direction in the residual stream (table label)")
register_kind("embed", doc="the token embedding (table label)")
register_kind("logits", doc="the output logits (table label)")

UNIT_KINDS = ("neuron", "head")  # kinds whose Components carry an index


@dataclass(frozen=True, order=True)
class Component:
    """``kind`` an addressable kind; ``index`` is the neuron or head number (None for whole-layer kinds)."""

    kind: str
    layer: int
    index: int | None = None

    def __post_init__(self):
        info = kind_info(self.kind)
        if info.hook is None:
            raise ValueError(f"{self.kind!r} is a table label, not a component; components: "
                             f"{', '.join(addressable_kinds())}")
        if info.unit_axis is not None and self.index is None:
            raise ValueError(f"a {self.kind} component needs an index")

    def __str__(self) -> str:
        return f"L{self.layer}{'N' if self.kind == 'neuron' else 'H'}{self.index}" if self.index is not None \
            else f"L{self.layer}.{self.kind}"


def hook_name(c: Component) -> str:
    """The hook point whose activation holds this component."""
    return kind_info(c.kind).hook(c.layer)


def from_table(table: pd.DataFrame, top_k: int | None = None) -> list[Component]:
    """Components from a tidy table (rows in order; ``component`` + ``layer`` + ``neuron``/``head``)."""
    out: list[Component] = []
    addressable = set(addressable_kinds())
    for row in table.itertuples(index=False):
        kind = getattr(row, "component")
        if kind not in addressable:
            continue
        index = int(getattr(row, kind)) if kind in UNIT_KINDS else None
        c = Component(kind, int(row.layer), index)
        if c not in out:
            out.append(c)
        if top_k is not None and len(out) >= top_k:
            break
    return out
