"""Nodes of the edge graph: where a located unit sits in the graph, and its edges in a circuit.

A node is a writer: the embedding, one attention head (``a{l}.h{h}``) or one whole MLP (``m{l}``).
The graph does not split MLPs into neurons, so a neuron is represented by its layer's MLP node,
and what is said of that node (in the circuit, edge score mass, strongest edges) is said of the
whole MLP. A head's inputs are its query reader and its key/value group's k and v readers; on a
GQA model the k and v edges are shared by every query head of the group, so they count towards
each of those heads' input mass.

``node_edges`` reports, for one node: whether the circuit keeps an edge out of it; its input and
output |score| mass as fractions of the graph's total |score|; and, for a node in the circuit, the
strongest *kept* edge into and out of it (by |score|), named by the other end (``top_in``: a writer,
``top_out``: a reader). A node outside the circuit has neither, even when a GQA group's shared k/v
input keeps edges for another head of the group: nothing the node writes is kept, so what it reads
does not matter to the circuit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlab.graph.graph import EdgeGraph

__all__ = ["node_writer", "node_edges", "NodeEdges", "MLP_KINDS"]

MLP_KINDS = ("neuron", "mlp_out", "mlp_post", "mlp")  # circuitlab component kinds that live in one MLP node


@dataclass(frozen=True)
class NodeEdges:
    """One node's place in a circuit (see the module docstring)."""

    node: str
    in_circuit: bool
    in_mass: float
    out_mass: float
    top_in: str | None
    top_out: str | None


def node_writer(graph: EdgeGraph, kind: str, layer: int, index: int | None = None) -> int:
    """Writer index of a circuitlab component: a head, or the MLP holding a neuron (``index`` unused)."""
    if kind == "embed":
        return 0
    if not 0 <= layer < graph.n_layers:
        raise ValueError(f"layer {layer} is outside the graph's layers 0..{graph.n_layers - 1}")
    if kind == "head":
        if index is None or not 0 <= index < graph.n_heads:
            raise ValueError(f"head index must be in 0..{graph.n_heads - 1}, got {index!r}")
        return graph.head_writer(layer, index)
    if kind in MLP_KINDS:
        return graph.mlp_writer(layer)
    raise ValueError(f"component kind {kind!r} is not a graph node; nodes are 'embed', 'head' and {MLP_KINDS}")


def _abs_scores(graph: EdgeGraph, scores: torch.Tensor) -> torch.Tensor:
    """|score| on graph edges, 0 elsewhere (NaN off the graph becomes 0)."""
    return torch.where(graph.valid, torch.nan_to_num(scores.double().abs(), nan=0.0), 0.0)


def _strongest(abs_s: torch.Tensor, kept: torch.Tensor) -> int | None:
    """Flat index of the largest kept |score|, or None when nothing is kept."""
    if not kept.any():
        return None
    return int(torch.where(kept, abs_s, -1.0).flatten().argmax())


def node_edges(graph: EdgeGraph, scores: torch.Tensor, circuit: torch.Tensor, w: int) -> NodeEdges:
    """Node ``w``'s membership, |score| mass and strongest kept edges in ``circuit`` (module docstring)."""
    abs_s = _abs_scores(graph, scores)
    total = float(abs_s.sum()) or 1.0  # all-zero scores: masses are 0, not NaN
    kept = torch.as_tensor(circuit, dtype=torch.bool) & graph.valid
    inputs = graph.writer_inputs(w)
    in_circuit = bool(kept[w].any())
    top_in = _strongest(abs_s[:, inputs], kept[:, inputs]) if inputs and in_circuit else None
    top_out = _strongest(abs_s[w], kept[w])
    return NodeEdges(
        node=graph.writers[w],
        in_circuit=in_circuit,
        in_mass=float(abs_s[:, inputs].sum()) / total if inputs else 0.0,
        out_mass=float(abs_s[w].sum()) / total,
        top_in=None if top_in is None else graph.writers[top_in // len(inputs)],
        top_out=None if top_out is None else graph.readers[top_out],
    )
