"""How much refusal can one direction remove, and at what side-effect cost? (beyond Arditi et al. 2024)

Takes the candidates table of ``experiments/arditi_2024.py`` (run that first), rebuilds the same
directions (same prompts, split, filter and seed, from its config.json; checked against the table's
direction norms), and evaluates on the TEST split the selected direction and the ``--top``
candidates with the lowest validation bypass score, whatever their KL: judged refusal rate on
harmful prompts after ablation (95% CI), refusal score, KL on harmless next-token distributions,
cross-entropy on plain text.

POST HOC: only the selected direction was chosen before any test number was seen (on validation
prompts; arditi_2024.py's ``--kl-budget`` is the way to trade bypass for KL up front). The other
rows are test numbers of candidates picked for comparison; choosing one of them after reading this
table would select on the test split. They carry ``post_hoc=True`` and the output says so.

    .venv/bin/python experiments/arditi_2024_tradeoff.py     # ~10 min on an idle 2-core CPU

Writes results/arditi_2024_tradeoff/ (table + figure). No completions are saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pandas as pd
import torch

from circuitlab import ActivationStore, load_model
from circuitlab.io import datasets
from circuitlab.methods.direction_eval import evaluate_direction
from circuitlab.experiments.direction import RefusalDirection, split_three
from circuitlab.io.results import Result, check_output_dir, run_config

POST_HOC_NOTE = ("rows with post_hoc=True are test numbers of candidates NOT selected on validation; they "
                 "describe the trade-off, and picking one of them now would be selection on the test split")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="results/arditi_2024", help="output folder of arditi_2024.py")
    ap.add_argument("--top", type=int, default=6, help="lowest-bypass candidates to evaluate besides the selected one")
    ap.add_argument("--out", default="results/arditi_2024_tradeoff")
    args = ap.parse_args(argv)
    check_output_dir(args.out, overwrite=True)  # a folder we may not write fails now, not after the run
    start = time.time()
    source = json.load(open(f"{args.source}/config.json"))
    run = source["script"]["argv"]
    candidates = pd.read_csv(f"{args.source}/candidates.csv")
    scored = candidates[candidates.bypass_score.notna() & ~candidates.excluded]
    picks = pd.concat([scored[scored.selected], scored.nsmallest(args.top, "bypass_score")]).drop_duplicates(
        ["layer", "position"])

    model = load_model("embedded")
    store = ActivationStore()
    n = run["n_train"] + run["n_val"] + run["n_test"]
    harmful = datasets.load("advbench").sample(n, seed=run["seed"])
    harmless = datasets.load("harmless").sample(n, seed=run["seed"])
    fields = {f.name for f in dataclasses.fields(RefusalDirection) if f.init}
    exp = RefusalDirection(**{k: v for k, v in source["parameters"].items() if k in fields} | {"progress": False})
    h_train, _, h_test = split_three(harmful, exp.train_frac, exp.val_frac, run["seed"])
    s_train, _, s_test = split_three(harmless, exp.train_frac, exp.val_frac, run["seed"])
    if exp.filter_train:
        h_train, s_train, _ = exp.filter_refused(model, h_train, s_train, "train")
    directions = exp.candidate_directions(model, h_train, s_train, store)
    plain = list(datasets.load("plaintext", n=16, seed=run["seed"] + 1))

    h_test, s_test = list(h_test), list(s_test)
    evaluate = dict(plaintext=plain, max_new_tokens=run["max_new_tokens"], batch_size=16)
    selected = picks.iloc[0]  # the baseline ignores the direction, but the call needs a valid one
    baseline = evaluate_direction(model, directions[(int(selected.layer), int(selected.position))],
                                  int(selected.layer), h_test, s_test, conditions=["baseline"],
                                  judge_only=["baseline:harmful"], **evaluate)
    base_harmless = model.last_logits(s_test, batch_size=16)
    rows = [harmful_row(baseline) | {"layer": None, "position": None, "candidate": "baseline", "post_hoc": False}]
    for c in picks.itertuples():
        d = directions[(int(c.layer), int(c.position))]
        if not np.isclose(float(d.norm()), c.direction_norm, rtol=1e-4):
            raise RuntimeError(f"direction {c.layer}/{c.position} differs from {args.source} "
                               f"(norm {float(d.norm()):.4f} vs {c.direction_norm:.4f}): rerun arditi_2024.py first")
        ablated = evaluate_direction(model, d, int(c.layer), h_test, s_test, conditions=["ablation"],
                                     judge_only=["ablation:harmful"], base_harmless=base_harmless, **evaluate)
        row = harmful_row(ablated)
        rows.append(row | {"layer": int(c.layer), "position": int(c.position),
                           "candidate": "selected" if c.selected else "lowest val bypass",
                           "post_hoc": not c.selected,  # test numbers of a candidate not chosen on val
                           "val_bypass_score": c.bypass_score, "val_kl": c.kl})
        print(f"[{time.time() - start:.0f}s] {c.layer}/{c.position}: {row}", flush=True)
    table = pd.DataFrame(rows)
    table.insert(0, "component", "direction")
    table[["layer", "position"]] = table[["layer", "position"]].astype("Int64")  # baseline row: no direction
    config = run_config("arditi-2024-tradeoff", {"source": args.source, "top": args.top, "source_argv": run},
                        model, {"harmful": harmful, "harmless": harmless}, seed=run["seed"])
    summary = {"seconds": round(time.time() - start), "post_hoc_note": POST_HOC_NOTE}
    Result(table, config, figures={"tradeoff_test": figure(table)}, summary=summary).save(args.out, overwrite=True)
    print(table.round(3).to_string())
    print(f"NOTE: {POST_HOC_NOTE}")


def harmful_row(evaluation: pd.DataFrame) -> dict:
    """The harmful-split row of ``evaluate_direction``: judged refusal, score, and the condition's side effects."""
    row = evaluation[evaluation.split == "harmful"].iloc[0]
    return {k: float(row[k]) for k in ("refusal_rate", "refusal_rate_ci_low", "refusal_rate_ci_high",
                                       "refusal_score", "kl_harmless", "cross_entropy")}


def figure(table: pd.DataFrame):
    """Test refusal rate after ablation against KL on harmless, one point per direction."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    base = table[table.candidate == "baseline"].iloc[0]
    ax.axhline(base.refusal_rate, color="gray", ls=":", label=f"baseline {base.refusal_rate:.0%}")
    for r in table[table.candidate != "baseline"].itertuples():
        color = "red" if r.candidate == "selected" else "tab:blue"
        ax.errorbar(r.kl_harmless, r.refusal_rate, yerr=[[r.refusal_rate - r.refusal_rate_ci_low],
                                                          [r.refusal_rate_ci_high - r.refusal_rate]],
                    fmt="o", color=color, capsize=3)
        ax.annotate(f"L{r.layer}/{r.position}", (r.kl_harmless, r.refusal_rate), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.annotate("blue: post hoc (not selected on val)", (0.02, 0.95), xycoords="axes fraction", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KL on harmless (test), nats (log)")
    ax.set_ylabel("refusal rate on AdvBench test\nafter ablation (judge, 95% CI)")
    ax.set_ylim(-0.02, 1)
    ax.set_title("One direction: refusal removed vs side effect (red: selected)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
