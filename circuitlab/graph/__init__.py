"""Circuits as graphs: the residual-stream edge graph (GQA-aware), EAP / EAP-IG edge scores,
circuit selection, and exact whole-circuit faithfulness with MIB's CPR / CMD summaries.

Library layer: builds on ``circuitlab.model`` / ``hooks`` / ``metrics`` only (never on
``circuitlab.experiments``); the ``edge-attribution`` experiment composes these modules.
"""

from .circuits import SELECTIONS, bootstrap_stability, greedy, jaccard, n_for_fraction, prune, random_circuit, select, top_n
from .curve import MIB_FRACTIONS, area_under_curve, curve_summary, faithfulness_curve, smallest_faithful
from .faithfulness import ABLATIONS, CircuitEval, CircuitRunner, evaluate_circuits, faithfulness, mean_writers
from .graph import READER_KINDS, EdgeGraph, edge_counts
from .scores import METHODS, MODES, EdgeScores, edge_scores, scores_table

__all__ = [
    "EdgeGraph", "edge_counts", "READER_KINDS",
    "edge_scores", "EdgeScores", "scores_table", "METHODS", "MODES",
    "evaluate_circuits", "CircuitRunner", "CircuitEval", "faithfulness", "mean_writers", "ABLATIONS",
    "top_n", "greedy", "prune", "random_circuit", "select", "n_for_fraction", "jaccard", "bootstrap_stability",
    "SELECTIONS",
    "faithfulness_curve", "curve_summary", "area_under_curve", "smallest_faithful", "MIB_FRACTIONS",
]
