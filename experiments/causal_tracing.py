"""Causal tracing of refusal on the embedded model (Meng et al. 2022-style layer × position heatmap).

Exact activation patching (``activation-patching``, fast engine) of equal-length AdvBench (train)
/ harmless prompt pairs: resid_pre, attn_out and mlp_out per layer and position, and every head
over all positions. Denoising by default: run the harmless prompt, patch in the harmful prompt's
activation, read the refusal score; normalized 0 = harmless run, 1 = harmful run.
Writes results/activation_patching/ (tables, heatmaps, config.json with the summary).

    nice -n 10 .venv/bin/python experiments/causal_tracing.py --n-pairs 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import add_set_option, get, set_overrides
from circuitlab.io.results import check_output_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-pairs", type=int, default=8)
    ap.add_argument("--n", "--n-prompts", dest="n", type=int, default=64, help="prompts per set to pair from")
    ap.add_argument("--mode", default="denoise", choices=["denoise", "noise"])
    ap.add_argument("--positions", default="all", choices=["all", "post", "last"])
    ap.add_argument("--components", default="resid_pre,attn_out,mlp_out,head")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "activation_patching"))
    add_set_option(ap)
    args = ap.parse_args(argv)
    overrides = set_overrides(ap, "activation-patching", args.set)
    check_output_dir(args.out, overwrite=True)  # a folder we may not write fails now, not after the run

    t0 = time.time()
    model = cl.load_model("embedded")
    harmful = cl.datasets.load("advbench", split="train", n=args.n, seed=0)
    harmless = cl.datasets.load("harmless", split="train", n=args.n, seed=0)
    exp = get("activation-patching")(**{**dict(
        components=args.components.split(","), mode=args.mode, positions=args.positions, n_pairs=args.n_pairs), **overrides})
    result = exp.run(model, harmful, harmless)
    result.summary["wall_s"] = round(time.time() - t0, 1)
    out = result.save(args.out, overwrite=True)
    print(f"saved {out} ({time.time() - t0:.0f} s)")
    avg = result.tables["average"]
    for comp in ("resid_pre", "attn_out", "mlp_out", "head"):
        sub = avg[avg.component == comp].sort_values("normalized_mean", key=abs, ascending=False).head(5)
        cols = [c for c in ("layer", "head", "position", "normalized_mean", "normalized_sem") if c in sub]
        print(f"\n{comp}: strongest patches\n{sub[cols].to_string(index=False)}")
    for key, value in result.summary.items():
        if key != "top":
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
