"""Figures (matplotlib). One function per figure kind; each returns a Figure.

Figures are built as plain ``matplotlib.figure.Figure`` objects (``subplots`` below), never through
pyplot: importing circuitlab leaves the user's matplotlib backend alone, and figures are not kept
alive by pyplot's figure manager.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["subplots", "score_histogram", "heatmap", "bars", "fragility", "circuit_diagram"]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
    """``(Figure, axes)`` like ``pyplot.subplots``, without touching pyplot or the backend."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def score_histogram(scores: dict[str, np.ndarray], title: str, xlabel: str = "refusal score (log-odds)"):
    """Overlaid histograms of a score per prompt set."""
    fig, ax = subplots(figsize=(6, 3.5))
    values = np.concatenate([np.asarray(v) for v in scores.values()])
    bins = np.linspace(values.min(), values.max(), 30)
    for name, v in scores.items():
        ax.hist(np.asarray(v), bins=bins, alpha=0.6, label=f"{name} (mean {np.mean(v):.2f})")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def heatmap(table: pd.DataFrame, index: str, columns: str, values: str, title: str,
            cmap: str = "RdBu_r", center: float | None = 0.0, fmt_labels=None):
    """A ``index`` × ``columns`` heatmap of ``values`` (mean over duplicates)."""
    grid = table.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    fig, ax = subplots(figsize=(max(4, 0.45 * grid.shape[1] + 2), max(3, 0.28 * grid.shape[0] + 1.5)))
    data = grid.to_numpy(dtype=float)
    if center is not None:
        lim = np.nanmax(np.abs(data - center)) or 1.0
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=center - lim, vmax=center + lim, origin="lower")
    else:
        im = ax.imshow(data, aspect="auto", cmap=cmap, origin="lower")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    labels = [fmt_labels(c) for c in grid.columns] if fmt_labels else list(grid.columns)
    ax.set_xticks(range(grid.shape[1]), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(index)
    ax.set_xlabel(columns)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=values)
    fig.tight_layout()
    return fig


def bars(table: pd.DataFrame, x: str, y: str, hue: str | None, title: str, yerr: tuple[str, str] | None = None):
    """Grouped bar chart; ``yerr`` names (low, high) columns for error bars."""
    fig, ax = subplots(figsize=(7, 3.5))
    groups = [None] if hue is None else list(dict.fromkeys(table[hue]))
    xs = list(dict.fromkeys(table[x]))
    width = 0.8 / len(groups)
    for gi, g in enumerate(groups):
        sub = table if g is None else table[table[hue] == g]
        sub = sub.set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + gi * width - 0.4 + width / 2
        err = None
        if yerr is not None:
            err = np.vstack([sub[y] - sub[yerr[0]], sub[yerr[1]] - sub[y]]).clip(min=0)
        ax.bar(pos, sub[y], width, label=None if g is None else str(g), yerr=err, capsize=3)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right")
    ax.set_ylabel(y)
    ax.set_title(title)
    if hue is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fragility(table: pd.DataFrame, kind: str, model_name: str, broken_kl: float = 1.0):
    """Refusal vs number of ablated units, top-k against layer-matched random-k: judged refusal rate
    (top-k with its bootstrap CI; the judged random seed), refusal score (random: mean and min–max
    over seeds), and side effects. Conditions whose harmless KL exceeds ``broken_kl`` are marked ×:
    there the model is broken, so a low refusal rate is not compliance."""
    base = table[table.selection == "baseline"].iloc[0]
    top = table[table.selection == "top"].sort_values("k")
    rnd = table[table.selection == "random"]
    fig, axes = subplots(1, 3, figsize=(14, 3.9))
    panels = [("refusal_rate", "refusal rate (judge)"), ("refusal_score", "refusal score (log-odds)")]
    for ax, (measure, label) in zip(axes[:2], panels):
        ax.plot(top.k, top[measure], "o-", color="C3", label=f"top-k ranked {kind}s")
        if measure == "refusal_rate" and top["refusal_rate_ci_low"].notna().all():
            ax.fill_between(top.k, top.refusal_rate_ci_low, top.refusal_rate_ci_high, color="C3", alpha=0.15,
                            label="top-k 95% CI")
        r = rnd.dropna(subset=[measure]).groupby("k")[measure].agg(["mean", "min", "max", "count"]).reset_index()
        if len(r):
            ax.plot(r.k, r["mean"], "s--", color="C0", label=f"random-k {kind}s (mean of {int(r['count'].max())} seeds)")
            ax.fill_between(r.k, r["min"], r["max"], color="C0", alpha=0.2, label="random: min–max over seeds")
        broken = table[(table.kl_harmless > broken_kl) & table[measure].notna()]
        if len(broken):
            ax.scatter(broken.k, broken[measure], marker="x", s=80, color="k", zorder=5,
                       label=f"model broken (KL > {broken_kl:g})")
        if not np.isnan(base[measure]):
            ax.axhline(base[measure], color="k", lw=0.8, ls=":", label="no ablation")
        ax.set_xscale("log")
        ax.set_xlabel(f"{kind}s ablated (k)")
        ax.set_ylabel(label + ", harmful prompts")
        ax.legend(fontsize=6)
    axes[0].set_title(f"Fragility of refusal, {model_name}")
    ax2 = axes[2]
    rnd_side = rnd.groupby("k")[["kl_harmless", "cross_entropy"]].median().reset_index()
    ax2.plot(top.k, top.kl_harmless, "o-", color="C3", label="KL harmless, top-k")
    if len(rnd_side):
        ax2.plot(rnd_side.k, rnd_side.kl_harmless, "s--", color="C0", label="KL harmless, random-k (median)")
    ax2.set_xscale("log")
    ax2.set_yscale("symlog", linthresh=0.01)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel(f"{kind}s ablated (k)")
    ax2.set_ylabel("KL (nats)")
    ax3 = ax2.twinx()
    measured = top.dropna(subset=["cross_entropy"])  # measured at the judged points only by default
    ax3.plot(measured.k, measured.cross_entropy, "^:", color="C2", label="cross-entropy, top-k")
    ax3.axhline(base.cross_entropy, color="C2", lw=0.8, ls=":")
    ax3.set_ylabel("cross-entropy on text (nats/token)")
    lines = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
    labels = ax2.get_legend_handles_labels()[1] + ax3.get_legend_handles_labels()[1]
    ax2.legend(lines, labels, fontsize=6)
    ax2.set_title("Side effects")
    fig.tight_layout()
    return fig


def circuit_diagram(table: pd.DataFrame, layers: pd.DataFrame, first_readable: int, direction_layer: int,
                    model_name: str):
    """Layer-by-stage diagram of a circuit map: one marker per candidate (filled = verified,
    size = patch effect), probe accuracy per layer above, readable and direction layers marked."""
    stages = ["detection", "evaluation", "decision", "production"]
    fig, (top, ax) = subplots(2, 1, figsize=(9, 5.2), sharex=True, gridspec_kw={"height_ratios": [1, 2.4]})
    top.plot(layers.layer, layers.probe_accuracy, "k.-")
    top.set_ylabel("probe acc.")
    top.set_ylim(0.0, 1.05)
    top.axhline(0.5, color="grey", lw=0.6, ls=":")
    top.set_title(f"Refusal circuit map, {model_name}")
    for a in (top, ax):
        a.axvline(first_readable - 0.5, color="C2", ls="--", lw=0.8)
        a.axvline(direction_layer, color="C3", ls=":", lw=0.8)
    rng = np.random.default_rng(0)
    for kind, marker in (("neuron", "o"), ("head", "^")):
        part = table[table.component == kind]
        if not len(part):
            continue
        y = part.stage.map({s: i for i, s in enumerate(stages)}).to_numpy() + rng.uniform(-0.25, 0.25, len(part))
        size = 20 + 400 * part.patch_effect.clip(lower=0, upper=1).to_numpy()
        colors = np.where(part.verified, "C3" if kind == "neuron" else "C0", "none")
        ax.scatter(part.layer, y, s=size, marker=marker, facecolors=colors,
                   edgecolors="C3" if kind == "neuron" else "C0", label=f"{kind}s (filled = verified)")
    ax.set_yticks(range(len(stages)), stages)
    ax.set_xlabel("layer   (green dashes: harmfulness becomes readable; red dots: direction layer)")
    n_layers = len(layers)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_xticks(range(n_layers))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
