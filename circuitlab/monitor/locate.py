"""The component set the defences watch: the top neurons and heads of the activation-difference
ranking (``circuitlab.methods.ranking``: Cohen's d of harmful vs harmless activations at the last prompt token;
the ranking the ``diff-ranking`` experiment reports). The watched direction is
``circuitlab.methods.directions.refusal_direction`` (Arditi et al. 2024, §2.3).
"""

from __future__ import annotations

from typing import Sequence

from circuitlab.core.components import Component
from circuitlab.core.model import HookedModel
from circuitlab.methods.ranking import rank_components, top_components
from circuitlab.io.store import ActivationStore

__all__ = ["locate_components"]


def locate_components(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *,
                      n_neurons: int = 8, n_heads: int = 4, store: ActivationStore | None = None,
                      batch_size: int = 16) -> list[Component]:
    """Top ``n_neurons`` neurons and ``n_heads`` heads by |Cohen's d| (last position)."""
    if n_neurons < 0 or n_heads < 0 or n_neurons + n_heads == 0:
        raise ValueError(f"ask for at least one component (n_neurons={n_neurons}, n_heads={n_heads})")
    ranking = rank_components(model, harmful, harmless, neurons=n_neurons > 0, heads=n_heads > 0, store=store,
                              batch_size=batch_size)
    return top_components(ranking, "neuron", n_neurons) + top_components(ranking, "head", n_heads)
