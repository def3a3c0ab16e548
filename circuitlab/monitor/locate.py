"""The component set and refusal direction the defences watch, computed through the store.

Components: the top neurons and heads of the activation-difference ranking (experiment
``diff-ranking``: Cohen's d of harmful vs harmless activations at the last prompt token).
Direction: difference in means of ``resid_pre(layer)`` at the last token (Arditi et al. 2024, §2.3).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import hooks as hk
from ..components import Component, from_table
from ..model import HookedModel
from ..store import ActivationStore

__all__ = ["locate_components", "mean_difference"]


def locate_components(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *,
                      n_neurons: int = 8, n_heads: int = 4, store: ActivationStore | None = None,
                      batch_size: int = 16) -> list[Component]:
    """Top ``n_neurons`` neurons and ``n_heads`` heads by |Cohen's d| (diff-ranking, last position)."""
    from ..experiments.diff_ranking import DiffRanking

    if n_neurons < 0 or n_heads < 0 or n_neurons + n_heads == 0:
        raise ValueError(f"ask for at least one component (n_neurons={n_neurons}, n_heads={n_heads})")
    ranking = DiffRanking(top_k=max(n_neurons, n_heads, 1), neurons=n_neurons > 0, heads=n_heads > 0,
                          batch_size=batch_size)
    table = ranking.run(model, _as_set(harmful, "harmful"), _as_set(harmless, "harmless"), store=store).table
    neurons = from_table(table[table.component == "neuron"], n_neurons) if n_neurons else []
    heads = from_table(table[table.component == "head"], n_heads) if n_heads else []
    return neurons + heads


def mean_difference(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], layer: int, *,
                    store: ActivationStore | None = None, batch_size: int = 16) -> torch.Tensor:
    """``mean(harmful) − mean(harmless)`` of ``resid_pre(layer)`` at the last prompt token ``[d_model]``."""
    store = store if store is not None else ActivationStore()
    name = hk.resid_pre(layer)
    means = [store.get(model, list(getattr(s, "prompts", s)), [name], "last", batch_size=batch_size,
                       progress=False)[name][:, 0].mean(0) for s in (harmful, harmless)]
    return means[0] - means[1]


def _as_set(prompts, name):
    from ..datasets import PromptSet

    return prompts if isinstance(prompts, PromptSet) else PromptSet(name, tuple(prompts))
