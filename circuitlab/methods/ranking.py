"""Activation-difference unit statistics: which MLP neurons and attention heads respond differently to
harmful vs harmless prompts.

The "contrastive activation" screen of e.g. Arditi et al. 2024 and Chen et al. 2024, "Finding Safety
Neurons in LLMs": for every unit, the mean activation on harmful and on harmless prompts, Cohen's d
with pooled standard deviation, a Welch t-test p-value and a Benjamini–Hochberg (1995) q-value over
all units tested.

Units: MLP neurons are ``mlp_post`` (the activations that multiply ``W_out``: the real neurons, not
MLP outputs). A head's score is the L2 norm of its output ``attn_z`` (before ``W_O``) at the position —
how much the head writes, whatever the direction. With ``positions='mean'`` the store averages
``attn_z`` over the prompt's tokens first, so the score is the norm of the mean output.

``rank_components`` is the one ranking the ``diff-ranking`` experiment and the monitor's
``locate_components`` both use; ``top_components`` reads the best units back as Components.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from circuitlab.core import hooks as hk
from circuitlab.core.components import Component
from circuitlab.io.store import ActivationStore

__all__ = ["unit_statistics", "benjamini_hochberg", "rank_units", "head_scores", "rank_components",
           "top_components", "RANK_POSITIONS", "COLUMNS"]

RANK_POSITIONS = ("last", "mean")
COLUMNS = ["layer", "component", "neuron", "head", "position", "mean_harmful", "mean_harmless", "diff",
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


def _block(acts, hook, component: str, n_layers: int, to_units) -> pd.DataFrame:
    """Statistics for every unit of one component kind, all layers stacked column-wise."""
    per_set = [torch.cat([to_units(a[hook(l)]) for l in range(n_layers)], dim=1).numpy() for a in acts]
    width = per_set[0].shape[1] // n_layers
    index = np.tile(np.arange(width), n_layers)
    frame = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), width), "component": component,
                          **unit_statistics(*per_set)})
    frame["neuron"] = pd.array(index if component == "neuron" else [None] * len(index), dtype="Int64")
    frame["head"] = pd.array(index if component == "head" else [None] * len(index), dtype="Int64")
    return frame


def rank_components(model, harmful, harmless, *, positions: str = "last", neurons: bool = True,
                    heads: bool = True, store: ActivationStore | None = None, batch_size: int = 16,
                    progress: bool = True) -> pd.DataFrame:
    """Every neuron and head of every layer with its statistics, q-value (over all units tested), rank
    (1 = largest |Cohen's d| within its kind) and direction; rows sorted by kind, then rank."""
    if positions not in RANK_POSITIONS:
        raise ValueError(f"positions={positions!r}: the ranking supports {' or '.join(map(repr, RANK_POSITIONS))}")
    if not (neurons or heads):
        raise ValueError("nothing to rank: set neurons=True and/or heads=True")
    store = store if store is not None else ActivationStore()
    layers = range(model.n_layers)
    names = ([hk.mlp_post(l) for l in layers] if neurons else []) + ([hk.attn_z(l) for l in layers] if heads else [])
    acts = [store.get(model, list(getattr(s, "prompts", s)), names, positions, batch_size=batch_size,
                      progress=progress) for s in (harmful, harmless)]
    blocks = []
    if neurons:
        blocks.append(_block(acts, hk.mlp_post, "neuron", model.n_layers, lambda t: t.reshape(len(t), -1)))
    if heads:
        blocks.append(_block(acts, hk.attn_z, "head", model.n_layers, head_scores))
    full = pd.concat(blocks, ignore_index=True)
    full["q_value"] = benjamini_hochberg(full["p_value"].to_numpy())  # over every unit tested
    full["rank"] = 0
    for comp, part in full.groupby("component", sort=False):
        idx = np.where(comp == "neuron", part["neuron"], part["head"]).astype(np.int64)
        full.loc[part.index, "rank"] = rank_units(part["effect_size"].to_numpy(), part["p_value"].to_numpy(),
                                                  part["layer"].to_numpy(), idx)
    full["direction"] = np.where(full["diff"] >= 0, "harmful_higher", "harmless_higher")
    full["position"] = positions
    full = full.sort_values(["component", "rank"], ascending=[False, True], kind="stable")
    return full[COLUMNS].reset_index(drop=True)


def top_components(ranking: pd.DataFrame, kind: str, k: int, *, layers: Sequence[int] | None = None,
                   strict: bool = True) -> list[Component]:
    """The ``k`` best-ranked units of ``kind`` (``rank`` ascending), optionally only in ``layers``;
    ``strict`` refuses a table with fewer than ``k`` of them."""
    part = ranking[ranking["component"] == kind]
    if layers is not None:
        part = part[part["layer"].isin(list(layers))]
    part = part.sort_values("rank", kind="stable")
    units = [Component(kind, int(r.layer), int(getattr(r, kind))) for r in part.head(k).itertuples(index=False)]
    if strict and len(units) < k:
        raise ValueError(f"the ranking has {len(units)} {kind}s, fewer than k={k}; rank with a larger top_k")
    return units
