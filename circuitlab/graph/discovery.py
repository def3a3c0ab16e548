"""One circuit, found and checked: score edges on discovery pairs, select a circuit of ``n`` edges,
and measure its faithfulness exactly on held-out pairs (the edge-attribution pipeline at one size).

A circuit pruned to nothing is the empty circuit (faithfulness 0, as in ``curve``); faithfulness is
NaN when the full and the fully ablated model agree on the held-out pairs (undefined, not 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuitlab.graph.circuits import select
from circuitlab.graph.faithfulness import CircuitEval, CircuitRunner
from circuitlab.graph.forward import Metric
from circuitlab.graph.graph import EdgeGraph
from circuitlab.graph.nodes import NodeEdges, node_edges, node_writer
from circuitlab.graph.scores import edge_scores, scores_table

__all__ = ["FoundCircuit", "find_circuit"]


@dataclass
class FoundCircuit:
    """A selected circuit: its graph, mean edge scores, kept-edge mask and one summary row (``info``)."""

    graph: EdgeGraph
    scores: torch.Tensor  # [n_writers, n_readers] mean over the discovery pairs
    mask: torch.Tensor  # [n_writers, n_readers] edges kept (after the selection's pruning)
    info: dict  # method, steps, mode, selection, ablation, sizes, faithfulness, mean metrics, pair counts

    def node(self, kind: str, layer: int, index: int | None = None) -> NodeEdges:
        """Where a head, or the MLP holding a neuron, sits in the circuit (``nodes.node_edges``)."""
        return node_edges(self.graph, self.scores, self.mask, node_writer(self.graph, kind, layer, index))

    def edges_table(self) -> pd.DataFrame:
        """The kept edges as ``scores_table`` rows, largest |score| first."""
        table = scores_table(self.graph, self.scores)
        kept = set(self.graph.edges_of(self.mask))
        return table[[(w, r) in kept for w, r in zip(table.writer, table.reader)]].reset_index(drop=True)


def find_circuit(model, discover, evaluate, metric: Metric, n: int, *, method: str = "eap-ig",
                 selection: str = "topn", batch_size: int = 8, graph: EdgeGraph | None = None,
                 progress: bool = False) -> FoundCircuit:
    """Scores (``edge_scores``) on ``discover`` pairs, the ``selection`` of ``n`` edges (capped at the
    graph's size), and its faithfulness with ``corrupt`` ablation on the held-out ``evaluate`` pairs."""
    graph = graph or EdgeGraph.from_model(model)
    scored = edge_scores(model, discover, metric, method=method, batch_size=batch_size, graph=graph, progress=progress)
    n = min(n, graph.n_edges)
    mask = select(graph, scored.mean, n, selection)
    runner = CircuitRunner(model, evaluate, metric, batch_size=batch_size, graph=graph)
    kept = runner.run([mask]) if mask.any() else runner.empty[None]  # pruned to nothing: the empty circuit
    try:
        faith = float(CircuitEval(runner.clean, runner.empty, kept, runner.ablation).faithfulness()[0])
    except ValueError:  # full and fully ablated model agree on these pairs
        faith = float("nan")
    n_kept = int(mask.sum())
    info = {"method": scored.method, "steps": scored.steps, "mode": scored.mode, "selection": selection,
            "ablation": runner.ablation, "n_requested": n, "n_edges": n_kept, "n_graph_edges": graph.n_edges,
            "pct_edges": 100 * n_kept / graph.n_edges, "faithfulness": faith,
            "clean_metric": float(np.mean(runner.clean)), "empty_metric": float(np.mean(runner.empty)),
            "circuit_metric": float(np.mean(kept)), "n_discover_pairs": len(discover),
            "n_eval_pairs": len(evaluate)}
    return FoundCircuit(graph, scored.mean, mask, info)
