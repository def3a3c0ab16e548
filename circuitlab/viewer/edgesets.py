"""Edge sets: the scored edges a page can show, one per method, with the faithfulness they were measured at.

- A **circuit-map** run gives one set: its edge circuit (``circuit_edges.csv``, every kept edge)
  with the one faithfulness it was measured at (``edge_circuit.csv``).
- An **edge-attribution** run gives one set per method: the edges of its top-n faithfulness curve
  circuits, rebuilt from the saved scores (``structure.entry_points``: each edge's first curve
  point whose pruned circuit keeps it; the rebuilt sizes equal the curve's ``n_edges``). A page
  holds at most ``max_edges`` edges per set: the circuits of the curve up to that size.

Edges are ``[writer, reader, score, entry]``: ``entry`` indexes the set's ``curve`` (the smallest
measured circuit holding the edge), or is None. Where scores tie at a curve circuit's cut
(``tied_cut``), the rebuilt circuit is one of the equally ranked choices and may differ in size
from the measured one.
"""

from __future__ import annotations

from circuitlab.viewer.structure import Architecture, entry_points
from circuitlab.viewer.units import number

__all__ = ["circuit_map_set", "edge_attribution_sets", "MAX_EDGES"]

MAX_EDGES = 4000  # per set: keeps the page small and its SVG fast at 1280x800 and on a phone


def _label(method: str) -> str:
    return {"eap": "EAP", "eap-ig": "EAP-IG"}.get(method, method.upper())


def circuit_map_set(run) -> dict | None:
    """The circuit-map run's edge circuit as one edge set, or None when its edge stage did not run."""
    if "circuit_edges" not in run.tables:
        return None
    edges = run.tables["circuit_edges"]
    if "abs_rank" in edges.columns:
        edges = edges.sort_values("abs_rank")
    info = run.tables["edge_circuit"].iloc[0].to_dict()
    method, selection = str(info.get("method", "eap-ig")), str(info.get("selection", ""))
    n_graph = int(info.get("n_graph_edges") or 0) or None
    point = {"fraction": number(info.get("pct_edges", 0)) / 100 if number(info.get("pct_edges")) else None,
             "n_edges": int(info.get("n_edges", len(edges))), "faithfulness": number(info.get("faithfulness")),
             "included": True, "tied_cut": False}
    return {
        "id": f"circuit-map:{method}", "method": method, "selection": selection,
        "label": f"{_label(method)} {selection} circuit (circuit-map)",
        "source": f"{run.path.name}/circuit_edges.csv",
        "description": (f"the circuit-map run's edge circuit: {method} scores on {info.get('n_discover_pairs')} "
                        f"screening pairs, {selection} selection, faithfulness measured exactly on "
                        f"{info.get('n_eval_pairs')} held-out verification pairs ({info.get('ablation')} ablation)"),
        "n_graph_edges": n_graph, "complete": True,
        "edges": [[str(w), str(r), float(s), 0] for w, r, s in zip(edges.writer, edges.reader, edges.score)],
        "curve": [point], "random": [], "cpr": None, "cmd": None, "cpr_random": None, "cmd_random": None,
    }


def _random_band(curve) -> list[dict]:
    rand = curve[curve.method == "random"]
    if rand.empty:
        return []
    band = rand.groupby("fraction").faithfulness.agg(["mean", "min", "max"]).reset_index()
    return [{"fraction": float(r.fraction), "mean": number(r["mean"]), "min": number(r["min"]),
             "max": number(r["max"])} for _, r in band.iterrows()]


def _areas(run, method: str) -> tuple:
    """(CPR, CMD) on MIB's linear fraction axis from the run's summary table, or (None, None)."""
    summary = run.tables.get("summary")
    if summary is None:
        return None, None
    if "x" in summary.columns:  # the summary holds both axes; CPR / CMD are MIB's linear one
        summary = summary[summary.x == "fraction"]
    rows = summary[summary.method == method]
    return (number(rows.cpr.iloc[0]), number(rows.cmd.iloc[0])) if len(rows) else (None, None)


def _sizes(points, n_graph: int) -> list[int]:
    """Edges each curve circuit is cut at before pruning (``circuitlab.graph.n_for_fraction``)."""
    return [max(1, int(round(f * n_graph))) for f in points.fraction]


def _tied(ranked, n: int) -> bool:
    """Whether the top-n cut falls inside a run of equal |score|: the saved circuit may then hold other
    tied edges than the saved rank order gives (torch.topk breaks ties its own way)."""
    return 0 < n < len(ranked) and abs(ranked[n - 1][2]) == abs(ranked[n][2])


def edge_attribution_sets(run, arch: Architecture, max_edges: int = MAX_EDGES) -> list[dict]:
    """One edge set per method of an edge-attribution run (module docstring)."""
    table, curve = run.table, run.tables["curve"]
    params = run.config.get("parameters") or {}
    graph = run.tables.get("graph")
    counts = dict(zip(graph.quantity, graph["count"])) if graph is not None else {}
    band = _random_band(curve)
    r_cpr, r_cmd = _areas(run, "random")
    out = []
    for method in dict.fromkeys(table.method):
        rows = table[table.method == method].sort_values("abs_rank")
        n_graph = int(counts.get("edges") or len(rows))
        points = curve[curve.method == method].sort_values("fraction")
        n_fit = 0  # curve points (sizes increase) whose circuits fit on the page
        while n_fit < len(points) and int(points.n_edges.iloc[n_fit]) <= max_edges:
            n_fit += 1
        ranked = list(zip(rows.writer.astype(str), rows.reader.astype(str), rows.score.astype(float)))
        sizes = _sizes(points, n_graph)[:n_fit]
        if sizes:
            top = ranked[:sizes[-1]]
            entry = entry_points(arch, [(w, r) for w, r, _ in top], sizes)
            edges = [[w, r, s, e] for (w, r, s), e in zip(top, entry) if e is not None]
        else:  # even the smallest curve circuit is larger than a page holds: the best edges, unpruned
            edges = [[w, r, s, None] for w, r, s in ranked[:max_edges]]
        cpr, cmd = _areas(run, method)
        out.append({
            "id": f"edge-attribution:{method}", "method": method, "selection": params.get("selection", "topn"),
            "label": f"{_label(method)} {params.get('selection', 'topn')} (edge-attribution)",
            "source": f"{run.path.name}/table.parquet + curve.csv",
            "description": (f"{method} scores ({params.get('mode', 'denoise')}) on the edge-attribution run's "
                            f"discovery pairs; curve circuits are the top-|score| edges at each fraction, pruned; "
                            f"faithfulness measured exactly on held-out pairs ({params.get('ablation')} ablation)"),
            "n_graph_edges": n_graph, "complete": n_fit == len(points),
            "edges": edges,
            "curve": [{"fraction": float(p.fraction), "n_edges": int(p.n_edges), "faithfulness": number(p.faithfulness),
                       "included": i < n_fit, "tied_cut": _tied(ranked, n)}
                      for i, (p, n) in enumerate(zip(points.itertuples(), _sizes(points, n_graph)))],
            "random": band, "cpr": cpr, "cmd": cmd, "cpr_random": r_cpr, "cmd_random": r_cmd,
        })
    return out
