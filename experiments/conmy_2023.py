"""Conmy et al. 2023 (ACDC), Fig. 3-style: ROC curves and AUC of every discovery method against the
ground truth of each planted circuit (``circuitlab.models.planted.SUITE``), nodes and edges.

Node level (units: every head and every MLP neuron): diff-ranking (|Cohen's d|, last position),
probing (5-fold CV accuracy of a logistic probe on the unit's last-position activation), AtP
(|attribution-patching estimate| of mean-patching the unit to its harmless mean), exact patching
(|refusal drop| when the unit is mean-patched to its harmless mean at the post-instruction positions).
Edge level (every edge of the EdgeGraph): EAP, EAP-IG (|mean score|), ACDC (an edge's score is the
largest tau of the sweep at which ACDC keeps it, so the ROC over that score is the ROC over the sweep).

Usage: .venv/bin/python experiments/conmy_2023.py [--models single,gqa,...] [--n 8] [--out results/conmy_2023]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.graph import EdgeGraph, acdc_sweep, edge_scores
from circuitlab.io import provenance
from circuitlab.methods.attribution import mean_patch_estimates, refusal_metric
from circuitlab.methods.pairs import make_pairs
from circuitlab.methods.probes import cross_validated_probe
from circuitlab.methods.ranking import rank_components
from circuitlab.models.planted import SUITE, hooked, planted_prompts

TAUS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Shapes a method cannot recover by construction: (method, circuit) -> reason.
EXPECTED = {
    ("diff-ranking", "decoy"): "correlational: the decoy head/neuron differ between harmful and harmless as much as the circuit",
    ("probing", "decoy"): "correlational: the decoy's activation decodes harmfulness perfectly",
    ("acdc", "or"): "greedy removal: once one path's edge is gone the other becomes necessary, so one redundant path is pruned",
    ("exact-patching", "or"): "single-unit ablation: each path alone suffices, so ablating one planted unit changes nothing",
    ("atp", "or"): "linearised single-unit ablation at the saturated inhibitor: the gradient through it is ~0",
    ("eap", "or"): "linear estimate at a saturated inhibitor: the gradient through it is ~0",
}


def auc(scores, labels) -> float:
    """ROC AUC (Mann-Whitney U, ties count 1/2): P(score of a positive > score of a negative)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    if y.all() or not y.any():
        raise ValueError("AUC needs at least one positive and one negative label")
    s = np.nan_to_num(s, nan=-np.inf)
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = np.nan_to_num(np.asarray(scores, float), nan=-np.inf), np.asarray(labels, bool)
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(s)[::-1]:
        fpr.append(float(((s >= t) & ~y).sum() / max(1, (~y).sum())))
        tpr.append(float(((s >= t) & y).sum() / max(1, y.sum())))
    return np.array(fpr + [1.0]), np.array(tpr + [1.0])


def node_units(model) -> list[tuple[str, int, int]]:
    return ([("head", l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
            + [("neuron", l, i) for l in range(model.n_layers) for i in range(model.bridge.cfg.d_mlp)])


def _unit_acts(acts, kind, l, i):
    x = acts[hk.attn_z(l)][:, -1, i] if kind == "head" else acts[hk.mlp_post(l)][:, -1, i:i + 1]
    return x.reshape(len(x), -1).numpy()


def node_scores(model, harmful, harmless) -> dict[str, np.ndarray]:
    units = node_units(model)
    rk = rank_components(model, harmful, harmless, positions="last", progress=False)
    key = {(r.component, int(r.layer), int(r.head if r.component == "head" else r.neuron)): abs(r.effect_size)
           for r in rk.itertuples()}
    out = {"diff-ranking": np.array([key.get(u, 0.0) for u in units])}
    names = [f(l) for l in range(model.n_layers) for f in (hk.attn_z, hk.mlp_post)]
    acts = {p: model.run_with_cache(list(s), names, positions="last") for p, s in (("h", harmful), ("b", harmless))}
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    out["probing"] = np.array([_probe_acc(np.concatenate([_unit_acts(acts["h"], *u), _unit_acts(acts["b"], *u)]), y)
                               for u in units])
    post = model.run_with_cache(list(harmless), names, positions="post")
    means = {n: post[n].mean(0) for n in names}
    est = mean_patch_estimates(model, list(harmful), means)
    out["atp"] = np.array([abs(float(est[k][l, i])) for k, l, i in units])
    out["exact-patching"] = _exact_patching(model, harmful, means, units)
    return out


def _probe_acc(X, y) -> float:
    return cross_validated_probe(X, y, n_splits=4)["accuracy_mean"]


def _exact_patching(model, harmful, means, units) -> np.ndarray:
    """|refusal drop| when one unit is set to its harmless post-position mean (exact, one forward per unit)."""
    metric = refusal_metric(model)
    base = metric(model.last_logits(list(harmful))).mean().item()
    n_post, out = model.n_post, []
    for kind, l, i in units:
        name = hk.attn_z(l) if kind == "head" else hk.mlp_post(l)

        def patch(act, hook, name=name, i=i):
            act = act.clone()
            act[:, -n_post:, i] = means[name][:, i].to(act.dtype)
            return act
        out.append(abs(base - metric(model.last_logits(list(harmful), fwd_hooks=[(name, patch)])).mean().item()))
    return np.array(out)


def edge_method_scores(model, pairs, taus) -> dict[str, np.ndarray]:
    g = EdgeGraph.from_model(model)
    valid = g.valid
    out = {m: edge_scores(model, pairs, refusal_metric(model), method=m).mean.abs()[valid].numpy()
           for m in ("eap", "eap-ig")}
    kept = torch.zeros_like(valid, dtype=torch.float64)
    for r in acdc_sweep(model, pairs, taus):
        kept = torch.where(r.pruned & (kept == 0), torch.tensor(r.tau, dtype=torch.float64), kept)
    out["acdc"] = kept[valid].numpy()  # largest tau at which the edge survives (taus ascending: first hit = smallest)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SUITE))
    ap.add_argument("--n", type=int, default=8, help="prompt pairs per model")
    ap.add_argument("--out", default="results/conmy_2023")
    args = ap.parse_args(argv)
    record, rows, curves = provenance.start(), [], {}
    harmful, harmless = planted_prompts(args.n, seed=0)
    for name in args.models.split(","):
        t0, gt = time.perf_counter(), SUITE[name]
        model = hooked(name)
        units = node_units(model)
        node_y = np.array([u in set(map(tuple, gt.nodes)) for u in units])
        g = EdgeGraph.from_model(model)
        edge_y = g.mask(gt.edges)[g.valid].numpy()
        scored = [("node", m, s, node_y) for m, s in node_scores(model, harmful, harmless).items()]
        taus = sorted(TAUS)
        scored += [("edge", m, s, edge_y) for m, s in
                   edge_method_scores(model, list(make_pairs(model, harmful, harmless)), taus).items()]
        for level, method, s, y in scored:
            a = auc(s, y)
            rows.append(dict(circuit=name, level=level, method=method, auc=round(a, 4), n_positive=int(y.sum()),
                             n_units=len(y), expected_failure=(method, name) in EXPECTED,
                             note=EXPECTED.get((method, name), "")))
            curves[(name, level, method)] = roc_points(s, y)
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    _figure(curves, out / "roc.png")
    (out / "config.json").write_text(json.dumps({
        "command": "experiments/conmy_2023.py " + " ".join(argv or []), "models": args.models, "n_pairs": args.n,
        "taus": TAUS, "ground_truth": {k: SUITE[k].to_dict() for k in args.models.split(",")},
        **provenance.finish(record)}, indent=2))
    print(table.to_string(index=False))


def _figure(curves, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted({k[0] for k in curves}, key=list(SUITE).index)
    fig = Figure(figsize=(3.2 * len(names), 6))
    FigureCanvasAgg(fig)
    for col, name in enumerate(names):
        for row, level in enumerate(("node", "edge")):
            ax = fig.add_subplot(2, len(names), row * len(names) + col + 1)
            for (n, lv, method), (fpr, tpr) in curves.items():
                if n == name and lv == level:
                    ax.plot(fpr, tpr, label=method, drawstyle="steps-post")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
            ax.set_title(f"{name} ({level})", fontsize=9)
            ax.set_xlabel("FPR", fontsize=8)
            ax.set_ylabel("TPR", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
