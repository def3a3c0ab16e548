"""Benchmark: edge attribution (EAP-IG) and whole-circuit faithfulness, and the TransformerLens oracle.

One process:

1. circuitlab on the embedded model (GQA; TransformerLens refuses it): EAP-IG (``--steps``, default
   5) over the full edge graph for ``--n-pairs`` harmful/harmless pairs (default 32), then a
   faithfulness curve (MIB's 10 edge fractions, EAP-IG + ``--random-seeds`` (1) random circuits) on
   the same pairs. Wall time and peak RSS of each phase.
2. circuitlab vs TransformerLens (``tools.analysis.attribution_patching``) on a random-init
   NON-GQA model of the embedded model's size (``--tl-layers`` 24, 14 heads = 14 kv heads,
   d_model 896, d_mlp 4864, vocab 151936): EAP edge scores of the ``--tl-pairs`` shortest pairs
   and one faithfulness evaluation (a top-1 % circuit, ``--faith-fraction``, on one pair), both
   tools on the same pairs: time ratio and max |difference|. TransformerLens loops in Python over
   per-position edges (~180k per position at full size), so each of its calls runs under a time limit
   (``--tl-timeout``, default 600 s, a SIGALRM in this process): a call cut off is reported as
   ``timed_out`` and its ratio as a lower bound (``>= limit / ours``). ``--tl-layers 2,24`` compares
   at several depths in one run (the shallow one finishes; the full-size one shows the trend).

``--quick`` swaps in the tiny model (part 1) and a 4-layer non-GQA model (part 2) with a few pairs:
a smoke run that exercises every code path in about a minute.

    nice -n 10 .venv/bin/python bench/edges.py            # full (the lead schedules it)
    .venv/bin/python bench/edges.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
from contextlib import contextmanager
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import circuitlab as cl  # noqa: E402
from circuitlab import graph as eg  # noqa: E402
from circuitlab.methods.pairs import make_pairs  # noqa: E402
from circuitlab.graph.oracle import build_mha, tl_edge_scores, tl_faithfulness  # noqa: E402
from circuitlab.methods.metrics import refusal_score_from_logits, refusal_tokens  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "edges.json"


class PeakRSS:
    """Peak resident set size (bytes) sampled every 10 ms while the block runs."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.01)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_rss_gib": round(self.peak / 2**30, 3),
                "rss_growth_gib": round((self.peak - self.start) / 2**30, 3)}


class TimeLimit(Exception):
    """A TransformerLens call ran past ``--tl-timeout``."""


@contextmanager
def time_limit(seconds: float):
    """Raise TimeLimit inside the block after ``seconds`` (SIGALRM: TransformerLens's loops are Python)."""
    def expire(signum, frame):
        raise TimeLimit()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_tl(call, limit: float):
    """(TransformerLens's result or None, its PeakRSS record with ``timed_out``)."""
    result = None
    with PeakRSS() as rss:
        try:
            with time_limit(limit):
                result = call()
        except TimeLimit:
            pass
    return result, {**rss.record(), "timed_out": result is None, "limit_s": limit}


def ratio(theirs: dict, ours: dict) -> str:
    """TransformerLens seconds / circuitlab seconds; '>= x' where TransformerLens was cut off."""
    value = round(theirs["seconds"] / ours["seconds"], 2)
    return f">= {value}" if theirs["timed_out"] else str(value)


def metric_for(model):
    toks = refusal_tokens(model)
    return lambda logits: refusal_score_from_logits(logits, toks)


def load_pairs(model, n: int, quick: bool):
    """Up to ``n`` equal-length AdvBench / harmless pairs (padding only if too few match in length)."""
    harmful = cl.datasets.load("advbench", split="train", n=4 * n, seed=0)
    harmless = cl.datasets.load("harmless", split="train", n=4 * n, seed=0)
    pairs = make_pairs(model, harmful, harmless, n_pairs=n, pairing="length")
    if len(pairs) < n:
        pairs = make_pairs(model, harmful, harmless, n_pairs=n, pairing="pad")
    return list(pairs)


def part_circuitlab(args) -> dict:
    model = cl.load_model("tiny" if args.quick else "embedded")
    graph = eg.EdgeGraph.from_model(model)
    pairs = load_pairs(model, args.n_pairs, args.quick)
    metric = metric_for(model)
    out = {"model": model.name, "graph": graph.counts(), "n_pairs": len(pairs),
           "tokens": [p.length for p in pairs], "steps": args.steps, "batch_size": args.batch_size}
    with PeakRSS() as rss:
        scores = eg.edge_scores(model, pairs, metric, method="eap-ig", steps=args.steps,
                                batch_size=args.batch_size, graph=graph, progress=True)
    out["eap_ig"] = rss.record()
    print(f"EAP-IG ({args.steps} steps, {len(pairs)} pairs, {graph.n_edges} edges): {out['eap_ig']}", flush=True)
    with PeakRSS() as rss:
        curve = eg.faithfulness_curve(model, pairs, metric, {"eap-ig": scores.mean}, random_seeds=args.random_seeds,
                                      batch_size=args.batch_size, graph=graph, progress=True)
    out["curve"] = rss.record()
    out["curve"]["n_circuits"] = int(len(curve))  # identical circuits (every 100 % one) run once
    out["cpr_cmd"] = eg.curve_summary(curve).set_index("method")[["cpr", "cmd"]].round(4).to_dict("index")
    print(f"faithfulness curve: {out['curve']}  CPR/CMD {out['cpr_cmd']}", flush=True)
    return out


def part_transformerlens(args, n_layers: int) -> dict:
    size = (dict(n_layers=4, d_model=128, n_heads=4, d_mlp=256, init_std=0.1) if args.quick else
            dict(n_layers=n_layers, d_model=896, n_heads=14, d_mlp=4864, vocab_size=151936, init_std=None))
    model = build_mha(**size)
    graph = eg.EdgeGraph.from_model(model)
    # TransformerLens's cost grows with edges x positions: compare on the shortest pairs
    pairs = sorted(load_pairs(model, 4 * args.tl_pairs, args.quick), key=lambda p: p.length)[:args.tl_pairs]
    metric = metric_for(model)
    out = {"model": {k: v for k, v in size.items()}, "graph": graph.counts(), "n_pairs": len(pairs),
           "tokens": [p.length for p in pairs]}
    with PeakRSS() as rss:
        ours = eg.edge_scores(model, pairs, metric, method="eap", batch_size=args.batch_size, graph=graph).mean
    out["eap_circuitlab"] = rss.record()
    theirs, out["eap_transformerlens"] = timed_tl(lambda: tl_edge_scores(model, pairs, metric), args.tl_timeout)
    out["eap_ratio"] = ratio(out["eap_transformerlens"], out["eap_circuitlab"])
    if theirs is not None:
        out["eap_max_abs_diff"] = float((ours - theirs).abs().nan_to_num().max())
    print(f"{size['n_layers']} layers, EAP scores: circuitlab {out['eap_circuitlab']}, TransformerLens "
          f"{out['eap_transformerlens']}, ratio {out['eap_ratio']}, max|diff| {out.get('eap_max_abs_diff')}", flush=True)
    circuit = eg.top_n(graph, ours, eg.n_for_fraction(graph, args.faith_fraction), pruned=False)
    pair = (pairs[0].harmful_ids, pairs[0].harmless_ids)
    with PeakRSS() as rss:
        f_ours = eg.faithfulness(model, [pair], metric, circuit, graph=graph)
    out["faith_circuitlab"] = rss.record()
    f_theirs, out["faith_transformerlens"] = timed_tl(lambda: tl_faithfulness(model, pair, metric, circuit),
                                                     args.tl_timeout)
    out["faith_ratio"] = ratio(out["faith_transformerlens"], out["faith_circuitlab"])
    out["faithfulness"] = {"circuitlab": f_ours, "transformerlens": f_theirs, "n_edges": int(circuit.sum()),
                           "abs_diff": None if f_theirs is None else abs(f_ours - f_theirs)}
    print(f"{size['n_layers']} layers, faithfulness (1 pair, {int(circuit.sum())} edges): circuitlab "
          f"{out['faith_circuitlab']}, TransformerLens {out['faith_transformerlens']}, ratio {out['faith_ratio']}, "
          f"f = {f_ours:.6f} vs {f_theirs}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few pairs (smoke run)")
    parser.add_argument("--n-pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--random-seeds", type=int, default=1, help="random circuits in the curve")
    parser.add_argument("--tl-pairs", type=int, default=1, help="pairs for the TransformerLens comparison")
    parser.add_argument("--faith-fraction", type=float, default=0.01, help="edge fraction of the compared circuit")
    parser.add_argument("--tl-layers", default="24",
                        help="comma-separated layer counts of the non-GQA comparison models (24 = embedded size; "
                             "TransformerLens's per-position edge loops make it slow: add a shallow one, e.g. 2,24)")
    parser.add_argument("--tl-timeout", type=float, default=600.0,
                        help="seconds each TransformerLens call may run before it is cut off (ratio: lower bound)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip", choices=["circuitlab", "transformerlens"], default=None)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON report (default {OUT}; --quick: not saved)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_pairs, args.tl_pairs, args.faith_fraction = min(args.n_pairs, 4), min(args.tl_pairs, 2), 0.1
    report = {"argv": sys.argv[1:], "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    if args.skip != "circuitlab":
        report["circuitlab"] = part_circuitlab(args)
    if args.skip != "transformerlens":
        layers = [4] if args.quick else [int(n) for n in str(args.tl_layers).split(",")]
        report["vs_transformerlens"] = [part_transformerlens(args, n) for n in layers]
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or (None if args.quick else OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
