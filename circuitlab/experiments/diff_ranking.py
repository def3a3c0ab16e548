"""diff-ranking: which MLP neurons and attention heads respond differently to harmful vs harmless.

Activation-difference ranking over all layers at once (the "contrastive activation" screen of
e.g. Arditi et al. 2024 and Chen et al. 2024, "Finding Safety Neurons in LLMs"): Cohen's d, Welch
p-values and Benjamini–Hochberg (1995) q-values per unit, computed by ``circuitlab.methods.ranking`` (the
same ranking the safety monitor's ``locate_components`` uses); this experiment adds the per-layer
counts, the head heatmap and the summary.
"""

from __future__ import annotations

from dataclasses import dataclass

from circuitlab.io.plots import subplots
import numpy as np
import pandas as pd

from circuitlab.methods.ranking import COLUMNS, RANK_POSITIONS, rank_components
from circuitlab.io.results import Result
from circuitlab.experiments.base import Experiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_fraction, check_types

__all__ = ["DiffRanking"]


@register("diff-ranking")
@dataclass
class DiffRanking(Experiment):
    """Rank MLP neurons and attention heads by harmful-vs-harmless activation difference (Cohen's d)."""

    top_k: int = 50  # rows kept per component in the saved table
    positions: str = "last"  # "last" (last prompt token) or "mean" (mean over the prompt's tokens)
    neurons: bool = True  # rank MLP neurons (mlp_post)
    heads: bool = True  # rank attention heads (norm of attn_z)
    alpha: float = 0.05  # q-value threshold for the significance counts in the summary
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # recorded for provenance (the ranking is deterministic)

    def __post_init__(self):
        check_types(self)
        check_choice("positions", self.positions, RANK_POSITIONS)
        check(self.neurons or self.heads, "nothing to rank: set neurons=True and/or heads=True (e.g. --set heads=true)")
        check_fraction(self, "alpha")
        check_at_least(self, 1, "top_k", "batch_size")
        check_at_least(self, 0, "seed")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        full = rank_components(model, harmful, harmless, positions=self.positions, neurons=self.neurons,
                               heads=self.heads, store=store, batch_size=self.batch_size)
        table = full[full["rank"] <= self.top_k].reset_index(drop=True)
        by_layer = _by_layer(full, self.alpha)
        tables = {"by_layer": by_layer}
        figures = {"layer_counts": _layer_figure(by_layer, self.alpha, model.name)}
        if self.heads:
            heads = full[full.component == "head"][COLUMNS].sort_values(["layer", "head"]).reset_index(drop=True)
            tables["heads"] = heads
            figures["head_effects"] = _head_heatmap(heads, model.name)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables=tables,
                      figures=figures, summary=_summary(full, self.alpha))


def _by_layer(full: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per layer and component: units tested, significant (q < alpha) each way, max |d|."""
    sig = full["q_value"] < alpha
    grouped = full.assign(sig_up=sig & (full["diff"] > 0), sig_down=sig & (full["diff"] < 0),
                          abs_effect=full["effect_size"].abs())
    out = grouped.groupby(["layer", "component"], sort=True).agg(
        n_units=("effect_size", "size"), n_significant_harmful_higher=("sig_up", "sum"),
        n_significant_harmless_higher=("sig_down", "sum"), max_abs_effect=("abs_effect", "max"),
        mean_abs_effect=("abs_effect", "mean")).reset_index()
    return out


def _summary(full: pd.DataFrame, alpha: float) -> dict:
    out = {"n_units": int(len(full)), "alpha": alpha}
    for comp, part in full.groupby("component"):
        top = part.sort_values("rank").iloc[0]
        index = top["neuron"] if comp == "neuron" else top["head"]
        out[f"n_{comp}s_significant"] = int((part["q_value"] < alpha).sum())
        out[f"top_{comp}"] = f"L{int(top['layer'])}{'N' if comp == 'neuron' else 'H'}{int(index)}"
        out[f"top_{comp}_effect_size"] = round(float(top["effect_size"]), 4)
    return out


def _layer_figure(by_layer: pd.DataFrame, alpha: float, model_name: str):
    """Per layer: significant units each way (bars) and max |d| (line), one panel per component."""
    comps = list(dict.fromkeys(by_layer["component"]))
    fig, axes = subplots(1, len(comps), figsize=(6 * len(comps), 3.5), squeeze=False)
    for ax, comp in zip(axes[0], comps):
        part = by_layer[by_layer.component == comp]
        ax.bar(part.layer - 0.2, part.n_significant_harmful_higher, 0.4, label="harmful higher")
        ax.bar(part.layer + 0.2, part.n_significant_harmless_higher, 0.4, label="harmless higher")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{comp}s with q < {alpha}")
        twin = ax.twinx()
        twin.plot(part.layer, part.max_abs_effect, "k.-", label="max |d|")
        twin.set_ylabel("max |Cohen's d|")
        ax.set_title(f"{comp}s, {model_name}")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def _head_heatmap(heads: pd.DataFrame, model_name: str):
    """Layer × head heatmap of Cohen's d of the head output norm."""
    grid = heads.pivot_table(index="layer", columns="head", values="effect_size", aggfunc="mean")
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig, ax = subplots(figsize=(max(4, 0.4 * grid.shape[1] + 2), max(3, 0.25 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Head output norm, Cohen's d (harmful - harmless), {model_name}")
    fig.colorbar(im, ax=ax, label="Cohen's d")
    fig.tight_layout()
    return fig
