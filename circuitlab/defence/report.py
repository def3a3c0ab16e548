"""The robust-hardening report: one comparison row per model and the figure, from the experiment's tables.

``comparison`` reads the long table (``condition`` x ``measure`` rows per model) and the curves: refusal
under each attack of the suite and under the WORST one (the number a defence is judged by) with the removal
cost at that attack, the costs on harmless inputs, and how distributed refusal is (units / directions to
halve it, the top unit's share). ``entangled``: removing this model's refusal costs more KL than removing
the original's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["comparison", "figure", "ATTACKS", "SUITE"]

SUITE = ("direction_ablation", "rank_k_ablation", "abliteration", "unit_ablation", "orthogonalization", "prefill")
ATTACKS = ("none", *SUITE)


def _first_k(curve: pd.DataFrame, target: float) -> float:
    """Smallest k whose refusal probability is at most ``target`` (NaN: none in the grid)."""
    hit = curve[curve.refusal_prob <= target]
    return float(hit.k.min()) if len(hit) else np.nan


def comparison(table, curves, training, judge, eval_split="test") -> pd.DataFrame:
    """One row per model: refusal under each attack, distribution measures, costs, training time."""
    measure = "refusal_rate" if judge else "refusal_prob"
    out = []
    for (variant, mode), g in table.groupby(["variant", "mode"], sort=False):
        r = {"variant": variant, "mode": mode}
        under = {}
        for cond in ATTACKS:
            hit = g[(g.condition == cond) & (g.measure == measure) & (g.set == f"harmful_{eval_split}")]
            if cond in ("unit_ablation", "rank_k_ablation"):  # the attack: the largest k
                hit = hit[hit.k == hit.k.max()]
            if len(hit):
                r.update({f"refusal_{cond}": hit.value.iloc[0], f"refusal_{cond}_ci_low": hit.ci_low.iloc[0],
                          f"refusal_{cond}_ci_high": hit.ci_high.iloc[0]})
                if cond != "none":
                    under[cond] = (hit.value.iloc[0], hit.k.iloc[0])
        if under:  # the number a defence is judged by: refusal under the worst attack, and what that attack costs
            worst = min(under, key=lambda c: under[c][0])
            r.update(refusal_worst=under[worst][0], worst_attack=worst)
            for m in ("kl", "cross_entropy", "over_refusal"):
                hit = g[(g.condition == worst) & (g.measure == f"{m}_under_attack")]
                if pd.notna(under[worst][1]):
                    hit = hit[hit.k == under[worst][1]]
                if len(hit):
                    r[f"removal_{m}"] = hit.value.iloc[0]
        for m, split, col in (("over_refusal_rate", f"harmless_{eval_split}", "over_refusal_rate"),
                              ("over_refusal_rate", "benign", "over_refusal_benign"),
                              ("kl_from_original", f"harmless_{eval_split}", "kl_from_original"),
                              ("cross_entropy", "plaintext", "cross_entropy")):
            hit = g[(g.condition == "none") & (g.measure == m) & (g.set == split)]
            if len(hit):
                r.update({col: hit.value.iloc[0], f"{col}_ci_low": hit.ci_low.iloc[0], f"{col}_ci_high": hit.ci_high.iloc[0]})
        c = curves[(curves.variant == variant) & (curves["mode"] == mode)]
        units, dirs = c[c.curve == "units"].sort_values("k"), c[c.curve == "directions"].sort_values("k")
        p0 = c.refusal_prob_before.iloc[0]
        r["refusal_prob"] = p0
        r["units_to_halve"] = _first_k(units, p0 / 2)
        r["directions_to_halve"] = _first_k(dirs, p0 / 2)
        drop_all = p0 - units.refusal_prob.iloc[-1]
        r["top_unit_share"] = (p0 - units.refusal_prob.iloc[0]) / drop_all if drop_all > 1e-6 else np.nan
        r["top_unit_attribution_share"] = units.top_attribution_share.iloc[0]
        r["top_unit"] = units.top_unit.iloc[0]
        edge = g[g.measure == "edge_faithfulness"]
        if len(edge):
            r["edge_faithfulness"], r["edge_circuit_edges"] = edge.value.iloc[0], int(edge.k.iloc[0])
        t = training[(training.variant == variant) & (training["mode"] == mode)] if len(training) else training
        r["train_seconds"] = float(t.seconds.iloc[0]) if len(t) else 0.0
        r["n_params"] = int(t.n_params.iloc[0]) if len(t) else 0
        out.append(r)
    out = pd.DataFrame(out)
    # entangled: removing this model's refusal costs more (KL to the original's outputs) than removing the original's
    if "removal_kl" in out and (out.variant == "original").any():
        base = out.loc[out.variant == "original", "removal_kl"].iloc[0]
        out["removal_kl_vs_original"] = out.removal_kl - base
        out["entangled"] = out.removal_kl > base
    return out


def figure(rows, curves, model_name, judge):
    """Refusal under each attack per model (bars, 95 % CIs) beside the unit and direction curves."""
    from circuitlab.io.plots import subplots

    fig, axes = subplots(1, 3, figsize=(15, 3.8))
    labels = [f"{v}\n{m}" if v != "original" else v for v, m in zip(rows.variant, rows["mode"])]
    x, width = np.arange(len(labels)), 0.8 / len(ATTACKS)
    for i, cond in enumerate(ATTACKS):
        col = f"refusal_{cond}"
        if col in rows:
            err = np.abs(rows[[f"{col}_ci_low", f"{col}_ci_high"]].to_numpy().T - rows[col].to_numpy())
            axes[0].bar(x + (i - (len(ATTACKS) - 1) / 2) * width, rows[col], width, yerr=err, label=cond, capsize=2)
    axes[0].set_xticks(x, labels, fontsize=7)
    axes[0].set_ylabel("refusal rate (judge)" if judge else "refusal probability")
    axes[0].set_title("Refusal under adaptive attacks", fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, curve, xlabel in ((axes[1], "units", "top-k attribution-ranked units mean-ablated"),
                              (axes[2], "directions", "top-n candidate directions ablated (span)")):
        for (v, m), g in curves[curves.curve == curve].groupby(["variant", "mode"], sort=False):
            g = g.sort_values("k")
            ax.plot([0] + list(g.k), [g.refusal_prob_before.iloc[0]] + list(g.refusal_prob), marker="o",
                    label=v if v == "original" else f"{v} {m}")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("refusal probability (first token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Hardening modes under attacks recomputed on each model, {model_name}", fontsize=10)
    fig.tight_layout()
    return fig
