"""diff-ranking: which MLP neurons and attention heads respond differently to harmful vs harmless.

Activation-difference ranking over all layers at once (the "contrastive activation" screen of
e.g. Arditi et al. 2024 and Chen et al. 2024, "Finding Safety Neurons in LLMs"): for every unit,
the mean activation on harmful and on harmless prompts, Cohen's d with pooled standard
deviation, a Welch t-test p-value and a Benjamini–Hochberg (1995) q-value over all units tested.

Units: MLP neurons are ``mlp_post`` (the activations that multiply ``W_out``: the real neurons,
not MLP outputs). A head's score is the L2 norm of its output ``attn_z`` (before ``W_O``) at the
position — how much the head writes, whatever the direction. With ``positions='mean'`` the store
averages ``attn_z`` over the prompt's tokens first, so the score is the norm of the mean output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy import stats

from .. import hooks as hk
from ..results import Result
from ..store import ActivationStore
from .base import Experiment, register

__all__ = ["DiffRanking", "unit_statistics", "benjamini_hochberg", "rank_units", "head_scores"]

_COLUMNS = ["layer", "component", "neuron", "head", "position", "mean_harmful", "mean_harmless", "diff",
            "effect_size", "p_value", "q_value", "rank", "direction"]


def unit_statistics(harmful: np.ndarray, harmless: np.ndarray, rel_tol: float = 1e-6) -> dict[str, np.ndarray]:
    """Per-column statistics of ``[n_harmful, U]`` vs ``[n_harmless, U]`` (vectorised over units).

    Cohen's d uses the pooled sd; p is Welch's t-test. A unit whose pooled sd is ~0 (below
    ``rel_tol`` × its scale: float32 noise) is called constant: effect 0, p 1, never NaN/inf.
    """
    a, b = np.asarray(harmful, dtype=np.float64), np.asarray(harmless, dtype=np.float64)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        raise ValueError(f"need at least 2 prompts per set for variances, got {n1} harmful and {n2} harmless")
    m1, m2 = a.mean(0), b.mean(0)
    v1, v2 = a.var(0, ddof=1), b.var(0, ddof=1)
    pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    scale = np.maximum(1.0, np.maximum(np.abs(m1), np.abs(m2)))
    constant = pooled <= rel_tol * scale
    diff = m1 - m2
    effect = np.where(constant, 0.0, diff / np.where(constant, 1.0, pooled))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant units: handled just below
        p = stats.ttest_ind(a, b, axis=0, equal_var=False).pvalue
    p = np.where(constant | ~np.isfinite(p), 1.0, p)
    return {"mean_harmful": m1, "mean_harmless": m2, "diff": diff, "effect_size": effect, "p_value": p}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg (1995) adjusted p-values (q-values), monotone and capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    if n == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    q = np.empty(n)
    q[order] = np.minimum(adjusted, 1.0)
    return q


def rank_units(effect: np.ndarray, p: np.ndarray, layer: np.ndarray, index: np.ndarray) -> np.ndarray:
    """1-based ranks by |effect| (desc), then p (asc), then layer, then index: deterministic ties."""
    order = np.lexsort((index, layer, p, -np.abs(effect)))
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def head_scores(z: torch.Tensor) -> torch.Tensor:
    """Per-head output norm: ``[n, (pos,) heads, d_head]`` -> ``[n, heads]`` (positions averaged)."""
    norms = z.float().norm(dim=-1)
    return norms.mean(1) if norms.dim() == 3 else norms


@register("diff-ranking")
@dataclass
class DiffRanking(Experiment):
    """Rank MLP neurons and attention heads by harmful-vs-harmless activation difference (Cohen's d)."""

    top_k: int = 50  # rows kept per component in the saved table
    positions: str = "last"  # "last" (last prompt token) or "mean" (mean over the prompt's tokens)
    neurons: bool = True
    heads: bool = True
    alpha: float = 0.05  # q-value threshold for the significance counts in the summary
    batch_size: int = 16
    seed: int = 0

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        if self.positions not in ("last", "mean"):
            raise ValueError(f"positions={self.positions!r}: diff-ranking supports 'last' or 'mean'")
        if not (self.neurons or self.heads):
            raise ValueError("nothing to rank: set neurons=True and/or heads=True")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        store = store if store is not None else ActivationStore()
        layers = range(model.n_layers)
        names = ([hk.mlp_post(l) for l in layers] if self.neurons else []) + \
                ([hk.attn_z(l) for l in layers] if self.heads else [])
        acts = [store.get(model, list(s), names, self.positions, batch_size=self.batch_size) for s in (harmful, harmless)]
        blocks = []
        if self.neurons:
            blocks.append(self._block(acts, hk.mlp_post, "neuron", model, lambda t: t.reshape(len(t), -1)))
        if self.heads:
            blocks.append(self._block(acts, hk.attn_z, "head", model, head_scores))
        full = pd.concat(blocks, ignore_index=True)
        full["q_value"] = benjamini_hochberg(full["p_value"].to_numpy())  # over every unit tested
        full["rank"] = 0
        for comp, part in full.groupby("component", sort=False):
            idx = np.where(comp == "neuron", part["neuron"], part["head"]).astype(np.int64)
            full.loc[part.index, "rank"] = rank_units(part["effect_size"].to_numpy(), part["p_value"].to_numpy(),
                                                      part["layer"].to_numpy(), idx)
        full["direction"] = np.where(full["diff"] >= 0, "harmful_higher", "harmless_higher")
        full["position"] = self.positions
        full = full.sort_values(["component", "rank"], ascending=[False, True], kind="stable")
        table = full[full["rank"] <= self.top_k][_COLUMNS].reset_index(drop=True)
        by_layer = _by_layer(full, self.alpha)
        tables = {"by_layer": by_layer}
        figures = {"layer_counts": _layer_figure(by_layer, self.alpha, model.name)}
        if self.heads:
            heads = full[full.component == "head"][_COLUMNS].sort_values(["layer", "head"]).reset_index(drop=True)
            tables["heads"] = heads
            figures["head_effects"] = _head_heatmap(heads, model.name)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless), tables=tables,
                      figures=figures, summary=_summary(full, self.alpha))

    def _block(self, acts, hook, component, model, to_units) -> pd.DataFrame:
        """Statistics for every unit of one component kind, all layers stacked column-wise."""
        per_set = [torch.cat([to_units(a[hook(l)]) for l in range(model.n_layers)], dim=1).numpy() for a in acts]
        width = per_set[0].shape[1] // model.n_layers
        st = unit_statistics(*per_set)
        index = np.tile(np.arange(width), model.n_layers)
        frame = pd.DataFrame({"layer": np.repeat(np.arange(model.n_layers), width), "component": component, **st})
        frame["neuron"] = pd.array(index if component == "neuron" else [None] * len(index), dtype="Int64")
        frame["head"] = pd.array(index if component == "head" else [None] * len(index), dtype="Int64")
        return frame


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
    fig, axes = plt.subplots(1, len(comps), figsize=(6 * len(comps), 3.5), squeeze=False)
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
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * grid.shape[1] + 2), max(3, 0.25 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Head output norm, Cohen's d (harmful - harmless), {model_name}")
    fig.colorbar(im, ax=ax, label="Cohen's d")
    fig.tight_layout()
    return fig
