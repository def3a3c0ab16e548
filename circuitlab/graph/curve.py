"""Whole-circuit faithfulness curves and their MIB summaries (Mueller et al. 2025, "MIB: A
Mechanistic Interpretability Benchmark", §4.1).

For each method, circuits holding a fraction of the graph's edges (MIB's grid: 0.1, 0.2, 0.5, 1,
2, 5, 10, 20, 50, 100 %) are selected from its scores and evaluated exactly
(``faithfulness.evaluate_circuits``), on pairs held out from the ones the scores came from.

- **CPR** (circuit performance ratio, higher is better): area under the faithfulness curve.
- **CMD** (circuit-model difference, lower is better): area between the curve and 1, ``∫|1 - f|``.

Both use the trapezoid rule over the edge *fraction* on a linear axis between the grid's first
and last point, as MIB's ``evaluate_area_under_curve`` does by default (``log_scale=False``; no
point at 0). ``x="log"`` integrates over log10(fraction) instead, normalised to a unit-width
axis, which weighs the small circuits MIB's linear axis nearly ignores.

Random circuits of the same sizes (several seeds) give the baseline band.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch

from circuitlab.graph.circuits import n_for_fraction, random_circuit, select
from circuitlab.graph.faithfulness import CircuitEval, CircuitRunner, evaluate_circuits
from circuitlab.graph.graph import EdgeGraph

__all__ = ["MIB_FRACTIONS", "area_under_curve", "faithfulness_curve", "curve_summary", "smallest_faithful", "curve_jobs",
           "curve_table"]

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def area_under_curve(fractions, faith, x: str = "fraction") -> tuple[float, float]:
    """``(CPR, CMD)``: trapezoid areas under ``f`` and between ``f`` and 1 (see the module docstring)."""
    xs = np.asarray(fractions, dtype=float)
    f = np.asarray(faith, dtype=float)
    if xs.shape != f.shape or len(xs) < 2 or np.any(np.diff(xs) <= 0):
        raise ValueError("need at least two increasing fractions with one faithfulness each")
    if x == "log":
        xs = np.log10(xs)
        xs = (xs - xs[0]) / (xs[-1] - xs[0])
    elif x != "fraction":
        raise ValueError(f"x={x!r} is not 'fraction' or 'log'")
    dx = np.diff(xs)
    return float((dx * (f[1:] + f[:-1]) / 2).sum()), float((dx * (np.abs(1 - f[1:]) + np.abs(1 - f[:-1])) / 2).sum())


def faithfulness_curve(model, pairs, metric, scores: Mapping[str, torch.Tensor], *, fractions=MIB_FRACTIONS,
                       selection: str = "topn", random_seeds: int = 3, ablation: str = "corrupt",
                       batch_size: int = 8, graph: EdgeGraph | None = None, progress: bool = False) -> pd.DataFrame:
    """Faithfulness of each method's circuits and of random circuits at each edge fraction.

    ``scores``: ``{method: [n_writers, n_readers] scores}`` (e.g. ``EdgeScores.mean``). Returns a tidy
    table: method, seed (random only), fraction, n_edges (after pruning), faithfulness, metric.
    Identical circuits (e.g. every method's 100 % circuit) are run once.
    """
    graph = graph or EdgeGraph.from_model(model)
    jobs, where, masks = curve_jobs(graph, scores, fractions, selection, random_seeds)
    result = evaluate_circuits(model, pairs, metric, masks, ablation=ablation, batch_size=batch_size, graph=graph,
                               progress=progress)
    return curve_table(jobs, where, result, ablation)


def curve_jobs(graph: EdgeGraph, scores: Mapping[str, torch.Tensor], fractions=MIB_FRACTIONS, selection: str = "topn",
               random_seeds: int = 3):
    """The curve's circuits: ``(jobs, where, masks)`` — (method, seed, fraction, mask) per curve point, each
    point's index into the distinct non-empty ``masks`` (None: pruned to nothing), so identical circuits
    (e.g. every method's 100 % circuit) are run once."""
    fractions = tuple(sorted(float(f) for f in fractions))
    jobs = [(name, pd.NA, frac, select(graph, s, n_for_fraction(graph, frac), selection))
            for name, s in scores.items() for frac in fractions]
    jobs += [("random", seed, frac, random_circuit(graph, n_for_fraction(graph, frac), seed))
             for seed in range(random_seeds) for frac in fractions]
    unique, where = {}, []
    for *_, mask in jobs:  # a circuit pruned to nothing is the empty circuit: f = 0, not run
        where.append(unique.setdefault(mask.numpy().tobytes(), (len(unique), mask))[0] if mask.any() else None)
    return jobs, where, [m for _, m in sorted(unique.values(), key=lambda t: t[0])]


def curve_table(jobs, where, result, ablation: str) -> pd.DataFrame:
    """The tidy curve (method, seed, fraction, n_edges, faithfulness, metric, ...) from ``curve_jobs`` and
    the circuits' evaluation (``evaluate_circuits`` of its masks)."""
    faith = result.faithfulness()
    rows = [{"method": name, "seed": seed, "fraction": frac, "n_edges": int(mask.sum()),
             "faithfulness": 0.0 if k is None else float(faith[k]),
             "metric": float((result.empty if k is None else result.circuits[k]).mean())}
            for (name, seed, frac, mask), k in zip(jobs, where)]
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    df["clean_metric"], df["empty_metric"], df["ablation"] = result.clean.mean(), result.empty.mean(), ablation
    return df


def curve_summary(curve: pd.DataFrame, x: str = "fraction") -> pd.DataFrame:
    """CPR and CMD per method (random: mean over seeds, with the min-max over seeds)."""
    rows = []
    for name, sub in curve.groupby("method", sort=False):
        per_seed = []
        for _, s in sub.groupby(sub["seed"].fillna(-1)):
            s = s.sort_values("fraction")
            per_seed.append(area_under_curve(s.fraction, s.faithfulness, x))
        a = np.asarray(per_seed)
        rows.append({"method": name, "cpr": a[:, 0].mean(), "cmd": a[:, 1].mean(), "cpr_min": a[:, 0].min(),
                     "cpr_max": a[:, 0].max(), "cmd_min": a[:, 1].min(), "cmd_max": a[:, 1].max(),
                     "n_seeds": len(a), "x": x})
    return pd.DataFrame(rows)


def smallest_faithful(model, pairs, metric, scores: torch.Tensor, *, target: float = 0.8, selection: str = "topn",
                      ablation: str = "corrupt", batch_size: int = 8, graph: EdgeGraph | None = None,
                      bracket: tuple[int, int] | None = None, max_evals: int = 24) -> dict:
    """The smallest ``n`` whose selected circuit reaches faithfulness ``target`` on ``pairs``.

    Bisection on ``n`` (geometric while the bracket is wide). Faithfulness need not be monotone in
    ``n``: the answer is the smallest ``n`` found that reaches ``target`` above an ``n`` that does
    not. ``bracket=(lo, hi)``: a known miss and a known hit (e.g. from the faithfulness curve on the
    same pairs) to start from. Returns ``{n, n_edges, faithfulness, mask, evaluations}``; ``n=None``
    if even ``hi`` (default: the full graph) misses.
    """
    graph = graph or EdgeGraph.from_model(model)
    runner = CircuitRunner(model, pairs, metric, ablation=ablation, batch_size=batch_size, graph=graph)
    cache = {}

    def f(n):
        if n not in cache:
            mask = select(graph, scores, n, selection)
            faith = 0.0  # pruned to nothing: the empty circuit
            if mask.any():
                faith = float(CircuitEval(runner.clean, runner.empty, runner.run([mask]), ablation).faithfulness()[0])
            cache[n] = (faith, mask)
        return cache[n][0]

    lo, hi = bracket if bracket is not None else (0, graph.n_edges)
    if f(hi) < target:
        return {"n": None, "n_edges": None, "faithfulness": cache[hi][0], "mask": None, "evaluations": len(cache)}
    while hi - lo > 1 and len(cache) < max_evals:
        mid = int(round(np.sqrt(max(lo, 1) * hi))) if hi > 4 * max(lo, 1) else (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    faith, mask = cache[hi]
    return {"n": hi, "n_edges": int(mask.sum()), "faithfulness": faith, "mask": mask, "evaluations": len(cache)}
