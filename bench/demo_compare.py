"""The demo's conclusions before and after a change: every fragility grid point, and the circuit map's, old vs new.

The old tables are read from git (``--old-rev``, the last pre-wave-2 demo results, commit 7f66d58:
judge at every point, full decoding); the new ones from ``results/refusal_circuit/``. Per point:
refusal score, judged refusal rate (new: only at the points ``judge_at="decisive"`` judges), KL,
cross-entropy (new: measured with the judge only). The circuit map: its summary's conclusions (direction
layer, verified counts by stage, the edge circuit), the verified units and the largest patch-effect difference.
Writes ``results/bench/demo_before_after.csv`` (one row per run x selection x seed x k) and
``demo_before_after.json`` (largest score difference, judged points that agree, units needed to
halve refusal, whether each old judged rate lies in the new 95 % CI, random-control seeds, wall times).
A run the new folder lacks (the effect-size ranking is opt-in) is listed as such.

    .venv/bin/python bench/demo_compare.py      # defaults: --old-rev 7f66d58 --new results/refusal_circuit
    .venv/bin/python bench/demo_compare.py --old-rev REV --new FOLDER --out results/bench/NAME.csv
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("fragility_neuron", "fragility_head", "fragility_neuron_effect_size")
KEYS = ["selection", "seed", "k"]
MEASURES = ["refusal_score", "refusal_rate", "kl_harmless", "cross_entropy"]
# the circuit map's summary entries that state a conclusion (the direction's layer, what verifies, the edge circuit)
CIRCUIT_KEYS = ["direction_layer", "direction_fallback_step", "n_candidates", "n_verified", "verified_detection",
                "verified_evaluation", "verified_decision", "verified_production", "edge_circuit_edges",
                "edge_faithfulness", "staged_by_graph"]
UNIT = ["layer", "component", "head", "neuron"]


def _old(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def compare_run(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Old and new measures side by side on the grid points both runs have."""
    cols = KEYS + MEASURES
    both = old[cols].merge(new[cols + ["refusal_rate_ci_low", "refusal_rate_ci_high"]], on=KEYS,
                           suffixes=("_old", "_new"))
    judged = both.refusal_rate_new.notna()
    both["old_rate_in_new_ci"] = pd.array(
        [bool(lo - 1e-9 <= o <= hi + 1e-9) if j else pd.NA for o, lo, hi, j in
         zip(both.refusal_rate_old, both.refusal_rate_ci_low, both.refusal_rate_ci_high, judged)], dtype="boolean")
    return both


def compare_circuit(old_summary: dict, new_summary: dict, old: pd.DataFrame, new: pd.DataFrame) -> dict:
    """The circuit map's conclusions old vs new: summary entries, the verified units, their patch effects."""
    both = old[UNIT + ["patch_effect", "verified"]].merge(new[UNIT + ["patch_effect", "verified"]], on=UNIT,
                                                         how="outer", suffixes=("_old", "_new"))
    common = both.patch_effect_old.notna() & both.patch_effect_new.notna()
    return {"summary": {k: {"old": old_summary["circuit"].get(k), "new": new_summary["circuit"].get(k)}
                        for k in CIRCUIT_KEYS},
            "candidates_in_both": int(common.sum()),
            "max_abs_patch_effect_diff": float((both.patch_effect_old - both.patch_effect_new)[common].abs().max()),
            "verified_same_units": bool((both.verified_old.fillna(False).astype(bool)
                                         == both.verified_new.fillna(False).astype(bool)).all())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", default="7f66d58")
    ap.add_argument("--new", type=Path, default=ROOT / "results" / "refusal_circuit")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "demo_before_after.csv")
    args = ap.parse_args(argv)
    old_summary = json.loads(_old(args.old_rev, "results/refusal_circuit/summary.json"))
    new_summary = json.loads((args.new / "summary.json").read_text())
    tables, record = [], {"old_rev": args.old_rev, "runs": {}}
    record["circuit"] = compare_circuit(
        old_summary, new_summary, pd.read_csv(io.StringIO(_old(args.old_rev, "results/refusal_circuit/circuit/table.csv"))),
        pd.read_csv(args.new / "circuit" / "table.csv"))
    for run in RUNS:
        if run not in new_summary["fragility"]:  # e.g. the effect-size ranking, now opt-in (a folder may be older)
            record["runs"][run] = "not in the new run"
            continue
        old = pd.read_csv(io.StringIO(_old(args.old_rev, f"results/refusal_circuit/{run}/table.csv")))
        new = pd.read_csv(args.new / run / "table.csv")
        both = compare_run(old, new).assign(run=run)
        judged = both.refusal_rate_new.notna()
        record["runs"][run] = {
            "points_compared": len(both), "points_judged_old": int(both.refusal_rate_old.notna().sum()),
            "points_judged_new": int(judged.sum()),
            "max_abs_refusal_score_diff": float((both.refusal_score_old - both.refusal_score_new).abs().max()),
            "cross_entropy_points_new": int(both.cross_entropy_new.notna().sum()),  # measured with the judge only
            "max_abs_cross_entropy_diff": float((both.cross_entropy_old - both.cross_entropy_new).abs().max()),
            "judged_points_equal": int((both.refusal_rate_old[judged] == both.refusal_rate_new[judged]).sum()),
            "old_rate_in_new_ci": int(both.old_rate_in_new_ci.sum()),
            "k_to_halve_old": old_summary["fragility"][run].get("k_to_halve_refusal"),
            "k_to_halve_new": new_summary["fragility"][run].get("k_to_halve_refusal"),
            "k_to_halve_new_judged": new_summary["fragility"][run].get("k_to_halve_refusal_judged"),
            "random_seeds_old": int(old[old.selection == "random"].seed.nunique()),
            "random_seeds_new": int(new[new.selection == "random"].seed.nunique())}
        tables.append(both)
    record["seconds_old"] = old_summary.get("seconds")  # that run shared the CPU (README: 1,410 s idle, warm)
    record["seconds_new"] = new_summary.get("seconds")
    table = pd.concat(tables, ignore_index=True)
    table = table[["run"] + [c for c in table.columns if c != "run"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=lambda v: None
                                                        if v is None or (isinstance(v, float) and np.isnan(v)) else v))
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
