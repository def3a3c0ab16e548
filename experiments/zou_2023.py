"""Reproduce Zou et al. 2023 ("Representation Engineering: A Top-Down Approach to AI Transparency") on
harmful vs harmless with the embedded model: LAT reading vectors per layer, their reading accuracy on
held-out prompts against the difference-in-means direction and a logistic probe, and representation
control (add / subtract the reading vector at one layer, strength sweep).

    nice -n 10 .venv/bin/python experiments/zou_2023.py       # ~20 min on a busy 2-core CPU

Harmful = AdvBench, harmless = the built-in harmless set; each is split 60/20/20 (``PromptSet.split``,
seed 0) and sampled to --n-train / --n-val / --n-test prompts per side. The sets are not matched
pairs, so LAT pairs train prompts at random (as RepE does for unpaired stimuli). Reading thresholds
come from train; the control layer is chosen on val among --control-layers; every reported number is
on test. Strength s adds ``s × (train class separation along v) × v`` at resid_pre of that layer at
every position (s < 0 subtracts). Writes results/zou_2023/ (no completions are saved).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from circuitlab import ActivationStore, load_model
from circuitlab.io import datasets
from circuitlab.io.results import check_output_dir
from circuitlab.experiments import add_set_option, get, set_overrides

# Zou et al. 2023 report LAT reading vectors reaching high accuracy in middle layers and control by
# adding/subtracting them (their Fig. 4 / §4-§6, LLaMA-2-Chat); no single number is re-derived here.
PAPER = {"models": "LLaMA-2-Chat 7B/13B", "method": "LAT (PCA of paired differences), rep_token=-1"}


def _numbers(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--control-layers", type=_numbers(int), default=[6, 8, 10, 12, 14, 16])
    ap.add_argument("--strengths", type=_numbers(float), default=[-2.0, -1.0, 0.0, 1.0, 2.0])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--n-text", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/zou_2023")
    add_set_option(ap)
    args = ap.parse_args(argv)
    overrides = set_overrides(ap, "representation-reading", args.set)
    check_output_dir(args.out, overwrite=True)  # a folder we may not write fails now, not after the run
    start = time.time()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    print(f"[{time.time() - start:.0f}s] model loaded; load average {os.getloadavg()}", flush=True)
    harmful, harmless = datasets.load("advbench"), datasets.load("harmless")
    control_layers = [l for l in args.control_layers if l < model.n_layers] or None
    exp = get("representation-reading")(**{**dict(
        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, control_layers=control_layers,
        strengths=args.strengths, max_new_tokens=args.max_new_tokens, n_text=args.n_text, seed=args.seed), **overrides})
    result = exp.run(model, harmful, harmless, store=ActivationStore())
    result.summary.update(paper=PAPER, seconds=round(time.time() - start), load_average_end=list(os.getloadavg()))
    result.config["script"] = {"command": " ".join(["experiments/zou_2023.py"] + (sys.argv[1:] if argv is None
                                                                                  else list(argv))),
                               "argv": vars(args)}
    result.save(args.out, overwrite=True)
    test = result.table[result.table.split == "test"].pivot_table(index="layer", columns="reader", values="accuracy")
    print(test.round(3).to_string())
    if "control" in result.tables:
        cols = ["strength", "refusal_rate", "over_refusal_rate", "kl_harmless", "cross_entropy"]
        control = result.tables["control"]
        print(control[[c for c in cols if c in control]].to_string(index=False))
    print(json.dumps(result.summary, indent=1, default=str))


if __name__ == "__main__":
    main()
