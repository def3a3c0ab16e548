"""ACDC vs EAP-IG on the refusal circuit: faithfulness at equal edge counts on held-out pairs, and wall time.

Issue 25, item 3. Matched harmful/harmless pairs (AdvBench vs the harmless set, train split, equal
token length: ``methods.pairs.make_pairs``) are shuffled and split exactly as ``refusal_edges.py``
splits them (``edge-attribution``'s ``split``, seed 0): discovery pairs and held-out pairs. On the
discovery pairs, edges are scored by EAP-IG (Hanna et al. 2024, 5 steps over inputs, refusal score),
and ACDC (Conmy et al. 2023; ``circuitlab.graph.acdc``) runs over a fixed tau grid, WARM-STARTED on
the top ``--warm-start`` EAP-IG edges: every other edge is removed before its first step and never
tried. That is NOT the paper's ACDC (whose search starts from the whole graph, ~10^5 forward passes
per tau on the embedded model); its circuits are subsets of EAP-IG's top N, as in the MIB shared-task
recipe (Mueller et al. 2025). Then, on the HELD-OUT pairs, the exact faithfulness
``(m(C) - m(empty)) / (m(N) - m(empty))`` (refusal score, corrupted-run ablation) of

- ACDC's circuit at every tau (pruned to embedding -> logits paths; ``n_edges`` = its edges), and
- EAP-IG's top-n circuit for every edge count n an ACDC run reached (``n_effective``: its edges left
  after pruning dangling ones, which changes no output),

plus the full graph (faithfulness 1 by construction: a check) and the warm-start candidate set.

Wall time: EAP-IG scoring once (every size shares it), ACDC per tau (with ``n_evals`` forward passes
of the discovery pairs and ``n_cached`` criterion values reused from earlier taus: runs at nearby
taus ask for the criterion of the same masks) and in total (baselines included). The matmul peak
(``io.provenance.matmul_peak``, at the run's thread count) and the load average are recorded at the
start and the end, and the 1-minute load beside every row.

N = 128 by default: on the embedded model the top 64 EAP-IG edges of these discovery pairs hold no
embedding -> logits path (pruned, they are the empty circuit, faithfulness 0; the top 96 keep 46
edges, the top 128 keep 110; counted from refusal_edges.py's EAP-IG scores on the same split), so a
smaller warm start leaves ACDC nothing to find.

Cost (embedded model, one thread, measured beside other jobs at load 6-9): one exact forward of the 8
discovery pairs ~6 s; EAP-IG (5 steps) on 8 pairs 93 s; the held-out measurements ~15 forwards; each
tau at most N + 1 forwards of the discovery pairs, fewer at large taus (a reader whose node no longer
reaches the logits is skipped) and fewer where an earlier tau asked for the same mask: the default
grid took 652 s at tau 1e-3, 432 s at 4e-3, 139 s at 1 and ~0 s at the three taus that made tau 1's
decisions, 1,424 s in all. ``--budget-min`` (default 25) is a stop rule, not a choice: no tau is
started once the run has used that many minutes, and the skipped taus are listed in run.json. The
taus run largest, smallest, then midpoints (``spread``), so a run cut short still spans the grid; the
order changes no result (the criterion cache is shared by all taus). Outputs are rewritten after every
tau, so a run stopped from outside keeps every finished tau.

Writes OUT (default results/acdc_vs_eapig/): ``table.csv`` (one row per method and tau or n: method,
tau, n_edges, n_effective, faithfulness_heldout, seconds, n_evals, n_cached, criterion_discovery,
load_1m), ``circuits.csv`` (every ACDC circuit's edges with their EAP-IG score),
``faithfulness_vs_edges.png`` and ``run.json`` (settings, pair counts, timings, matmul
peak, load, provenance).

Usage:
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/acdc_vs_eapig.py      # embedded, ~25 min
    .venv/bin/python experiments/acdc_vs_eapig.py --model tiny --out /tmp/acdc_tiny  # smoke run, seconds
Options: --n-discover / --n-heldout (pairs), --warm-start N, --taus a,b,c, --criterion kl|metric,
--ig-steps, --budget-min, --threads; a bad value exits 2 with a one-line message before the model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from circuitlab import datasets, load_model
from circuitlab import graph as eg
from circuitlab.experiments.edge_attribution import EdgeAttribution
from circuitlab.graph.plot import plot_curves
from circuitlab.io import provenance
from circuitlab.io.results import OutputError, check_writable
from circuitlab.methods.attribution import refusal_metric
from circuitlab.models.loading import check_model_name

OUT = Path(__file__).resolve().parent.parent / "results" / "acdc_vs_eapig"
# Fixed before any run (no choosing after seeing results): 6 values, 0.6 decades apart, in the criterion's
# units (KL in nats; the refusal score in log-odds)
TAUS = {"kl": tuple(float(t) for t in np.logspace(-3, 0, 6)),
        "metric": tuple(float(t) for t in np.logspace(-2, 1, 6))}
COLUMNS = ["method", "tau", "n_edges", "n_effective", "faithfulness_heldout", "seconds", "n_evals", "n_cached",
           "criterion_discovery", "load_1m"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,0.01, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    """The options, every value checked here (exit 2, one line) so nothing is loaded for a bad one."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded (default) | tiny | planted | a local model dir")
    ap.add_argument("--n", "--n-prompts", dest="n", type=int, default=128,  # --n-prompts: the name the committed run used
                    help="prompts loaded per set (equal-length pairs are a subset: 128 give 16 on the embedded model)")
    ap.add_argument("--n-discover", type=int, default=8, help="pairs that score edges and run ACDC")
    ap.add_argument("--n-heldout", type=int, default=8, help="pairs every circuit's faithfulness is measured on")
    ap.add_argument("--warm-start", type=int, default=128,
                    help="N: ACDC tries only the top-N EAP-IG edges (see the docstring for why 128)")
    ap.add_argument("--taus", type=_floats, default=None,
                    help="ACDC thresholds, comma-separated (default: 6 log-spaced, 1e-3..1 kl, 1e-2..10 metric)")
    ap.add_argument("--criterion", default="kl",
                    help="ACDC's criterion: kl (the paper's default) | metric (refusal score)")
    ap.add_argument("--ig-steps", type=int, default=5, help="EAP-IG interpolation steps")
    ap.add_argument("--budget-min", type=float, default=25.0,
                    help="no tau is started after this many minutes of the run (skipped taus are listed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: yields to other jobs on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0, help="pair shuffle before the split (as refusal_edges.py)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.criterion not in eg.CRITERIA:
        ap.error(f"--criterion {args.criterion!r} is not one of {', '.join(eg.CRITERIA)}")
    for name in ("n", "n_discover", "n_heldout", "warm_start", "ig_steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    args.taus = list(TAUS[args.criterion]) if args.taus is None else args.taus
    if not args.taus or not all(math.isfinite(t) and t >= 0 for t in args.taus) or len(set(args.taus)) < len(args.taus):
        ap.error(f"--taus must be distinct finite numbers >= 0, got {args.taus}")
    if not args.budget_min > 0:
        ap.error(f"--budget-min must be > 0, got {args.budget_min}")
    try:
        check_model_name(args.model)
        check_writable(args.out)
    except (ValueError, OutputError) as err:
        ap.error(str(err).splitlines()[0])
    return args


class HeldOut:
    """Exact faithfulness on the held-out pairs, one forward per distinct circuit (kept by mask bytes)."""

    def __init__(self, model, pairs, metric, graph):
        self.runner = eg.CircuitRunner(model, pairs, metric, batch_size=len(pairs), graph=graph)
        self._done: dict[bytes, float] = {}

    def __call__(self, mask: torch.Tensor) -> float:
        key = mask.numpy().tobytes()
        if key not in self._done:
            r = self.runner
            kept = r.run([mask]) if mask.any() else r.empty[None]  # pruned to nothing: the empty circuit
            self._done[key] = float(eg.CircuitEval(r.clean, r.empty, kept, r.ablation).faithfulness()[0])
        return self._done[key]


def spread(taus) -> list[float]:
    """``taus`` largest first, then the smallest, then midpoints by bisection: any prefix spans the grid."""
    s = sorted(set(taus), reverse=True)
    order, spans = [0, len(s) - 1][:len(s)], [(0, len(s) - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo > 1:
            order.append((lo + hi) // 2)
            spans += [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
    return [s[i] for i in order]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def write_outputs(out: Path, rows: list[dict], circuits: list[dict], run: dict, graph: eg.EdgeGraph,
                  title: str) -> pd.DataFrame:
    """``table.csv``, ``circuits.csv``, ``run.json`` and the figure, rewritten whole (a checkpoint after every tau)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.to_csv(out / "table.csv", index=False)
    pd.DataFrame(circuits, columns=["tau", "writer", "reader", "eapig_score"]).to_csv(out / "circuits.csv", index=False)
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    curve = table[table.method.isin(["acdc", "eap-ig"]) & (table.n_edges > 0)].assign(
        fraction=lambda t: t.n_edges / graph.n_edges, faithfulness=lambda t: t.faithfulness_heldout)
    if len(curve):
        fig = plot_curves(curve, title)
        fig.axes[0].set_xlabel(f"edges kept (% of the graph's {graph.n_edges:,})")
        fig.savefig(out / "faithfulness_vs_edges.png", dpi=130)
    return table


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    t0, timings = time.perf_counter(), {}
    torch.set_num_threads(args.threads)
    record = provenance.start()
    peak_start = provenance.matmul_peak()
    model = load_model(args.model)
    timings["load_model"] = round(time.perf_counter() - t0, 1)
    print(f"[{time.perf_counter() - t0:5.0f} s] loaded {model}; load {os.getloadavg()}", flush=True)

    harmful = datasets.load("advbench", split="train", n=args.n, seed=0)
    harmless = datasets.load("harmless", split="train", n=args.n, seed=0)
    n = args.n_discover + args.n_heldout
    split = EdgeAttribution(n_pairs=n, discover_fraction=args.n_discover / n, seed=args.seed)
    discover, heldout, n_unpaired = split.split(model, harmful, harmless)
    graph, metric = eg.EdgeGraph.from_model(model), refusal_metric(model)
    print(f"[{time.perf_counter() - t0:5.0f} s] {len(discover)} discovery + {len(heldout)} held-out pairs "
          f"({n_unpaired} harmful prompts unpaired); graph {graph.n_edges:,} edges", flush=True)

    t = time.perf_counter()
    scored = eg.edge_scores(model, discover, metric, method="eap-ig", steps=args.ig_steps, batch_size=8, graph=graph,
                            progress=True)
    timings["eapig_scoring"] = eapig_s = round(time.perf_counter() - t, 2)
    n_warm = min(args.warm_start, graph.n_edges)
    candidates = eg.warm_start(graph, scored.mean, n_warm)
    print(f"[{time.perf_counter() - t0:5.0f} s] EAP-IG scores in {eapig_s:.0f} s", flush=True)

    t = time.perf_counter()
    evaluate = HeldOut(model, heldout, metric, graph)
    rows = [dict(method="full", n_edges=graph.n_edges, n_effective=graph.n_edges,
                 faithfulness_heldout=evaluate(graph.valid.clone()), load_1m=_load()),
            dict(method="candidates", n_edges=n_warm, n_effective=int(eg.prune(graph, candidates).sum()),
                 faithfulness_heldout=evaluate(candidates), seconds=eapig_s, load_1m=_load())]
    timings["heldout_baselines"] = round(time.perf_counter() - t, 2)
    print(f"[{time.perf_counter() - t0:5.0f} s] held-out: full graph {rows[0]['faithfulness_heldout']:.4f}, "
          f"top-{n_warm} EAP-IG candidates {rows[1]['faithfulness_heldout']:.4f}", flush=True)

    t = time.perf_counter()
    search = eg.ACDCSearch(model, discover, criterion=args.criterion,
                           metric=metric if args.criterion == "metric" else None, graph=graph)
    timings["acdc_baselines"] = round(time.perf_counter() - t, 2)
    taus = spread(args.taus)
    run = {"script": "experiments/acdc_vs_eapig.py",
           "command": " ".join(["experiments/acdc_vs_eapig.py"] + (sys.argv[1:] if argv is None else list(argv))),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "model": {"id": model.name, "fingerprint": model.fingerprint, "dtype": str(model.dtype)},
           "graph": graph.counts(), "pairs": {"discover": len(discover), "heldout": len(heldout),
                                              "unpaired_harmful": n_unpaired, "prompts": [harmful.name, harmless.name]},
           "metric": "refusal score (methods.metrics.refusal_score_from_logits), corrupted-run ablation",
           "acdc": {"criterion": args.criterion, "warm_start": n_warm, "taus_grid": sorted(args.taus),
                    "taus_order": taus, "taus_run": [], "taus_skipped": [],
                    "note": "warm-started on the top-N EAP-IG edges: NOT the paper's full ACDC"},
           "heldout_metric": {"clean_mean": float(evaluate.runner.clean.mean()),
                              "empty_mean": float(evaluate.runner.empty.mean())},
           "torch_threads": args.threads, "matmul_peak_gflops_start": round(peak_start / 1e9, 1),
           "timings_s": timings, "complete": False}
    title = f"{model.name}: ACDC (warm start N={n_warm}, {args.criterion}) vs EAP-IG top-n\nheld-out faithfulness"
    eap_ns, circuits = set(), []
    write_outputs(args.out, rows, circuits, run, graph, title)
    for tau in taus:
        if time.perf_counter() - t0 > 60 * args.budget_min:
            run["acdc"]["taus_skipped"].append(tau)
            continue
        r = search.run(tau, candidates=candidates, warm_start_n=n_warm, progress=True)
        found = dict(method="acdc", tau=tau, n_edges=r.n_edges, n_effective=r.n_edges,
                     faithfulness_heldout=evaluate(r.pruned), seconds=round(r.wall_s, 3), n_evals=r.n_evals,
                     n_cached=r.n_cached, criterion_discovery=r.final, load_1m=_load())
        rows.append(found)
        circuits += [dict(tau=tau, writer=w, reader=rd, eapig_score=float(scored.mean[graph.edge(w, rd)]))
                     for w, rd in r.edges()]
        run["acdc"]["taus_run"].append(tau)
        if r.n_edges not in eap_ns:  # EAP-IG's circuit of the same size (unpruned top-n: pruning changes nothing)
            eap_ns.add(r.n_edges)
            mask = eg.top_n(graph, scored.mean, r.n_edges, pruned=False) if r.n_edges else torch.zeros_like(graph.valid)
            rows.append(dict(method="eap-ig", n_edges=r.n_edges, n_effective=int(eg.prune(graph, mask).sum()),
                             faithfulness_heldout=evaluate(mask), seconds=eapig_s, load_1m=_load()))
        timings["acdc_total"] = round(timings["acdc_baselines"] + sum(x.get("seconds") or 0 for x in rows
                                                                        if x["method"] == "acdc"), 2)
        run.update(provenance=provenance.finish(record, model))  # so far: a run stopped from outside keeps it
        run["acdc"]["n_cached_total"] = search.n_cached
        write_outputs(args.out, rows, circuits, run, graph, title)
        eap = next(x for x in rows if x["method"] == "eap-ig" and x["n_edges"] == r.n_edges)
        print(f"[{time.perf_counter() - t0:5.0f} s] tau {tau:g}: {r.n_edges} edges, {r.n_evals} evals "
              f"({r.n_cached} cached) in {r.wall_s:.0f} s; held-out faithfulness "
              f"ACDC {found['faithfulness_heldout']:.4f} vs EAP-IG {eap['faithfulness_heldout']:.4f}; "
              f"load {_load()}", flush=True)
    run.update(matmul_peak_gflops_end=round(provenance.matmul_peak() / 1e9, 1), complete=True,
               provenance=provenance.finish(record, model))
    timings["total"] = round(time.perf_counter() - t0, 1)
    table = write_outputs(args.out, rows, circuits, run, graph, title)
    print(table.to_string(index=False))
    print(f"saved {args.out} in {timings['total']:.0f} s", flush=True)
    return table


if __name__ == "__main__":
    main()
