"""attribution-patching: first-order estimate of every activation patch from two runs and a backward.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale";
Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components"): the effect of patching activation ``a`` from the source run into the target run is
estimated by the first-order Taylor term

    metric(patched) - metric(target) ≈ (a_source - a_target) · ∂metric/∂a |_target

One forward of the source prompt, one forward + one backward of the target prompt give the estimate
for every layer, position, head (``attn_z``) and MLP neuron (``mlp_post``) at once. Same pairs, modes
and normalization as ``activation-patching`` (0 = corrupted, 1 = clean), so the two tables join.

Known limit (Kramár et al. 2024 §3.1): when a patch saturates an attention softmax the linear
estimate of a head's effect can be badly off; their QK fix (exact recomputation of the attention
pattern) is NOT implemented here. The bench (``bench/patching.py``) measures the agreement with
exact patching per component type; read it before trusting head scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ... import hooks as hk
from ...progress import progress_bar
from ...results import Result
from ..base import Experiment, register
from .activation import MODES, average_over_pairs, refusal_metric
from .pairs import make_pairs

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
    Neurons and heads are always summed over positions unless ``per_position`` is set for them too.
    """
    names = {(c, l): ATP_COMPONENTS[c][0](l) for c in components for l in layers}
    source, target, grads = {}, {}, {}

    def saver(store, name):
        def save(act, hook):
            store[name] = act.detach()
        return save

    def grad_saver(name):
        def save(grad, hook):  # TransformerLens backward hook: gradient w.r.t. the hook's output
            grads[name] = grad.detach()
        return save

    with torch.no_grad(), model.hooks([(n, saver(source, n)) for n in names.values()]):
        s_metric = float(metric(model.forward(source_ids[None])[:, -1].float())[0])

    def leaf(act, hook):  # weights are frozen: make the embeddings the leaf the graph grows from
        return act.detach().requires_grad_(True)

    fwd = [(hk.embed(), leaf)] + [(n, saver(target, n)) for n in names.values()]
    with torch.enable_grad(), model.hooks(fwd, [(n, grad_saver(n)) for n in names.values()]):
        out = metric(model.forward(target_ids[None])[:, -1].float())[0]
        out.backward()
    t_metric = float(out.detach())
    missing = [n for n in names.values() if n not in grads]
    if missing:
        raise RuntimeError(f"no gradient reached hooks {missing[:3]}: the metric does not depend on them")

    rows = []
    for (comp, layer), name in names.items():
        _, n_sum, index_name = ATP_COMPONENTS[comp]
        est = ((source[name] - target[name]) * grads[name])[0]  # [pos, ...]
        if n_sum:
            est = est.sum(-1)
        if not per_position or index_name is not None:
            est = est.sum(0, keepdim=True)
            positions = [None]
        else:
            positions = list(range(-est.shape[0], 0))
        est = est.detach().float().cpu()
        for i, pos in enumerate(positions):
            if index_name is None:
                rows.append({"component": comp, "layer": layer, "position": pos, "attribution": float(est[i])})
            else:
                for j, v in enumerate(est[i].tolist()):
                    rows.append({"component": comp, "layer": layer, "position": pos, index_name: j, "attribution": v})
    return rows, t_metric, s_metric


@register("attribution-patching")
@dataclass
class AttributionPatching(Experiment):
    """Attribution patching (AtP, Nanda 2023; Kramár et al. 2024): linear estimate of every patch effect."""

    components: list[str] = field(default_factory=lambda: ["resid_pre", "attn_out", "mlp_out", "head", "neuron"])
    mode: str = "denoise"
    per_position: bool = True  # resid_pre / attn_out / mlp_out per position (heads, neurons: summed)
    layers: list[int] | None = None
    n_pairs: int = 4
    pairing: str = "length"
    seed: int = 0

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        unknown = set(self.components) - set(ATP_COMPONENTS)
        if unknown:
            raise ValueError(f"components {sorted(unknown)} unknown; choose from {list(ATP_COMPONENTS)}")
        layers = list(range(model.n_layers)) if self.layers is None else list(self.layers)
        pairs = make_pairs(model, harmful, harmless, n_pairs=self.n_pairs, pairing=self.pairing)
        metric = refusal_metric(model)
        frames = []
        for pair in progress_bar(pairs, True, total=len(pairs), desc="attribution"):
            target, source = ((pair.harmless_ids, pair.harmful_ids) if self.mode == "denoise"
                              else (pair.harmful_ids, pair.harmless_ids))
            rows, t_metric, s_metric = attribution_pair(model, target, source, self.components, layers, metric,
                                                        per_position=self.per_position)
            clean, corrupted = (s_metric, t_metric) if self.mode == "denoise" else (t_metric, s_metric)
            df = pd.DataFrame(rows)
            df["metric"] = t_metric + df["attribution"]
            gap = clean - corrupted
            df["normalized"] = (df["metric"] - corrupted) / gap if abs(gap) > 1e-6 else np.nan
            df["clean_metric"], df["corrupted_metric"], df["pair_id"] = clean, corrupted, pair.pair_id
            frames.append(df)
        table = pd.concat(frames, ignore_index=True)
        for col in ("head", "neuron", "position"):
            if col in table:
                table[col] = table[col].astype("Int64")
        table["mode"] = self.mode
        avg = average_over_pairs(table)
        summary = {"n_pairs": len(pairs), "n_unpaired": pairs.n_unpaired}
        for comp, sub in avg.groupby("component"):
            best = sub.loc[sub.normalized_mean.abs().idxmax()] if sub.normalized_mean.notna().any() else None
            if best is not None:
                summary[f"top_{comp}"] = {k: (None if pd.isna(best.get(k)) else best.get(k))
                                          for k in ("layer", "head", "neuron", "position", "normalized_mean")
                                          if k in best}
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables={"average": avg},
                      summary=summary)
