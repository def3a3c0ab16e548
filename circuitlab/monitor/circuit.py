"""Circuit units as monitor features: the activations of given neurons and heads at the last post-instruction position.

A ``circuit-probe`` (``circuitlab.monitor.decision``) is a logistic probe on these. A neuron gives one number
(``blocks.{l}.mlp.hook_post[..., i]``), a head its ``d_head`` output before ``W_O``
(``blocks.{l}.attn.hook_z[..., h, :]``), both at the last token of the chat-formatted prompt (the last
post-instruction position, where the refusal decision is read). The units are typically a circuit map's
verified units (``read_units`` on a saved ``circuit-map`` run) or ``monitor.locate_components``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from circuitlab.core.components import UNIT_KINDS, Component, from_table, hook_name, register_kind

__all__ = ["read_units", "check_units", "unit_key", "unit_hooks", "unit_features", "units_to_plain",
           "units_from_plain"]

# a result row about a circuit-probe (the units read together, not one of them) carries this label
register_kind("units", doc="a set of neurons and heads read together (a circuit-probe's units)")


def unit_key(c: Component) -> str:
    """The feature-dict key of a unit's activation (``"unit:L2N37"``); never clashes with a layer or ``logodds``."""
    return f"unit:{c}"


def check_units(units: Sequence, model=None) -> tuple[Component, ...]:
    """``units`` as a tuple of neuron / head Components; with ``model``, their layers and indices checked."""
    units = tuple(units)
    bad = [u for u in units if not isinstance(u, Component) or u.kind not in UNIT_KINDS]
    if bad:
        raise ValueError(f"circuit units must be neuron or head Components, got {bad[:3]}; "
                         "read them with circuitlab.monitor.circuit.read_units(RUN_OR_CSV)")
    if model is not None:
        size = {"neuron": model.d_mlp, "head": model.n_heads}
        out = [str(u) for u in units if not (0 <= u.layer < model.n_layers and 0 <= u.index < size[u.kind])]
        if out:
            raise ValueError(f"units {out[:5]} are not in {model.name} ({model.n_layers} layers, "
                             f"{model.d_mlp} neurons, {model.n_heads} heads); were they located on another model?")
    return units


def unit_hooks(units: Sequence[Component]) -> list[str]:
    """The hook points holding ``units`` (``mlp_post`` / ``attn_z`` of their layers), each once."""
    return sorted({hook_name(u) for u in units})


def unit_features(acts: dict, units: Sequence[Component]) -> dict:
    """``{unit_key(u): [n, 1] (neuron) or [n, d_head] (head)}`` from ``run_with_cache(..., "last")`` activations."""
    out = {}
    for u in units:
        a = acts[hook_name(u)][:, 0].float()  # [n, d_mlp] or [n, n_heads, d_head]
        out[unit_key(u)] = a[:, u.index: u.index + 1] if u.kind == "neuron" else a[:, u.index, :]
    return out


def read_units(spec, top_k: int | None = None) -> list[Component]:
    """The neurons and heads of a saved run folder (its ``table.parquet`` / ``table.csv``) or a table file.

    A circuit map's table has a ``verified`` column: only verified units are kept. Rows are read in order;
    ``top_k`` keeps the first ``top_k`` units (e.g. of an attribution ranking)."""
    path = Path(spec)
    if path.is_dir():
        path = next((path / f for f in ("table.parquet", "table.csv") if (path / f).is_file()), path / "table.csv")
    if not path.is_file():
        raise ValueError(f"{spec}: no such run folder or table file; give a saved circuit-map run "
                         "(e.g. results/refusal_circuit/circuit) or a CSV with component,layer,neuron,head columns")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if not {"component", "layer"} <= set(table.columns):
        raise ValueError(f"{path} has no component and layer columns; give a circuit-map run or a components CSV")
    verified = "verified" in table.columns
    if verified:
        table = table[table["verified"].astype(bool)]
    units = [c for c in from_table(table) if c.kind in UNIT_KINDS][:top_k]
    if not units:
        raise ValueError(f"{spec}: no {'verified ' if verified else ''}neuron or head rows; give a run with "
                         "verified units, or leave the units out to locate them (monitor.locate_components)")
    return units


def units_to_plain(units: Sequence[Component]) -> list:
    """``[[kind, layer, index], ...]``: what a monitor file stores (plain values, ``weights_only``-safe)."""
    return [[u.kind, int(u.layer), int(u.index)] for u in units]


def units_from_plain(rows) -> tuple[Component, ...]:
    """The inverse of ``units_to_plain``."""
    return tuple(Component(str(k), int(l), int(i)) for k, l, i in rows)

