"""Refusal metric check on the embedded model (issue 2): logit score vs generation judge.

Runs refusal-scores on 32 AdvBench vs 32 harmless prompts (train split): logit refusal score
per prompt, the generation judge's verdict, and their agreement. Writes results/refusal_scores/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get

N = int(sys.argv[1]) if len(sys.argv) > 1 else 32


def main() -> None:
    t0 = time.time()
    model = cl.load_model("embedded")
    print(f"loaded {model} in {time.time() - t0:.1f} s")
    harmful = cl.datasets.load("advbench", split="train", n=N, seed=0)
    harmless = cl.datasets.load("harmless", split="train", n=N, seed=0)
    result = get("refusal-scores")().run(model, harmful, harmless)
    out = result.save(Path(__file__).resolve().parent.parent / "results" / "refusal_scores")
    print(f"\nsaved {out} ({time.time() - t0:.0f} s)")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
