"""Defences on the embedded model: safety monitor + targeted fine-tuning (hardening). Writes results/defence/.

Usage: ``python experiments/defence.py [N]`` (N prompts per class, default 100; subsampled from the
AdvBench and harmless sets with seed 0, then split 60/20/20 train/val/test).

1. ``monitor``: request monitor (probe at the best of layers 2,4,…,16; threshold for 1 % FPR on the
   harmless validation split) on held-out AdvBench vs harmless and on 50 JailbreakBench behaviours;
   integrity monitor on the top-16 neurons + top-4 heads of a diff-ranking, every tampering × strength
   and the benign changes (incl. a re-load of the model).
2. ``targeted-finetune``: the hardening demo — training on up to 16 harmful train prompts the model
   answers, targets = short refusals written by the project; located vs random vs full fine-tuning,
   8 steps each, batch 4 (CPU budget: few steps, short sequences; the numbers are a demo, not a sweep).

No completions are saved: only scores, judgments and drifts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
OUT = Path(__file__).resolve().parent.parent / "results" / "defence"

MONITOR = dict(method="probe", layers=list(range(2, 17, 2)), fpr=0.01, ood="jbb", n_ood=50, n_neurons=16, n_heads=4,
               n_canary=8, finetune_texts=8, reload=True, n_overhead=16)
FINETUNE = dict(n_neurons=16, n_heads=4, steps=8, lr=1e-3, full_lr=1e-5, batch_size=4, n_train=16, n_eval=16,
                n_text=8, judge=True, max_new_tokens=16, n_attack=24)


def main() -> None:
    t0 = time.time()
    model = cl.load_model("embedded")
    print(f"loaded {model} in {time.time() - t0:.1f} s", flush=True)
    harmful = cl.datasets.load("advbench", n=N, seed=0)
    harmless = cl.datasets.load("harmless", n=N, seed=0)
    store = cl.ActivationStore()
    timings, summaries = {}, {}
    for name, params, sub in (("monitor", MONITOR, "monitor"), ("targeted-finetune", FINETUNE, "finetune")):
        start = time.time()
        result = get(name)(**params).run(model, harmful, harmless, store=store)
        timings[name] = round(time.time() - start, 1)
        result.save(OUT / sub)
        summaries[name] = result.summary
        print(f"\n{name}: {timings[name]} s", flush=True)
        for key, value in result.summary.items():
            print(f"  {key}: {value}", flush=True)
        for table_name, table in result.tables.items():
            print(f"\n[{table_name}]\n{table.drop(columns=['components'], errors='ignore').to_string(max_cols=14)}")
    config = {"script": "experiments/defence.py", "n_per_class": N, "monitor": MONITOR, "targeted-finetune": FINETUNE,
              "model": {"id": model.name, "fingerprint": model.fingerprint},
              "datasets": {"harmful": {"name": harmful.name, "hash": harmful.hash},
                           "harmless": {"name": harmless.name, "hash": harmless.hash}},
              "seconds": timings, "total_seconds": round(time.time() - t0, 1), "summaries": summaries,
              "machine": "2-core CPU shared with other jobs (timings include contention)"}
    (OUT / "config.json").write_text(json.dumps(config, indent=2, default=str))
    print(f"\nsaved {OUT} ({time.time() - t0:.0f} s total)")


if __name__ == "__main__":
    main()
