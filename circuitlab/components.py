"""Component: one addressable unit of a model (a neuron, a head, a layer's output, a direction).

The shared currency between experiments: a ranking table or a circuit map becomes a list of
Components that ablation, fine-tuning and monitoring accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import hooks as hk

__all__ = ["Component", "from_table", "hook_name"]

KINDS = ("neuron", "head", "attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True, order=True)
class Component:
    """``kind`` in KINDS; ``index`` is the neuron or head number (None for whole-layer kinds)."""

    kind: str
    layer: int
    index: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"component kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("neuron", "head") and self.index is None:
            raise ValueError(f"a {self.kind} component needs an index")

    def __str__(self) -> str:
        return f"L{self.layer}{'N' if self.kind == 'neuron' else 'H'}{self.index}" if self.index is not None \
            else f"L{self.layer}.{self.kind}"


def hook_name(c: Component) -> str:
    """The hook point whose activation holds this component."""
    return {"neuron": hk.mlp_post, "head": hk.attn_z}.get(c.kind, getattr(hk, c.kind, None))(c.layer)


def from_table(table: pd.DataFrame, top_k: int | None = None) -> list[Component]:
    """Components from a tidy table (rows in order; ``component`` + ``layer`` + ``neuron``/``head``)."""
    out: list[Component] = []
    for row in table.itertuples(index=False):
        kind = getattr(row, "component")
        if kind == "neuron":
            c = Component("neuron", int(row.layer), int(row.neuron))
        elif kind == "head":
            c = Component("head", int(row.layer), int(row.head))
        elif kind in KINDS:
            c = Component(kind, int(row.layer))
        else:
            continue
        if c not in out:
            out.append(c)
        if top_k is not None and len(out) >= top_k:
            break
    return out
