"""Refusal circuits as graphs on the embedded model: EAP vs EAP-IG vs random, and the smallest
faithful circuit.

1. ``edge-attribution`` on N AdvBench vs N harmless prompts (train split): EAP and EAP-IG (5 steps)
   scores on half of the equal-length pairs, faithfulness curves over MIB's edge fractions on the
   other half (EAP, EAP-IG, ``--seeds`` random circuits), CPR / CMD, bootstrap stability.
2. The smallest EAP-IG (and EAP) circuit reaching faithfulness ``--target`` (0.8) on the held-out
   pairs (bisection on the number of edges), and a figure of it as a graph (nodes by layer, edge
   width by |score|).

Writes results/refusal_edges/: edge_attribution/ (the Result: table, curve, summary, stability,
graph counts, faithfulness_curve.png), smallest_circuit_<method>.csv, circuit_<method>.png and
summary.json.

Usage: python experiments/refusal_edges.py [--n 128] [--quick]
(``--quick``: the planted model (``circuitlab.models.planted``) and its 32 prompt pairs, whose known circuit
embedding -> head 1.2 key/value -> MLP 2 -> logits the run should recover; a smoke run in about a
minute, not the committed numbers.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import circuitlab as cl
from circuitlab import graph as eg
from circuitlab.experiments import add_set_option, get, set_overrides
from circuitlab.io.results import check_output_dir
from circuitlab.graph.plot import plot_circuit
from circuitlab.methods.metrics import refusal_score_from_logits, refusal_tokens
from circuitlab.models.planted import planted_prompts

OUT = Path(__file__).resolve().parent.parent / "results" / "refusal_edges"


def scores_from_table(graph: eg.EdgeGraph, table: pd.DataFrame, method: str) -> torch.Tensor:
    """The ``[n_writers, n_readers]`` score matrix of one method, rebuilt from the Result table."""
    sub = table[table.method == method]
    out = torch.full((graph.n_writers, graph.n_readers), float("nan"))
    w = torch.as_tensor([graph.writer_index(x) for x in sub.writer])
    r = torch.as_tensor([graph.reader_index(x) for x in sub.reader])
    out[w, r] = torch.tensor(sub.score.to_numpy(), dtype=torch.float32)
    return out


def bracket(graph: eg.EdgeGraph, curve: pd.DataFrame, method: str, target: float) -> tuple[int, int] | None:
    """``(lo, hi)`` edge counts around the first curve point reaching ``target`` (same pairs, same
    selection), so the bisection starts inside that interval; None if no point reaches it."""
    sub = curve[curve.method == method].sort_values("fraction")
    hits = sub[sub.faithfulness >= target]
    if hits.empty:
        return None
    first = hits.fraction.iloc[0]
    below = sub[sub.fraction < first].fraction
    return (eg.n_for_fraction(graph, below.iloc[-1]) if len(below) else 0, eg.n_for_fraction(graph, first))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="prompts per set (pairs are the equal-length subset)")
    parser.add_argument("--n-pairs", type=int, default=32, help="pairs used (half discover, half evaluate)")
    parser.add_argument("--seeds", type=int, default=3, help="random-circuit seeds")
    parser.add_argument("--target", type=float, default=0.8, help="faithfulness the smallest circuit must reach")
    parser.add_argument("--quick", action="store_true", help="tiny model, few prompts (smoke run)")
    parser.add_argument("--out", type=Path, default=OUT)
    add_set_option(parser)
    args = parser.parse_args(argv)
    overrides = set_overrides(parser, "edge-attribution", args.set)
    check_output_dir(args.out / "edge_attribution", overwrite=True)  # fails now, not after the run
    t0 = time.time()
    if args.quick:  # the planted model: a known circuit, so the smoke run's numbers mean something
        model = cl.load_model("planted")
        harmful, harmless = planted_prompts(32)
    else:
        model = cl.load_model("embedded")
        harmful = cl.datasets.load("advbench", split="train", n=args.n, seed=0)
        harmless = cl.datasets.load("harmless", split="train", n=args.n, seed=0)
    print(f"[{time.time() - t0:5.0f} s] loaded {model}")

    exp = get("edge-attribution")(**{**dict(
        n_pairs=args.n_pairs, ig_steps=5, random_seeds=args.seeds, n_boot=5 if args.quick else 20), **overrides})
    result = exp.run(model, harmful, harmless)
    result.save(args.out / "edge_attribution", overwrite=True)
    print(f"[{time.time() - t0:5.0f} s] edge attribution: CPR {result.summary['cpr']} CMD {result.summary['cmd']}")

    graph = eg.EdgeGraph.from_model(model)
    _, evaluate, _ = exp.split(model, harmful, harmless)
    toks = refusal_tokens(model)

    def metric(logits):
        return refusal_score_from_logits(logits, toks)

    smallest = {}
    for method in exp.methods:
        scores = scores_from_table(graph, result.table, method)
        found = eg.smallest_faithful(model, evaluate, metric, scores, target=args.target, selection=exp.selection,
                                     batch_size=exp.batch_size, graph=graph,
                                     bracket=bracket(graph, result.tables["curve"], method, args.target))
        smallest[method] = {k: v for k, v in found.items() if k != "mask"}
        if found["mask"] is not None:
            edges = pd.DataFrame(graph.edges_of(found["mask"]), columns=["writer", "reader"])
            edges["score"] = [float(scores[graph.edge(w, r)]) for w, r in zip(edges.writer, edges.reader)]
            edges.sort_values("score", key=abs, ascending=False).to_csv(args.out / f"smallest_circuit_{method}.csv",
                                                                        index=False)
            fig = plot_circuit(graph, found["mask"], scores,
                               f"{model.name}: smallest {method} circuit with faithfulness >= {args.target} "
                               f"(held-out {found['faithfulness']:.2f})")
            fig.savefig(args.out / f"circuit_{method}.png", dpi=140, bbox_inches="tight")
        print(f"[{time.time() - t0:5.0f} s] smallest {method} circuit: {smallest[method]}")

    summary = {"model": model.name, "graph": graph.counts(), "cpr": result.summary["cpr"],
               "cmd": result.summary["cmd"], "n_discover": result.summary["n_discover"],
               "n_evaluate": result.summary["n_evaluate"], "target": args.target, "smallest": smallest,
               "stability": result.tables["stability"].to_dict("records"), "quick": args.quick,
               "seconds": round(time.time() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
