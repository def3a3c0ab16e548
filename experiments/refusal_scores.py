"""Refusal metric check on the embedded model: logit score vs generation judge, and which tokens score refusal.

The refusal tokens are calibrated from the model's own refusals on train-split prompts
(``metrics.calibrate_refusal_tokens``, cached per weight fingerprint); this script measures them on
N AdvBench vs N harmless VALIDATION prompts (never used for calibration): the refusal-scores
experiment (logit score per prompt, the judge's verdict, their agreement) plus the harmful-vs-harmless
AUROC of alternative token sets (the paper's {I, As}, {I}) for comparison. Writes results/refusal_scores/.

Usage: python experiments/refusal_scores.py [N]   (default 48)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

import circuitlab as cl
from circuitlab.methods import metrics
from circuitlab.experiments import get

N = int(sys.argv[1]) if len(sys.argv) > 1 else 48
OUT = Path(__file__).resolve().parent.parent / "results" / "refusal_scores"


def main() -> None:
    t0 = time.time()
    model = cl.load_model("embedded")
    record = metrics.refusal_token_record(model)
    print(f"loaded {model} in {time.time() - t0:.1f} s; refusal tokens {record['tokens']} ({record['source']})")
    harmful = cl.datasets.load("advbench", split="val", n=N, seed=1)
    harmless = cl.datasets.load("harmless", split="val", n=N, seed=1)
    result = get("refusal-scores")().run(model, harmful, harmless)
    labels = [1] * len(harmful) + [0] * len(harmless)
    judged = result.table.judged_refusal.astype(bool).to_numpy()
    rows = []
    for label, strings in (("calibrated", None), ("{I}", ["I"]), ("{I, As}", ["I", "As"])):
        logits_scores = metrics.refusal_score(model, list(harmful) + list(harmless), token_strings=strings).numpy()
        rows.append({"token_set": label, "tokens": " ".join(model.tokenizer.convert_ids_to_tokens(
            metrics.refusal_tokens(model, strings))), "auroc_harmful_vs_harmless": roc_auc_score(labels, logits_scores),
            "auroc_vs_judge": roc_auc_score(judged, logits_scores)})
    result.tables["token_sets"] = pd.DataFrame(rows)
    out = result.save(OUT, overwrite=True)
    print(f"\nsaved {out} ({time.time() - t0:.0f} s)")
    print(result.tables["token_sets"].to_string(index=False))
    for key, value in result.summary.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
