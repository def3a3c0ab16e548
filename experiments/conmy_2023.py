"""Conmy et al. 2023 (ACDC), Fig. 3-style: ROC curves and AUC of every discovery method against the
ground truth of each planted circuit (``circuitlab.models.planted.SUITE``), nodes and edges.

Node level (units: every head and every MLP neuron): diff-ranking (|Cohen's d|, last position),
probing (5-fold CV accuracy of a logistic probe on the unit's last-position activation), AtP
(|attribution-patching estimate| of mean-patching the unit to its harmless mean), exact patching
(|refusal drop| when the unit is mean-patched to its harmless mean at the post-instruction positions).
circuit-map (the project's own ``circuit-map`` experiment, CLI defaults): a unit's score is its verified
patch effect when circuit-map proposes it as a candidate, below every candidate otherwise (its
verification is a threshold on that effect, so the ROC passes through its verified set); at edge level,
membership of its edge circuit (one operating point: AUC = (TPR + TNR) / 2).
Edge level (every edge of the EdgeGraph): EAP, EAP-IG (|mean score|), ACDC with the paper's KL criterion
(``acdc``) and with the refusal log-odds as its task metric (``acdc-metric``; the paper runs both kinds):
an edge's score is the largest tau of the sweep at which ACDC keeps it, so the ROC over that score is
the ROC over the sweep. Corrupted-run ablation (the harmless twin of each harmful prompt) throughout.

Metric: the refusal log-odds computed exactly (``exact_log_odds``: log p - log(1 - p) with log(1 - p)
the logsumexp of the other tokens), not ``metrics.refusal_score_from_logits``, which clamps p at
1 - 1e-7 (log-odds <= 16.12): the ``distributed`` model's harmful prompts sit at that clamp, where no
single unit moves the clamped score and its gradient is 0. circuit-map has no metric parameter and
keeps the clamped score (the table notes where that matters).

Speed: everything runs with ONE torch thread. The planted models are tiny (d_model 64); with the
default two threads on a shared, loaded 2-core machine each small op waits on the other thread, and
one exact ACDC step took 1.28 s instead of 0.012 s (measured at load 8). The matmul peak recorded
beside the wall time is measured before that, at the process's default thread count.

Checkpoints: each model's results go to ``OUT/parts/<model>.json`` as soon as it is done, and the merged
tables are rewritten from every part present; a rerun at the same commit and settings skips finished models.

Usage: .venv/bin/python experiments/conmy_2023.py [--models single,gqa,...] [--n 32] [--acdc-metric] [--out results/conmy_2023]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.experiments import get as get_experiment
from circuitlab.graph import EdgeGraph, acdc_sweep, edge_scores
from circuitlab.io import provenance
from circuitlab.methods import metrics
from circuitlab.methods.attribution import mean_patch_estimates
from circuitlab.methods.pairs import make_pairs
from circuitlab.methods.probes import cross_validated_probe
from circuitlab.methods.ranking import rank_components
from circuitlab.models.planted import SUITE, circuit, hooked, planted_prompts

TAUS = tuple(float(t) for t in np.logspace(-7, 2, 28))  # 3 per decade: the ROC's operating points
# Shapes a method cannot recover by construction: (method, circuit) -> reason. Claims made before the
# run; the table's ``recovered`` column (AUC >= 0.95) says whether the run agrees.
_SOFTMAX = ("linear estimate at a saturated softmax: the planted head puts ~all its attention on the keyword, "
            "so the gradient through its key input is 0 and the embed->key edge scores 0")
EXPECTED = {
    ("diff-ranking", "decoy"): "correlational: the decoy head/neuron differ between harmful and harmless as much as the circuit",
    ("probing", "decoy"): "correlational: the decoy's activation decodes harmfulness perfectly",
    ("acdc", "or"): "greedy removal: once one path's edge is gone the other becomes necessary, so one redundant path is pruned",
    ("acdc-metric", "or"): "greedy removal: once one path's edge is gone the other becomes necessary, so one redundant path is pruned",
    ("acdc", "distributed"): "KL at a saturated output: p(refuse) ~ 1 with any one of the five heads, so removing the "
                             "others changes KL by < 1e-6 and greedy removal keeps one head",
    ("exact-patching", "or"): "single-unit ablation: each path alone suffices, so ablating one planted unit changes nothing",
    ("circuit-map", "or"): "verification is single-unit patching: each path alone suffices, so neither planted head is verified",
    ("atp", "or"): "linearised single-unit ablation at the saturated inhibitor: the gradient through it is ~0",
    ("eap", "or"): "linear estimate at a saturated inhibitor and a saturated softmax: the gradients through them are ~0",
    **{("eap", c): _SOFTMAX for c in ("single", "gqa", "and", "decoy", "distributed")},
}
RECOVERED = 0.95  # the bar for "recovers the circuit"
NODE_ONLY = {"circuit-map"}  # methods scored at both levels whose EXPECTED reasons are about their node scores


def expected(level: str, method: str, name: str) -> str:
    """The reason ``method`` cannot recover circuit ``name`` at ``level`` by construction, or ''."""
    return "" if level == "edge" and method in NODE_ONLY else EXPECTED.get((method, name), "")


def exact_log_odds(model):
    """Refusal log-odds ``log p - log(1 - p)`` of the refusal tokens, both terms as logsumexps (no clamp)."""
    tokens = list(metrics.refusal_tokens(model))

    def metric(logits):
        lp = torch.log_softmax(logits.float(), -1)
        other = torch.ones(lp.shape[-1], dtype=torch.bool, device=lp.device)
        other[tokens] = False
        return torch.logsumexp(lp[..., tokens], -1) - torch.logsumexp(lp[..., other], -1)
    return metric


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
    est = mean_patch_estimates(model, list(harmful), means, metric=exact_log_odds(model))
    out["atp"] = np.array([abs(float(est[k][l, i])) for k, l, i in units])
    out["exact-patching"] = _exact_patching(model, harmful, means, units)
    return out


def _probe_acc(X, y) -> float:
    return cross_validated_probe(X, y, n_splits=4)["accuracy_mean"]


def _exact_patching(model, harmful, means, units) -> np.ndarray:
    """|refusal drop| when one unit is set to its harmless post-position mean (exact, one forward per unit)."""
    metric = exact_log_odds(model)
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


def circuit_map_scores(model, harmful, harmless, units, graph) -> tuple[np.ndarray, np.ndarray, dict]:
    """(node scores, edge scores, summary) of one circuit-map run with the CLI's defaults (module docstring)."""
    result = get_experiment("circuit-map")().run(model, harmful, harmless)
    t = result.table
    effect = {(r.component, int(r.layer), int(r.head if r.component == "head" else r.neuron)): float(r.patch_effect)
              for r in t.itertuples()}
    floor = min(effect.values()) - 1.0  # not proposed: below every candidate
    nodes = np.array([effect.get(u, floor) for u in units])
    edges = graph.mask([tuple(e) for e in result.tables["circuit_edges"][["writer", "reader"]].itertuples(index=False)])
    summary = {k: result.summary.get(k) for k in ("n_candidates", "n_verified", "edge_circuit", "edge_faithfulness")}
    return nodes, edges[graph.valid].numpy().astype(float), summary


def edge_method_scores(model, pairs, taus, graph, *, acdc_metric: bool = False
                       ) -> tuple[dict[str, np.ndarray], list[dict], dict]:
    """EAP, EAP-IG (|mean score|) and ACDC (largest kept tau) per valid edge, and one row per ACDC run."""
    valid, out, timing = graph.valid, {}, {}
    for m in ("eap", "eap-ig"):
        t = time.perf_counter()
        out[m] = edge_scores(model, pairs, exact_log_odds(model), method=m, graph=graph).mean.abs()[valid].numpy()
        timing[m] = time.perf_counter() - t
    sweep = []
    for method, criterion in (("acdc", "kl"), ("acdc-metric", "metric"))[:2 if acdc_metric else 1]:
        t, kept = time.perf_counter(), torch.zeros_like(valid, dtype=torch.float64)
        metric = exact_log_odds(model) if criterion == "metric" else None
        for r in acdc_sweep(model, pairs, sorted(taus), criterion=criterion, metric=metric, graph=graph):
            kept = torch.where(r.pruned, torch.tensor(r.tau, dtype=torch.float64), kept)  # ascending: last wins
            sweep.append(dict(method=method, criterion=criterion, tau=r.tau, n_edges=r.n_edges, final=r.final,
                              n_evals=r.n_evals, wall_s=round(r.wall_s, 3)))
        out[method] = kept[valid].numpy()  # the largest tau of the sweep at which ACDC keeps the edge (0: never)
        timing[method] = time.perf_counter() - t
    return out, sweep, timing


def score_model(name: str, n: int, *, acdc_metric: bool = False) -> dict:
    """Every method on planted model ``name``: table rows, per-unit scores, the ACDC sweep, timings."""
    t0, gt = time.perf_counter(), SUITE[name]
    harmful, harmless = planted_prompts(n, seed=0)
    model = hooked(name)
    units = node_units(model)
    node_y = np.array([u in set(map(tuple, gt.nodes)) for u in units])
    g = EdgeGraph.from_model(model)
    edge_y = g.mask(gt.edges)[g.valid].numpy()
    t = time.perf_counter()
    node = node_scores(model, harmful, harmless)
    times = {"node methods": time.perf_counter() - t}
    t = time.perf_counter()
    cm_nodes, cm_edges, cm_summary = circuit_map_scores(model, harmful, harmless, units, g)
    node["circuit-map"] = cm_nodes
    times["circuit-map"] = time.perf_counter() - t
    edge, sweep, edge_times = edge_method_scores(model, list(make_pairs(model, harmful, harmless)), TAUS, g,
                                                 acdc_metric=acdc_metric)
    edge["circuit-map"] = cm_edges
    times.update(edge_times)
    rows, scores = [], []
    unit_names = [f"{k} {l}.{i}" for k, l, i in units]
    edge_names = [f"{w}->{r}" for w, r in g.edges_of(g.valid)]
    for level, methods, y, labels in (("node", node, node_y, unit_names), ("edge", edge, edge_y, edge_names)):
        for method, sc in methods.items():
            a = auc(sc, y)
            rows.append(dict(circuit=name, level=level, method=method, auc=round(a, 4), n_positive=int(y.sum()),
                             n_units=len(y), recovered=bool(a >= RECOVERED),
                             expected_failure=bool(expected(level, method, name)), note=expected(level, method, name)))
            scores += [dict(circuit=name, level=level, method=method, unit=u, score=float(v), planted=bool(p))
                       for u, v, p in zip(labels, sc, y)]
    return {"rows": rows, "scores": scores, "sweep": [dict(circuit=name, **r) for r in sweep],
            "wall_seconds": round(time.perf_counter() - t0, 2), "seconds": {k: round(v, 2) for k, v in times.items()},
            "circuit_map": cm_summary, "prompts": [harmful.name, harmless.name]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SUITE))
    ap.add_argument("--n", type=int, default=32, help="matched harmful/harmless prompt pairs per model")
    ap.add_argument("--out", default="results/conmy_2023")
    ap.add_argument("--acdc-metric", action="store_true", help="also ACDC with the log-odds criterion (~3x ACDC's cost)")
    args = ap.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        circuit(name)  # an unknown name fails before any work
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    peak = provenance.matmul_peak()  # at the default thread count, the figure recorded beside every wall time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: one thread is ~100x faster on these tiny models under load
    settings = {"n_pairs": args.n, "taus": list(TAUS), "acdc_metric": args.acdc_metric}
    for name in names:
        part = out / "parts" / f"{name}.json"
        if part.is_file():
            old = json.loads(part.read_text())
            if old["settings"] == settings and old["provenance"]["commit"] == provenance.git_state()["commit"]:
                print(f"{name}: kept {part} (same commit and settings)", flush=True)
                continue
        record = provenance.start()
        result = score_model(name, args.n, acdc_metric=args.acdc_metric)
        result.update(settings=settings, matmul_peak_gflops=round(peak / 1e9, 1), matmul_peak_threads=threads,
                      run_threads=1, provenance=provenance.finish(record),
                      command="experiments/conmy_2023.py " + " ".join(sys.argv[1:] if argv is None else argv))
        part.write_text(json.dumps(result, indent=1))  # a checkpoint: a rerun at the same commit skips this model
        print(f"{name}: {result['wall_seconds']:.0f}s " + ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items()),
              flush=True)
    merge(out)


def merge(out: Path) -> pd.DataFrame:
    """Tables, figure and config of every finished model part under ``out/parts`` (suite order)."""
    parts = {p.stem: json.loads(p.read_text()) for p in (out / "parts").glob("*.json")}
    names = [n for n in SUITE if n in parts]
    table = pd.DataFrame([r for n in names for r in parts[n]["rows"]])
    table["note"] = [expected(r.level, r.method, r.circuit) for r in table.itertuples()]  # the claims, as now keyed
    table["expected_failure"] = table["note"] != ""
    table.to_csv(out / "table.csv", index=False)
    wide = table.pivot_table(index=["level", "method"], columns="circuit", values="auc", sort=False)[names]
    wide.reset_index().to_csv(out / "auc.csv", index=False)
    scores = pd.DataFrame([r for n in names for r in parts[n]["scores"]])
    scores.to_csv(out / "scores.csv", index=False)
    pd.DataFrame([r for n in names for r in parts[n]["sweep"]]).to_csv(out / "acdc_sweep.csv", index=False)
    curves = {(c, lv, m): roc_points(g.score.to_numpy(), g.planted.to_numpy())
              for (c, lv, m), g in scores.groupby(["circuit", "level", "method"], sort=False)}
    _figure(curves, out / "roc.png")
    (out / "config.json").write_text(json.dumps({
        "models": names, "missing": [n for n in SUITE if n not in parts],
        "acdc": {"criterion": "kl (acdc); metric = exact_log_odds (acdc-metric, when run)", "ablation": "corrupt"},
        "metric": "exact_log_odds (refusal log-odds, no clamp)",
        "ground_truth": {n: SUITE[n].to_dict() for n in names},
        "wall_seconds_total": round(sum(parts[n]["wall_seconds"] for n in names), 2),
        "per_model": {n: {k: v for k, v in parts[n].items() if k not in ("rows", "scores", "sweep")} for n in names}},
        indent=2))
    print(wide.to_string())
    return table


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
