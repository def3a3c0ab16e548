"""Reproduce Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single Direction",
Fig. 1) on the embedded model: refusal rate baseline vs directional ablation on harmful prompts and
baseline vs activation addition on harmless prompts, the candidate heatmap, a second harmful set
(JailbreakBench) the direction was not selected on, and an exported orthogonalized model.

    .venv/bin/python experiments/arditi_2024.py            # ~27 min on an idle 2-core CPU

Train and val keep only refused harmful / answered harmless prompts, as in the reference code, judged
by greedy generation (``--filter-by judge``; ``score``: refusal score > 0 / < 0); a split side with
fewer than 24 survivors is used whole (kept counts and ``filter_fallback`` in the summary and in
filter.csv). The selection sees train and val only. Every candidate (all layers outside the pruned
last 20%, every post-instruction position; ``--layers 9,12,15`` subsamples) is screened on 8 val
prompts per side, the best Pareto fronts (12 candidates) are scored on every val prompt, and the
paper's rule picks one (``--kl-budget X``: the lowest val bypass score with val KL <= X instead).
Generation judges use ``--max-new-tokens`` tokens; the attribution table uses 32 test prompts per
side; the exported, reloaded orthogonalized model is checked on 16 test prompts. All said in
config.json. Writes results/arditi_2024/ (and direction.pt, the selected direction). No completions
are saved; the exported weights go to a temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from circuitlab import ActivationStore, load_model
from circuitlab.io import datasets
from circuitlab.methods import metrics
from circuitlab.methods import interventions as iv
from circuitlab.methods.direction_eval import evaluate_direction
from circuitlab.experiments import add_set_option, set_overrides
from circuitlab.experiments.direction import RefusalDirection, split_three
from circuitlab.io.results import check_output_dir

# Numbers quoted by issue 4 for Arditi et al.'s Qwen-1.8B-chat (not re-derived here).
PAPER = {"model": "Qwen-1.8B-chat", "compliance_baseline": 0.30, "compliance_ablation": 0.99}
JUDGED = ["baseline:harmful", "ablation:harmful", "orthogonalized:harmful", "baseline:harmless",
          "addition:harmless"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=96)
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--n-jbb", type=int, default=64)
    ap.add_argument("--layers", default="", help="comma-separated candidate layers (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--kl-threshold", type=float, default=0.1, help="selection filter (paper: 0.1)")
    ap.add_argument("--kl-budget", type=float, default=None,
                    help="select the lowest val bypass score with val KL <= this (Pareto front) instead of the paper rule")
    ap.add_argument("--filter-by", choices=("judge", "score"), default="judge", help="train/val refusal filter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/arditi_2024")
    add_set_option(ap)
    args = ap.parse_args(argv)
    overrides = set_overrides(ap, "refusal-direction", args.set)
    check_output_dir(args.out, overwrite=True)  # a folder we may not write fails now, not after the run
    start = time.time()
    model = load_model("embedded")
    store = ActivationStore()
    n = args.n_train + args.n_val + args.n_test
    harmful = datasets.load("advbench").sample(n, seed=args.seed)
    harmless = datasets.load("harmless").sample(n, seed=args.seed)
    exp = RefusalDirection(**{**dict(
        train_frac=args.n_train / n, val_frac=args.n_val / n,
        layers=[int(x) for x in args.layers.split(",")] if args.layers else None, judge_only=JUDGED,
        component_prompts=32, kl_threshold=args.kl_threshold, kl_budget=args.kl_budget, filter_by=args.filter_by,
        max_new_tokens=args.max_new_tokens, n_text=16, seed=args.seed), **overrides})
    sizes = [len(p) for p in split_three(harmful, exp.train_frac, exp.val_frac, args.seed)]
    print(f"split sizes (train/val/test) per side: {sizes}", flush=True)
    result = exp.run(model, harmful, harmless, store=store)
    print(f"[{time.time() - start:.0f}s] selected layer {exp.layer_}, position {exp.position_} "
          f"({result.summary['fallback_step']}; val {result.summary['n_val_harmful']}+"
          f"{result.summary['n_val_harmless']} prompts; filter fallback: {result.summary['filter_fallback']})", flush=True)

    jbb = datasets.load("jbb").sample(args.n_jbb, seed=args.seed)
    jbb_eval = evaluate_direction(model, exp.direction_, exp.layer_, list(jbb), [], None,
                                  conditions=("baseline", "ablation"), max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, progress=True)
    evaluation = result.tables["evaluation"].assign(
        dataset=lambda t: np.where(t.split == "harmful", "advbench", "harmless"))
    evaluation = pd.concat([evaluation, jbb_eval.assign(dataset="jbb")], ignore_index=True)
    result.tables["evaluation"] = evaluation
    print(f"[{time.time() - start:.0f}s] jbb done", flush=True)

    export = check_export(model, exp.direction_, list(split_three(harmful, exp.train_frac, exp.val_frac,
                                                                   args.seed)[2])[:16], args.max_new_tokens)
    print(f"[{time.time() - start:.0f}s] export check: {export}", flush=True)
    result.summary.update({f"jbb_{r.condition}_refusal_rate": round(r.refusal_rate, 4)
                           for r in jbb_eval.itertuples()})
    result.summary.update(export=export, paper=PAPER, seconds=round(time.time() - start))
    result.config["script"] = {"argv": vars(args), "judged_rows": JUDGED, "split_sizes": sizes,
                               "subsampling": f"candidates scored at layers {args.layers or 'all'}, all post "
                                              "positions, on --n-val prompts per side"}
    result.figures["refusal_rates"] = main_figure(evaluation)
    # 896 floats: lets anyone re-apply this exact direction without rerunning the search
    buffer = io.BytesIO()
    torch.save({"direction": exp.direction_, "layer": exp.layer_, "position": exp.position_}, buffer)
    result.files["direction.pt"] = buffer.getvalue()
    result.save(args.out, overwrite=True)
    print(json.dumps(result.summary, indent=1))


def check_export(model, direction, harmful_test, max_new_tokens) -> dict:
    """Export the orthogonalized model to a temp dir, reload it, and check it refuses less."""
    base_scores = metrics.refusal_score(model, harmful_test)
    hooked = model.last_logits(harmful_test, fwd_hooks=iv.directional_ablation_hooks(model, direction))
    base_judged = metrics.judge_refusals(model, harmful_test, max_new_tokens=max_new_tokens, batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        with iv.orthogonalized(model, direction):
            iv.export_hf(model, Path(tmp) / "orthogonalized")
        reloaded = load_model(str(Path(tmp) / "orthogonalized"))
        logits = reloaded.last_logits(harmful_test)
        judged = metrics.judge_refusals(reloaded, harmful_test, max_new_tokens=max_new_tokens, batch_size=32)
        token_ids = metrics.refusal_tokens(model)
        out = {"n": len(harmful_test),
               "max_abs_logit_diff_vs_hooks": float((logits - hooked).abs().max()),
               "refusal_score_baseline": float(base_scores.mean()),
               "refusal_score_reloaded": float(metrics.refusal_score_from_logits(logits, token_ids).mean()),
               "refusal_rate_baseline": float(np.mean(base_judged)), "refusal_rate_reloaded": float(np.mean(judged))}
        del reloaded
        gc.collect()
    return out


def main_figure(evaluation: pd.DataFrame):
    """Fig. 1 of the paper: refusal rate (95% CI) for each intervention, per prompt set."""
    import matplotlib.pyplot as plt

    picks = [("advbench", "baseline"), ("advbench", "ablation"), ("advbench", "orthogonalized"),
             ("jbb", "baseline"), ("jbb", "ablation"),
             ("harmless", "baseline"), ("harmless", "addition")]
    ev = evaluation.set_index(["dataset", "condition"])
    picks = [p for p in picks if p in ev.index and not np.isnan(ev.loc[p, "refusal_rate"])]
    rate = np.array([ev.loc[p, "refusal_rate"] for p in picks])
    err = np.array([[ev.loc[p, "refusal_rate"] - ev.loc[p, "refusal_rate_ci_low"],
                     ev.loc[p, "refusal_rate_ci_high"] - ev.loc[p, "refusal_rate"]] for p in picks]).T.clip(min=0)
    colors = ["tab:gray" if c == "baseline" else ("tab:orange" if d == "harmless" else "tab:blue") for d, c in picks]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(range(len(picks)), rate, yerr=err, color=colors, capsize=4)
    for i, r in enumerate(rate):
        ax.text(i, r + 0.03, f"{r:.0%}", ha="center", fontsize=8)
    ax.set_xticks(range(len(picks)), [f"{d}\n{c}" for d, c in picks], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("refusal rate (judge, 95% CI)")
    ax.set_title("Refusal direction on the embedded model (test prompts)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
