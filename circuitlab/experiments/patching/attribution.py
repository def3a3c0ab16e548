"""attribution-patching: first-order estimate of every activation patch from two runs and a backward.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale";
Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components"): the effect of patching activation ``a`` from the source run into the target run is
estimated by the first-order Taylor term

    metric(patched) - metric(target) ≈ (a_source - a_target) · ∂metric/∂a |_target

One forward of the source prompt, one forward + one backward of the target prompt give the estimate
for every layer, position, head (``attn_z``) and MLP neuron (``mlp_post``) at once (the engine is
``circuitlab.methods.attribution``). Same pairs, modes and normalization as ``activation-patching``
(0 = corrupted, 1 = clean), so the two tables join.

Known limit (Kramár et al. 2024 §3.1): when a patch saturates an attention softmax the linear
estimate of a head's effect can be badly off; their QK fix (exact recomputation of the attention
pattern) is NOT implemented here. The bench (``bench/patching.py``) measures the agreement with
exact patching per component type; read it before trusting head scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from circuitlab.core import hooks as hk
from circuitlab.methods.attribution import gradients, patch_estimate
from circuitlab.io.results import Result
from circuitlab.experiments.base import check_choice, check_layers, register
from circuitlab.experiments.checks import check_at_least, check_subset, check_types
from circuitlab.experiments.patching.common import (MODES, PairUnits, average_over_pairs, model_layers,
    normalize, refusal_metric, target_and_source)
from circuitlab.methods.pairs import PAIRINGS

__all__ = ["AttributionPatching", "attribution_pair", "ATP_COMPONENTS"]

# component -> (hook builder, number of trailing feature dims summed away, index column)
ATP_COMPONENTS = {
    "resid_pre": (hk.resid_pre, 1, None),
    "attn_out": (hk.attn_out, 1, None),
    "mlp_out": (hk.mlp_out, 1, None),
    "head": (hk.attn_z, 1, "head"),  # [pos, head, d_head] -> [pos, head]
    "neuron": (hk.mlp_post, 0, "neuron"),  # [pos, d_mlp] already per neuron
}


def attribution_pair(model, target_ids, source_ids, components, layers, metric, *, per_position=True):
    """AtP scores for one pair: ``(rows, target_metric, source_metric)``.

    ``per_position=False`` sums the estimate over positions (= patching every position at once).
    Neurons and heads are always summed over positions.
    """
    names = {(c, l): ATP_COMPONENTS[c][0](l) for c in components for l in layers}
    source = gradients(model, source_ids[None], None, list(names.values()), metric, backward=False)
    g = gradients(model, target_ids[None], None, list(names.values()), metric)
    rows = []
    for (comp, layer), name in names.items():
        _, n_sum, index_name = ATP_COMPONENTS[comp]
        est = patch_estimate(g, name, source.acts[name])[0]  # [pos, ...]
        if n_sum:
            est = est.sum(-1)
        if not per_position or index_name is not None:
            est = est.sum(0, keepdim=True)
            positions = [None]
        else:
            positions = list(range(-est.shape[0], 0))
        est = est.float().cpu()
        for i, pos in enumerate(positions):
            if index_name is None:
                rows.append({"component": comp, "layer": layer, "position": pos, "attribution": float(est[i])})
            else:
                for j, v in enumerate(est[i].tolist()):
                    rows.append({"component": comp, "layer": layer, "position": pos, index_name: j, "attribution": v})
    return rows, float(g.metric[0]), float(source.metric[0])


@register("attribution-patching")
@dataclass
class AttributionPatching(PairUnits):
    """Attribution patching (AtP, Nanda 2023; Kramár et al. 2024): linear estimate of every patch effect."""

    components: list[str] = field(default_factory=lambda: list(ATP_COMPONENTS))  # any non-empty subset of the default
    mode: str = "denoise"  # denoise: estimate harmful patches into harmless runs; noise: the reverse
    per_position: bool = True  # resid_pre / attn_out / mlp_out per position (heads, neurons: summed)
    layers: list[int] | None = None  # layers to estimate (None: all)
    n_pairs: int = 4  # equal-length harmful/harmless prompt pairs
    pairing: str = "length"  # length: equal token lengths only; pad: also pad leftovers with spaces
    seed: int = 0  # recorded for provenance (pairing is deterministic)

    def __post_init__(self):
        check_types(self)
        check_subset(self, "components", ATP_COMPONENTS)
        check_choice("mode", self.mode, MODES)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_layers("layers", self.layers)
        check_at_least(self, 1, "n_pairs")
        check_at_least(self, 0, "seed")

    def unit_state(self, model) -> dict:
        return {"layers": model_layers(model, self.layers)}

    def pair_frame(self, model, state, pair) -> pd.DataFrame:
        """One pair's AtP rows (two forwards and one backward: one unit of work)."""
        target, source = target_and_source(pair, self.mode)
        rows, t_metric, s_metric = attribution_pair(model, target, source, self.components, state["layers"],
                                                    refusal_metric(model), per_position=self.per_position)
        df = pd.DataFrame(rows)
        df["metric"] = t_metric + df["attribution"]
        return normalize(df, pair, self.mode, t_metric, s_metric)

    def result(self, model, harmful, harmless, plan, table) -> Result:
        avg = average_over_pairs(table)
        summary = {"n_pairs": plan.state["n_pairs"], "n_unpaired": plan.state["n_unpaired"]}
        for comp, sub in avg.groupby("component"):
            best = sub.loc[sub.normalized_mean.abs().idxmax()] if sub.normalized_mean.notna().any() else None
            if best is not None:
                summary[f"top_{comp}"] = {k: (None if pd.isna(best.get(k)) else best.get(k))
                                          for k in ("layer", "head", "neuron", "position", "normalized_mean")
                                          if k in best}
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables={"average": avg},
                      summary=summary)
