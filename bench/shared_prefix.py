"""Activations with the batch's shared chat-template prefix run once, against every row run whole.

    .venv/bin/python bench/shared_prefix.py [--n 16] [--reps 2]

``run_with_cache`` at the post-instruction positions of ``n`` embedded-model chat prompts (half AdvBench, half
harmless, train split), every layer's ``resid_pre``, ``mlp_post`` and ``attn_z`` (what the circuit map's probe
caches), once with the shared prefix (the default) and once with ``share_prefix=False``, alternated ``reps``
times in one process. Records the best wall time of each, the tokens per batch and the shared prefix, the
largest relative difference of any hook's activations, the matmul peak and the load average.
Writes ``results/bench/shared_prefix.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.core import hooks as hk
from circuitlab.core.generation import common_prefix_length
from circuitlab.io.provenance import git_state, matmul_peak

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="prompts (half harmful, half harmless), one batch")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "shared_prefix.json")
    args = ap.parse_args(argv)
    record = {"git": git_state(), "matmul_peak_gflops": round(matmul_peak() / 1e9, 1), "load_start": os.getloadavg()}
    model = cl.load_model("embedded")
    prompts = [p for name in ("advbench", "harmless")
               for p in cl.datasets.load(name, split="train", n=args.n // 2, seed=0)]
    names = [f(layer) for layer in range(model.n_layers) for f in (hk.resid_pre, hk.mlp_post, hk.attn_z)]
    seconds, out = {"shared": [], "whole": []}, {}
    for _ in range(args.reps):
        for kind in seconds:
            t = time.perf_counter()
            out[kind] = model.run_with_cache(prompts, names, "post", batch_size=len(prompts),
                                             share_prefix=kind == "shared")
            seconds[kind].append(time.perf_counter() - t)
    _, ids, mask = next(iter(model.batches(prompts, len(prompts), True)))
    record.update(
        n_prompts=len(prompts), n_hooks=len(names), batch_tokens=int(ids.shape[1]),
        shared_prefix_tokens=common_prefix_length(ids, mask, keep=model.n_post),
        seconds_shared=round(min(seconds["shared"]), 2), seconds_whole=round(min(seconds["whole"]), 2),
        speedup=round(min(seconds["whole"]) / min(seconds["shared"]), 2),
        max_relative_difference=max(((out["shared"][n] - out["whole"][n]).norm() / out["whole"][n].norm()).item()
                                    for n in names),
        load_end=os.getloadavg(), matmul_peak_gflops_end=round(matmul_peak() / 1e9, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
