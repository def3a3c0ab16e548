"""Benchmark: TransformerLens activation patching vs circuitlab's exact engine vs attribution patching.

One process, one model, one harmful/harmless pair of equal token length (30-40 tokens by default):

1. side by side on the SAME resid_pre cells (all, or ``--baseline-sample N`` random ones):
   TransformerLens ``generic_activation_patch`` (what ``get_act_patch_resid_pre`` runs) and circuitlab's
   exact engine, timed back to back in alternation (``--rounds``), best of each, with the wall-time
   ratio, the FLOP ratio, the max |difference| over exactly those cells and the load average;
2. circuitlab exact engine (``fast=True``) on the whole grid for resid_pre / attn_out / mlp_out / heads
   (TransformerLens times for these are ESTIMATES: its measured cost per patched run × the runs);
3. circuitlab attribution patching (AtP) for all of them at once.

Prints and saves wall time, ratio to the baseline, max |difference| to the baseline, model-FLOP
utilisation (FLOPs counted with ``torch.utils.flop_counter`` / measured fp32 matmul peak of this
run), peak RSS during each phase, and AtP's Pearson / Spearman / top-k agreement with exact patching.

    nice -n 10 .venv/bin/python bench/patching.py                      # full grid (slow baseline)
    .venv/bin/python bench/patching.py --layers 0,12,23 --positions 8  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitlab.io.provenance import matmul_peak
from circuitlab.io import datasets
from circuitlab import load_model  # noqa: E402
from circuitlab.core import hooks as hk  # noqa: E402
from circuitlab.experiments.patching.activation import layer_sweeps, refusal_metric  # noqa: E402
from circuitlab.experiments.patching.attribution import attribution_pair  # noqa: E402
from circuitlab.methods.patching import Sweep, run_sweeps  # noqa: E402
from circuitlab.methods.pairs import make_pairs  # noqa: E402


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
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(fn, count_flops=False):
    with PeakRSS() as rss:
        t = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            fn()
        flops = counter.get_total_flops()
    return out, wall, rss.peak, flops


def pick_pair(model, lo: int, hi: int, seed: int):
    harmful = datasets.load("advbench", split="train", n=64, seed=seed)
    harmless = datasets.load("harmless", split="train", n=64, seed=seed)
    for pair in make_pairs(model, harmful, harmless):
        if lo <= pair.length <= hi:
            return pair
    raise SystemExit(f"no equal-length pair with {lo}..{hi} tokens among 64 + 64 prompts")


def agreement(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> dict:
    order_e, order_a = np.argsort(-np.abs(exact)), np.argsort(-np.abs(approx))
    k = min(k, len(exact))
    return {"pearson": float(stats.pearsonr(exact, approx)[0]) if exact.std() and approx.std() else np.nan,
            "spearman": float(stats.spearmanr(exact, approx)[0]) if exact.std() and approx.std() else np.nan,
            f"top{k}_overlap": len(set(order_e[:k]) & set(order_a[:k])) / k, "n": len(exact)}


def side_by_side(model, clean, corrupted, metric, layers, positions, args, flops_per_forward) -> dict:
    """TransformerLens ``generic_activation_patch`` and the engine on the SAME resid_pre cells, timed
    back to back in alternation (``--rounds``), best of each; agreement over exactly those cells."""
    from transformer_lens import patching as tlp

    cells = [(l, p) for l in layers for p in positions]
    if args.baseline_sample and args.baseline_sample < len(cells):
        rng = np.random.default_rng(args.seed)
        cells = [cells[i] for i in sorted(rng.choice(len(cells), args.baseline_sample, replace=False).tolist())]
    _, cache = model.bridge.run_with_cache(clean[None])
    index = pd.DataFrame(cells, columns=["layer", "pos"])
    tl_metric = lambda logits: metric(logits[:, -1].float()).mean()  # noqa: E731
    sweep = Sweep("resid_pre", [(l, p, None) for l, p in cells], lambda c: hk.resid_pre(c[0]))
    tl_fn = lambda: tlp.generic_activation_patch(  # noqa: E731
        model.bridge, corrupted[None], cache, tl_metric, patch_setter=tlp.layer_pos_patch_setter,
        activation_name="resid_pre", index_df=index)
    engine_fn = lambda: run_sweeps(model, corrupted, clean, [sweep], metric, batch_size=args.batch_size)[0]  # noqa: E731
    load_start, tl_times, engine_times = os.getloadavg(), [], []
    with torch.no_grad():
        for _ in range(args.rounds):
            tl_out, wall, tl_rss, _ = timed(tl_fn)
            tl_times.append(wall)
            engine_rows, wall, engine_rss, _ = timed(engine_fn)
            engine_times.append(wall)
        with FlopCounterMode(display=False) as counter:
            engine_fn()
    tl_values = tl_out.cpu().reshape(-1).numpy()
    engine_values = np.array([r["metric"] for r in engine_rows])
    tl_flops = flops_per_forward * len(cells)  # every TL cell is one full forward
    return {"method": "side_by_side_resid_pre", "component": "resid_pre", "cells": len(cells),
            "grid_cells": len(layers) * len(positions), "rounds": args.rounds,
            "tl_best_s": min(tl_times), "engine_best_s": min(engine_times),
            "wall_ratio": min(tl_times) / min(engine_times), "tl_flops": tl_flops,
            "engine_flops": counter.get_total_flops(), "flop_ratio": tl_flops / max(counter.get_total_flops(), 1),
            "max_abs_diff": float(np.abs(tl_values - engine_values).max()),
            "skipped_cells": int(sum(r["skipped"] for r in engine_rows)),
            "load_average_start": load_start[0], "load_average_end": os.getloadavg()[0],
            "tl_peak_rss_mb": tl_rss / 2 ** 20, "engine_peak_rss_mb": engine_rss / 2 ** 20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--positions", default="all", help="'all' or N = the last N positions")
    ap.add_argument("--length", default="30,40", help="token-length range of the pair")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline-sample", type=int, default=0,
                    help="compare both tools on N random resid_pre cells only (0: every cell of the grid)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating TL/engine timings; the best of each is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    peak = matmul_peak()
    model = load_model(args.model)
    lo, hi = map(int, args.length.split(","))
    pair = pick_pair(model, lo, hi, args.seed)
    T = pair.length
    layers = list(range(model.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    positions = list(range(T)) if args.positions == "all" else list(range(T - int(args.positions), T))
    clean, corrupted = pair.harmful_ids, pair.harmless_ids  # denoising: run harmless, patch harmful
    metric = refusal_metric(model)
    print(f"model={args.model} T={T} layers={len(layers)} positions={len(positions)} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s, threads={torch.get_num_threads()}", flush=True)

    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model.forward(corrupted[None])
    flops_per_forward = c.get_total_flops()
    n_cells = len(layers) * len(positions)
    rows, grids = [], {}

    side = None
    if not args.skip_baseline:
        side = side_by_side(model, clean, corrupted, metric, layers, positions, args, flops_per_forward)
        rows.append(side)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in side.items()}, flush=True)

    for comp in ("resid_pre", "attn_out", "mlp_out", "head"):
        sweeps = layer_sweeps(model, [comp], layers, positions)
        res, wall, rss, flops = timed(lambda: run_sweeps(model, corrupted, clean, sweeps, metric,
                                                         batch_size=args.batch_size)[0],
                                      count_flops=comp == "resid_pre")
        values = np.array([r["metric"] for r in res])
        grids[comp] = values
        n = len(values)
        row = {"method": "circuitlab_exact", "component": comp, "runs": n, "wall_s": wall,
               "skipped": int(sum(r["skipped"] for r in res)), "flops": flops,
               "mfu": flops / wall / peak if flops else None,
               "peak_rss_mb": rss / 2 ** 20}
        if side is not None:  # an ESTIMATE: TransformerLens's measured cost per patched run × this grid's runs
            row["baseline_estimated_s"] = side["tl_best_s"] / side["cells"] * n
            row["speedup_estimated"] = row["baseline_estimated_s"] / wall
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    comps = ["resid_pre", "attn_out", "mlp_out", "head"]
    (atp_rows, t_metric, _), wall, rss, flops = timed(
        lambda: attribution_pair(model, corrupted, clean, comps, layers, metric), count_flops=True)
    atp = pd.DataFrame(atp_rows)
    row = {"method": "circuitlab_atp", "component": "all", "runs": 3, "wall_s": wall, "flops": flops,
           "mfu": flops / wall / peak, "peak_rss_mb": rss / 2 ** 20}
    if side is not None:
        row["baseline_estimated_s"] = side["tl_best_s"] / side["cells"] * n_cells
        row["fraction_of_baseline_estimated"] = wall / row["baseline_estimated_s"]
    rows.append(row)
    agree = []
    pos_offsets = [p - T for p in positions]
    for comp in comps:
        sub = atp[atp.component == comp]
        if comp != "head":
            sub = sub[sub.position.isin(pos_offsets)]
        est = t_metric + sub.attribution.to_numpy()
        agree.append({"component": comp, **agreement(grids[comp] - t_metric, est - t_metric)})
    timing, agreement_df = pd.DataFrame(rows), pd.DataFrame(agree)
    print(timing.to_string(index=False))
    print(agreement_df.to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "full" if args.layers == "all" and args.positions == "all" else "small"
    timing.to_csv(out / f"patching_{args.model}_{tag}.csv", index=False)
    agreement_df.to_csv(out / f"patching_{args.model}_{tag}_atp_agreement.csv", index=False)
    (out / f"patching_{args.model}_{tag}_machine.json").write_text(json.dumps({
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(model.device),
        "matmul_peak_gflops": peak / 1e9, "pair_tokens": T, "layers": layers, "n_positions": len(positions),
        "flops_per_forward": flops_per_forward, "load_average": os.getloadavg(), "argv": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
