"""Circuits as graphs: the residual-stream edge graph (GQA-aware), EAP / EAP-IG edge scores,
circuit selection, exact whole-circuit faithfulness with MIB's CPR / CMD summaries, and where a
located unit (head, neuron) sits in a circuit (``nodes``); ``discovery`` runs the whole pipeline at
one circuit size.

Library layer: builds on ``circuitlab.core.model`` / ``hooks`` / ``metrics`` only (never on
``circuitlab.experiments``); the ``edge-attribution`` and ``circuit-map`` experiments compose these
modules.
"""

from circuitlab.graph.acdc import ACDCResult, ACDCSearch, CRITERIA, acdc, acdc_sweep, warm_start
from circuitlab.graph.circuits import (SELECTIONS, bootstrap_stability, greedy, jaccard, n_for_fraction,
    prune, random_circuit, select, top_n)
from circuitlab.graph.discovery import FoundCircuit, find_circuit
from circuitlab.graph.curve import (MIB_FRACTIONS, area_under_curve, curve_jobs, curve_summary, curve_table,
    faithfulness_curve, smallest_faithful)
from circuitlab.graph.faithfulness import (ABLATIONS, CircuitEval, CircuitRunner, evaluate_circuits,
    faithfulness, mean_writers)
from circuitlab.graph.graph import READER_KINDS, EdgeGraph, edge_counts
from circuitlab.graph.nodes import MLP_KINDS, NodeEdges, node_edges, node_writer
from circuitlab.graph.scores import METHODS, MODES, EdgeScores, edge_scores, scores_table

__all__ = [
    "EdgeGraph", "edge_counts", "READER_KINDS", "node_writer", "node_edges", "NodeEdges", "MLP_KINDS",
    "edge_scores", "EdgeScores", "scores_table", "METHODS", "MODES",
    "evaluate_circuits", "CircuitRunner", "CircuitEval", "faithfulness", "mean_writers", "ABLATIONS",
    "top_n", "greedy", "prune", "random_circuit", "select", "n_for_fraction", "jaccard", "bootstrap_stability",
    "SELECTIONS", "find_circuit", "FoundCircuit",
    "faithfulness_curve", "curve_summary", "area_under_curve", "smallest_faithful", "MIB_FRACTIONS", "curve_jobs",
    "curve_table",
    "acdc", "acdc_sweep", "ACDCResult", "ACDCSearch", "warm_start", "CRITERIA",
]
