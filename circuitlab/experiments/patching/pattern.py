"""pattern-patching: patch one head's whole attention pattern (the worked "new variant" example).

Where does a head's *routing* (whom it attends to), rather than what it moves, carry refusal?
Patch head ``h``'s attention probabilities ``[query, key]`` at every query position from the source
run into the target run, values untouched (TransformerLens ``get_act_patch_attn_head_pattern_all_pos``
semantics; Wang et al. 2022 §3 use pattern patching to separate routing from content).

This file is the whole variant: a grid of cells, a setter, a registration, and the three unit
methods (``unit_state``, ``pair_frame``, ``result``) that ``PairUnits`` turns into plan / run_unit /
merge. The engine supplies batching, no-op skipping, prefix and causal reuse, and the tidy table.
"""

from __future__ import annotations

from dataclasses import dataclass

from circuitlab.core import hooks as hk
from circuitlab.io.results import Result
from circuitlab.experiments.base import check_layers, register
from circuitlab.experiments.patching.common import PairPatchingExperiment, average_over_pairs, model_layers
from circuitlab.methods.patching import Sweep

__all__ = ["PatternPatching", "pattern_sweep"]


def _set_pattern(act, name, cells, ctx, offset):
    """Row i: head ``cells[i][2]`` gets the source pattern for query positions ``>= offset``.

    ``act`` is ``[batch, head, query, key]``: queries start at ``offset`` (causal reuse), keys
    cover the whole prompt.
    """
    src = ctx.source[name]  # [head, query, key]
    for row, (_, _, head) in enumerate(cells):
        act[row, head] = src[head, offset:]
    return act


def pattern_sweep(model, layers) -> Sweep:
    """One cell per (layer, head); ``pos_dim=2``: the query axis of ``[batch, head, query, key]``."""
    cells = [(l, None, h) for l in layers for h in range(model.n_heads)]
    return Sweep("head", cells, lambda c: hk.attn_pattern(c[0]), setter=_set_pattern, index_name="head", pos_dim=2)


@register("pattern-patching")
@dataclass
class PatternPatching(PairPatchingExperiment):
    """Attention-pattern patching per head (all query positions): does a head's routing carry refusal?"""

    layers: list[int] | None = None  # layers whose heads are patched (None: all)

    def __post_init__(self):
        super().__post_init__()
        check_layers("layers", self.layers)

    def unit_state(self, model) -> dict:
        return {"layers": model_layers(model, self.layers)}

    def pair_frame(self, model, state, pair):
        """One pair's rows: every (layer, head) pattern patched (one unit of work)."""
        return self.patch(model, pair, [pattern_sweep(model, state["layers"])])

    def result(self, model, harmful, harmless, plan, table) -> Result:
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"average": average_over_pairs(table)}, summary={"n_pairs": plan.state["n_pairs"]})
