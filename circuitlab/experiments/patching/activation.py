"""activation-patching: exact activation patching of harmful/harmless prompt pairs.

Method: Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", causal tracing) with
TransformerLens ``patching`` semantics: run the *target* prompt, overwrite one activation with its
value from the *source* prompt, read the metric (default: refusal score, the log-odds of the
refusal tokens at the last position; ``metrics.refusal_score_from_logits``). Modes and the
normalization (0 = corrupted, 1 = clean) are described in ``patching.common``.

Prompt pairs of different token lengths: pairs are built with EQUAL token length (chat template
included) by ``patching.pairs.make_pairs`` — default ``pairing="length"`` drops prompts without an
equal-length partner; ``pairing="pad"`` pads the shorter request with spaces at the end of its user
span so template positions align. Positions in the table are negative offsets from the end
(``-1`` = last token), so ``position=-3`` is the same template token in every pair.

Patching needs full-sequence activations and the target run's keys/values, which the
ActivationStore (position-selected activations) does not hold; the engine computes them with two
forward passes per pair — negligible next to the sweep itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from circuitlab.core import hooks as hk
from circuitlab.io import plots
from circuitlab.io.results import Result
from circuitlab.experiments.base import check_choice, check_layers, register
from circuitlab.experiments.checks import check_subset
# refusal_metric is imported from here by scripts and tests (the old home of the default metric).
from circuitlab.experiments.patching.common import (PairPatchingExperiment, average_over_pairs, model_layers,
    refusal_metric)  # noqa: F401
from circuitlab.methods.patching import Sweep

__all__ = ["ActivationPatching", "layer_sweeps", "LAYER_COMPONENTS", "POSITION_SETS", "PATCHABLE"]

LAYER_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
POSITION_SETS = ("all", "post", "last")
PATCHABLE = LAYER_COMPONENTS + ("head",)


def layer_sweeps(model, components, layers, positions, *, per_position=True, head_positions=False) -> list[Sweep]:
    """Sweeps for whole-layer components (``resid_pre|attn_out|mlp_out``) and heads (``attn_z``).

    ``positions``: absolute positions to patch one at a time; ``per_position=False`` patches every
    position at once (position None). Heads patch all positions unless ``head_positions``.
    """
    sweeps = []
    pos_list = list(positions) if per_position else [None]
    for comp in components:
        if comp in LAYER_COMPONENTS:
            cells = [(l, p, None) for l in layers for p in pos_list]
            sweeps.append(Sweep(comp, cells, lambda c, comp=comp: getattr(hk, comp)(c[0])))
        elif comp == "head":
            hpos = list(positions) if head_positions else [None]
            cells = [(l, p, h) for l in layers for p in hpos for h in range(model.n_heads)]
            sweeps.append(Sweep("head", cells, lambda c: hk.attn_z(c[0]), index_name="head"))
        else:
            raise ValueError(f"component {comp!r} is not one of {PATCHABLE}")
    return sweeps


def _positions(which: str, length: int, n_post: int) -> list[int]:
    if which == "all":
        return list(range(length))
    if which == "post":
        return list(range(length - max(n_post, 1), length))
    if which == "last":
        return [length - 1]
    raise ValueError(f"positions={which!r} is not one of {POSITION_SETS}")


@register("activation-patching")
@dataclass
class ActivationPatching(PairPatchingExperiment):
    """Exact activation patching (Meng et al. 2022) of harmful/harmless pairs: where refusal is carried."""

    components: list[str] = field(default_factory=lambda: list(PATCHABLE))  # resid_pre, attn_out, mlp_out and/or head
    positions: str = "all"  # all | post | last: positions swept one at a time
    per_position: bool = True  # one patch per position (False: every position at once)
    head_positions: bool = False  # heads per position too (n_layers * n_heads * n_positions runs)
    layers: list[int] | None = None  # layers to sweep (None: all)

    def __post_init__(self):
        super().__post_init__()
        check_subset(self, "components", PATCHABLE)
        check_choice("positions", self.positions, POSITION_SETS)
        check_layers("layers", self.layers)

    def unit_state(self, model) -> dict:
        return {"layers": model_layers(model, self.layers)}

    def pair_frame(self, model, state, pair) -> pd.DataFrame:
        """One pair's rows: every component × layer × position cell patched (one unit of work)."""
        pos = _positions(self.positions, pair.length, model.n_post)
        return self.patch(model, pair, layer_sweeps(model, self.components, state["layers"], pos,
                                                    per_position=self.per_position,
                                                    head_positions=self.head_positions))

    def result(self, model, harmful, harmless, plan, table) -> Result:
        avg = average_over_pairs(table)
        summary = {"n_pairs": plan.state["n_pairs"], "n_unpaired": plan.state["n_unpaired"],
                   "clean_metric_mean": float(table.groupby("pair_id").clean_metric.first().mean()),
                   "corrupted_metric_mean": float(table.groupby("pair_id").corrupted_metric.first().mean()),
                   "skipped_fraction": float(table.skipped.mean())}
        top = avg.reindex(avg.normalized_mean.abs().sort_values(ascending=False).index).head(5)
        summary["top"] = [{k: (None if pd.isna(v) else v) for k, v in r.items()}
                          for r in top[[c for c in ("component", "layer", "head", "position", "normalized_mean")
                                        if c in top]]
                          .astype(object).to_dict("records")]
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"average": avg}, figures=_figures(avg, model.name, self.mode), summary=summary)


def _figures(avg: pd.DataFrame, model_name: str, mode: str) -> dict:
    """Layer × position heatmaps (as in Meng et al. 2022) and layer × component bars."""
    figs = {}
    for comp in LAYER_COMPONENTS:
        sub = avg[(avg.component == comp) & avg.position.notna()]
        if len(sub) and sub.position.nunique() > 1:
            figs[f"heatmap_{comp}"] = plots.heatmap(
                sub.astype({"position": int}), index="layer", columns="position", values="normalized_mean",
                title=f"{comp} patching ({mode}), {model_name}")
    heads = avg[avg.component == "head"]
    if len(heads) and heads.position.isna().all():
        figs["heatmap_head"] = plots.heatmap(heads.astype({"head": int}), index="layer", columns="head",
                                             values="normalized_mean", title=f"head patching ({mode}), {model_name}")
    # Per layer and component: the signed effect of largest magnitude over positions / heads.
    idx = avg.assign(mag=avg.normalized_mean.abs()).dropna(subset=["mag"]).groupby(["component", "layer"]).mag.idxmax()
    if len(idx):
        best = avg.loc[idx.to_numpy(), ["component", "layer", "normalized_mean"]]
        figs["bars_layer_component"] = plots.bars(best, x="layer", y="normalized_mean", hue="component",
                                                  title=f"strongest patch per layer ({mode}), {model_name}")
    return figs
