"""diff-ranking and probing on the embedded model: AdvBench (train split) vs harmless prompts.

Usage: ``nice -n 10 python experiments/ranking_probing.py [N]`` (N prompts per set, default 64).
Both experiments read activations through one ActivationStore, so a rerun does no forward pass.
Writes results/ranking_probing/diff_ranking/ and results/ranking_probing/probing/ (tables, figures,
config.json) and results/ranking_probing/summary.txt (the headline numbers printed below).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import circuitlab as cl
from circuitlab.experiments import get

N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
OUT = Path(__file__).resolve().parent.parent / "results" / "ranking_probing"


def _top(table, component: str, k: int = 10) -> str:
    part = table[table.component == component].head(k)
    index = "neuron" if component == "neuron" else "head"
    lines = [f"top-{k} {component}s (rank, unit, Cohen's d, mean harmful, mean harmless, q):"]
    for row in part.itertuples(index=False):
        lines.append(f"  {row.rank:>2}  L{row.layer}{index[0].upper()}{getattr(row, index):<5} d={row.effect_size:+.3f}  "
                     f"{row.mean_harmful:.4f} vs {row.mean_harmless:.4f}  q={row.q_value:.2e}")
    return "\n".join(lines)


def main() -> None:
    t0 = time.time()
    model = cl.load_model("embedded")
    harmful = cl.datasets.load("advbench", split="train", n=N, seed=0)
    harmless = cl.datasets.load("harmless", split="train", n=N, seed=0)
    store = cl.ActivationStore()
    ranking = get("diff-ranking")(top_k=50, positions="last").run(model, harmful, harmless, store=store)
    ranking.save(OUT / "diff_ranking", overwrite=True)
    print(f"diff-ranking done ({time.time() - t0:.0f} s)", flush=True)
    probing = get("probing")(positions="post").run(model, harmful, harmless, store=store)
    probing.save(OUT / "probing", overwrite=True)
    s = probing.summary
    lines = [
        f"model {model.name}, {len(harmful)} AdvBench train vs {len(harmless)} harmless train prompts",
        f"best residual probe: layer {s['best_resid_layer']} position {s['best_resid_position']} "
        f"accuracy {s['best_resid_accuracy']} (control {s['best_resid_control_accuracy']}, "
        f"AUROC {s['best_resid_auroc']}); first layer with accuracy >= 0.9: {s['first_layer_accuracy_ge_0.9']}",
        f"best head probe: L{s['best_head_layer']}H{s['best_head']} accuracy {s['best_head_accuracy']} "
        f"(control {s['best_head_control_accuracy']})",
        f"ranking: {ranking.summary}",
        _top(ranking.table, "neuron"),
        _top(ranking.table, "head"),
        f"store: {store.stats()}; total {time.time() - t0:.0f} s",
    ]
    text = "\n".join(lines)
    (OUT / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
