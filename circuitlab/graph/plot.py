"""Figures for edge circuits: faithfulness curves with a random band, and a circuit drawn as a graph
(nodes placed by layer, edge width by |score|)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from circuitlab.graph.graph import EdgeGraph

__all__ = ["plot_curves", "plot_circuit"]

_STYLE = {"q": "-", "k": "--", "v": ":", "mlp": "-", "logits": "-"}


def plot_curves(curve: pd.DataFrame, title: str = "Circuit faithfulness"):
    """Faithfulness vs edge fraction (log x) per method; random seeds as a min-max band."""
    from circuitlab.io.plots import subplots

    fig, ax = subplots(figsize=(6, 4))
    rand = curve[curve.method == "random"]
    if len(rand):
        band = rand.groupby("fraction").faithfulness.agg(["min", "max", "mean"]).reset_index()
        ax.fill_between(band.fraction * 100, band["min"], band["max"], color="grey", alpha=0.3,
                        label=f"random ({rand.seed.nunique()} seeds, min-max)")
        ax.plot(band.fraction * 100, band["mean"], color="grey", lw=1)
    for name, sub in curve[curve.method != "random"].groupby("method", sort=False):
        sub = sub.sort_values("fraction")
        ax.plot(sub.fraction * 100, sub.faithfulness, marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.5, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of graph)")
    ax.set_ylabel("faithfulness  (m(C) - m(∅)) / (m(N) - m(∅))")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _node_xy(graph: EdgeGraph, w: int) -> tuple[float, float]:
    kind, layer = graph.writer_kind(w), graph.writer_layer(w)
    if kind == "embed":
        return -1.0, (graph.n_heads - 1) / 2
    if kind == "mlp_out":
        return layer + 0.5, (graph.n_heads - 1) / 2
    return float(layer), float(graph.writer_head(w))


def plot_circuit(graph: EdgeGraph, mask: torch.Tensor, scores: torch.Tensor, title: str = "Circuit"):
    """Draw a circuit: x = layer (embedding at -1, MLP l at l + 0.5, logits at n_layers), y = head;
    edge width ~ |score|, colour = sign (red +, blue -), line style = reader kind (q solid, k dashed,
    v dotted; a kv edge is drawn to every query head of its group)."""
    from circuitlab.io.plots import subplots

    edges = torch.nonzero(mask & graph.valid).tolist()
    fig, ax = subplots(figsize=(max(6, graph.n_layers * 0.5 + 3), max(4, graph.n_heads * 0.35 + 2)))
    logits_xy = (graph.n_layers + 0.5, (graph.n_heads - 1) / 2)
    vals = np.array([float(scores[w, r]) for w, r in edges]) if edges else np.zeros(0)
    top = np.abs(vals).max() if len(vals) else 1.0
    used = set()
    for (w, r), v in zip(edges, vals):
        x0, y0 = _node_xy(graph, w)
        owners = graph.reader_owners(r)
        targets = [_node_xy(graph, o) for o in owners] if owners else [logits_xy]
        for x1, y1 in targets:
            ax.plot([x0, x1], [y0, y1], ls=_STYLE[graph.reader_kind(r)], color="tab:red" if v >= 0 else "tab:blue",
                    lw=0.5 + 4.5 * abs(v) / (top or 1.0), alpha=0.75, zorder=1)
        used.add(w)
        used.update(owners)
    for w in range(graph.n_writers):
        x, y = _node_xy(graph, w)
        on = w in used
        ax.scatter([x], [y], s=40 if on else 6, color="black" if on else "lightgrey", zorder=2,
                   marker="s" if graph.writer_kind(w) != "head" else "o")
        if on:
            ax.annotate(graph.writers[w], (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax.scatter([logits_xy[0]], [logits_xy[1]], s=60, color="black", marker="D", zorder=2)
    ax.annotate("logits", logits_xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("layer (embedding -1; MLP l at l+0.5)")
    ax.set_ylabel("head")
    ax.set_title(f"{title} ({len(edges)} edges)")
    fig.tight_layout()
    return fig
