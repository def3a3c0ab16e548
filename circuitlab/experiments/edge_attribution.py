"""edge-attribution: EAP and EAP-IG edge scores over the residual-stream graph, and the faithfulness
of the circuits they select, on held-out pairs (MIB CPR / CMD against random circuits).

Methods: EAP (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery")
and EAP-IG over inputs (Hanna et al. 2024, "Have Faith in Faithfulness", default 5 steps);
evaluation as in MIB (Mueller et al. 2025): circuits at each edge fraction are run with every other
edge ablated (exact, ``circuitlab.graph.faithfulness``), faithfulness
``(m(C) - m(∅)) / (m(N) - m(∅))``, CPR = area under the curve, CMD = area between it and 1 (both over
the linear edge fraction, as MIB). Clean = harmful, corrupted = harmless, metric = refusal score.

Pairs: equal-length harmful/harmless pairs (``patching.pairs.make_pairs``), shuffled with ``seed``
and split: scores are computed on the discovery part, curves on the rest. Stability: Jaccard
overlap of the top edges (``stability_fraction`` of the graph) across bootstrap resamples of the
discovery pairs.

Table (one row per method and edge): writer, reader, layer (the writer's; -1 = embedding),
reader_layer (``n_layers`` = logits), component (the writer: ``embed`` / ``head`` / ``mlp_out``),
head, reader_kind, score, abs_rank, method, mode. Extra tables: ``curve``, ``summary`` (CPR/CMD),
``stability``, ``graph`` (edge counts by reader kind, GQA included).

Units (``UnitExperiment``, so ``--ray`` spreads them): round one scores one batch of discovery pairs
with one method per unit (the batches ``edge_scores`` itself forms, so every number is the one a
whole-set call gives); round two runs every circuit of the curve (selected on the driver from the
merged scores) on one batch of evaluation pairs per unit; ``merge`` assembles the per-pair metrics and
builds the curve exactly as ``graph.faithfulness_curve`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.methods import metrics as mx
from circuitlab import graph as eg
from circuitlab.graph.forward import pair_batches
from circuitlab.io.results import Result
from circuitlab.experiments.base import Plan, UnitExperiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_types
from circuitlab.experiments.patching.common import pair_on
from circuitlab.methods.pairs import PAIRINGS, make_pairs

__all__ = ["EdgeAttribution", "PairBatch"]


@register("edge-attribution")
@dataclass
class EdgeAttribution(UnitExperiment):
    """Edge attribution (EAP, EAP-IG) on the residual-stream graph, with whole-circuit faithfulness curves (MIB CPR/CMD)."""

    methods: list[str] = field(default_factory=lambda: ["eap", "eap-ig"])  # scoring methods: eap (one backward) and/or eap-ig (integrated gradients over inputs)
    ig_steps: int = 5  # EAP-IG interpolation steps (Hanna et al. 2024 use 5)
    mode: str = "denoise"  # denoise (patch harmful into harmless) | noise (harmless into harmful)
    n_pairs: int | None = 32  # equal-length harmful/harmless pairs used (None: all that pair up)
    pairing: str = "length"  # length (exact token length) | pad (pad the shorter request)
    discover_fraction: float = 0.5  # share of pairs that score edges; the rest evaluate faithfulness (held out)
    fractions: list[float] = field(default_factory=lambda: list(eg.MIB_FRACTIONS))  # edge fractions of the faithfulness curve (MIB: 0.001 ... 1)
    selection: str = "topn"  # topn (top-|score| edges) | greedy (connected from embedding to logits)
    ablation: str = "corrupt"  # edges outside the circuit take the corrupted run's (corrupt) or mean (mean) values
    random_seeds: int = 3  # random circuits per size (min-max band of the curve)
    n_boot: int = 20  # bootstrap resamples of the pairs for top-edge stability (Jaccard)
    stability_fraction: float = 0.05  # edge fraction whose stability across resamples is reported
    batch_size: int = 8  # pairs per forward/backward batch
    seed: int = 0  # seed for pair order, random circuits and bootstrap

    def __post_init__(self):
        check_types(self)
        check(len(self.methods) > 0 and set(self.methods) <= set(eg.METHODS),
              f"methods={self.methods!r} must be a non-empty subset of {', '.join(eg.METHODS)}")
        check(isinstance(self.ig_steps, int) and self.ig_steps >= 1, f"ig_steps must be an int >= 1, got {self.ig_steps!r}")
        check_choice("mode", self.mode, eg.MODES)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_choice("selection", self.selection, eg.SELECTIONS)
        check_choice("ablation", self.ablation, eg.ABLATIONS)
        check(self.n_pairs is None or (isinstance(self.n_pairs, int) and self.n_pairs >= 2),
              f"n_pairs must be None (all) or an int >= 2 (one to discover, one to evaluate), got {self.n_pairs!r}")
        check(0 < self.discover_fraction < 1, f"discover_fraction must be in (0, 1), got {self.discover_fraction!r}")
        check(len(self.fractions) >= 2 and all(0 < f <= 1 for f in self.fractions)
              and len(set(self.fractions)) == len(self.fractions),
              f"fractions must be >= 2 distinct edge fractions in (0, 1], got {self.fractions!r}")
        check(isinstance(self.random_seeds, int) and self.random_seeds >= 0, "random_seeds must be an int >= 0")
        check(isinstance(self.n_boot, int) and self.n_boot >= 0, "n_boot must be an int >= 0")
        check(0 < self.stability_fraction <= 1, f"stability_fraction must be in (0, 1], got {self.stability_fraction!r}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an int >= 1")
        check_at_least(self, 0, "seed")

    def split(self, model, harmful, harmless):
        """``(discovery pairs, evaluation pairs, n_unpaired)``: a seeded shuffle, then a split."""
        pairs = make_pairs(model, harmful, harmless, n_pairs=self.n_pairs, pairing=self.pairing)
        if len(pairs) < 2:
            raise ValueError(f"edge-attribution needs >= 2 equal-length pairs (one to discover, one to evaluate), "
                             f"got {len(pairs)}; pass more prompts or pairing='pad'")
        order = np.random.default_rng(self.seed).permutation(len(pairs))
        n_disc = min(max(1, int(round(len(pairs) * self.discover_fraction))), len(pairs) - 1)
        items = [pairs.pairs[i] for i in order]
        return items[:n_disc], items[n_disc:], pairs.n_unpaired

    def plan(self, model, harmful, harmless, *, store=None) -> Plan:
        """Split the pairs; first round: one unit per method and scoring batch (``edge_scores``'s own batches)."""
        discover, evaluate, n_unpaired = self.split(model, harmful, harmless)
        discover, evaluate = [pair_on(p, "cpu") for p in discover], [pair_on(p, "cpu") for p in evaluate]
        units = [PairBatch("score", method, tuple(idx), tuple(discover[i] for i in idx))
                 for method in self.methods for idx in _batches(model, discover, self.batch_size)]
        context = {"discover": discover, "evaluate": evaluate, "n_unpaired": n_unpaired}
        return Plan(units, {}, context, label="edge scores")

    def run_unit(self, model, state: dict, unit: "PairBatch") -> dict:
        """Per-pair edge scores of one batch (first round) or per-pair circuit metrics of one batch (second)."""
        graph, metric = eg.EdgeGraph.from_model(model), _metric(model)
        pairs = [pair_on(p, model.device) for p in unit.pairs]
        if unit.task == "score":
            s = eg.edge_scores(model, pairs, metric, method=unit.method, steps=self.ig_steps, mode=self.mode,
                               batch_size=self.batch_size, graph=graph)
            return {"per_pair": s.per_pair, "clean": s.clean_metric, "corrupt": s.corrupt_metric, "steps": s.steps}
        # mean ablation: the mean over every evaluation pair, as one whole-set run takes it
        mean_pairs = [pair_on(p, model.device) for p in state["evaluate"]] if self.ablation == "mean" else None
        runner = eg.CircuitRunner(model, pairs, metric, ablation=self.ablation, batch_size=self.batch_size,
                                  graph=graph, mean_pairs=mean_pairs)
        return {"clean": runner.clean, "empty": runner.empty, "circuits": runner.run(state["masks"])}

    def next_plan(self, model, harmful, harmless, plan: Plan, outputs: list) -> Plan | None:
        """After scoring: the score tables, stability, and the circuits of the curve; second round: one unit
        per evaluation batch, every circuit on it. After that: done."""
        if "scores" in plan.context:
            return None
        graph = eg.EdgeGraph.from_model(model)
        scores, frames, stability = {}, [], []
        n_stable = eg.n_for_fraction(graph, self.stability_fraction)
        for method in self.methods:
            s = _gather_scores(graph, self.mode, self.batch_size, len(plan.context["discover"]),
                               [(u, o) for u, o in zip(plan.units, outputs) if u.method == method])
            scores[method] = s.mean
            frames.append(s.table())
            if self.n_boot:
                jac = eg.bootstrap_stability(graph, s.per_pair, n_stable, n_boot=self.n_boot, seed=self.seed,
                                             selection=self.selection)
                stability.append({"method": method, "n_edges": n_stable, "n_boot": self.n_boot,
                                  "jaccard_mean": jac.mean(), "jaccard_min": jac.min(), "jaccard_max": jac.max()})
        jobs, where, masks = eg.curve_jobs(graph, scores, self.fractions, self.selection, self.random_seeds)
        evaluate = plan.context["evaluate"]
        units = [PairBatch("faithfulness", "", tuple(idx), tuple(evaluate[i] for i in idx))
                 for idx in _batches(model, evaluate, self.batch_size)]
        state = {"masks": masks, "evaluate": evaluate if self.ablation == "mean" else None}
        context = {**plan.context, "scores": scores, "table": pd.concat(frames, ignore_index=True),
                   "stability": stability, "jobs": jobs, "where": where, "graph": graph}
        return Plan(units, state, context, label="circuit faithfulness")

    def merge(self, model, harmful, harmless, plan: Plan, outputs: list) -> Result:
        c = plan.context
        graph, table, n_eval = c["graph"], c["table"], len(c["evaluate"])
        measured = _gather_eval(plan.units, outputs, n_eval, self.ablation)
        curve = eg.curve_table(c["jobs"], c["where"], measured, self.ablation)
        summary_table = pd.concat([eg.curve_summary(curve, "fraction"), eg.curve_summary(curve, "log")],
                                  ignore_index=True)
        counts = graph.counts()
        graph_table = pd.DataFrame([{"quantity": k, "count": v} for k, v in counts.items()])
        mib = summary_table[summary_table.x == "fraction"].set_index("method")
        summary = {
            "graph": counts, "n_discover": len(c["discover"]), "n_evaluate": n_eval, "n_unpaired": c["n_unpaired"],
            "cpr": mib.cpr.round(4).to_dict(), "cmd": mib.cmd.round(4).to_dict(),
            "top_edges": {m: table[table.method == m].head(5)[["writer", "reader", "score"]].to_dict("records")
                          for m in self.methods},
        }
        figures = {}
        try:
            from circuitlab.graph.plot import plot_curves
            figures["faithfulness_curve"] = plot_curves(curve, f"{model.name}: edge circuits ({self.ablation} ablation)")
        except ImportError:  # matplotlib missing: the tables still hold everything
            pass
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"curve": curve, "summary": summary_table, "stability": pd.DataFrame(c["stability"]),
                              "graph": graph_table},
                      figures=figures, summary=summary)


@dataclass(frozen=True)
class PairBatch:
    """One unit: the pairs of one forward batch (``indices`` into the discovery or evaluation pairs), to
    score with ``method`` (``task="score"``) or to run every circuit on (``task="faithfulness"``)."""

    task: str
    method: str
    indices: tuple[int, ...]
    pairs: tuple


def _metric(model):
    tokens = mx.refusal_tokens(model)

    def metric(logits):
        return mx.refusal_score_from_logits(logits, tokens)
    return metric


def _batches(model, pairs, batch_size: int) -> list[list[int]]:
    """The pair indices of each batch the graph functions form (sorted by length), so a unit holding one
    batch's pairs runs exactly the forward passes a whole-set call runs for that batch."""
    return [batch.index for batch in pair_batches(model, pairs, batch_size)]


def _gather_scores(graph, mode: str, batch_size: int, n_pairs: int, parts) -> eg.EdgeScores:
    """One method's ``EdgeScores`` over every discovery pair, from its batch units' outputs."""
    per_pair = torch.full((n_pairs, graph.n_writers, graph.n_readers), float("nan"))
    clean, corrupt = np.zeros(n_pairs), np.zeros(n_pairs)
    for unit, out in parts:
        idx = list(unit.indices)
        per_pair[idx], clean[idx], corrupt[idx] = out["per_pair"], out["clean"], out["corrupt"]
    method, steps = parts[0][0].method, parts[0][1]["steps"]
    return eg.EdgeScores(graph, per_pair, method, mode, steps, clean, corrupt,
                         meta={"batch_size": batch_size, "n_pairs": n_pairs})


def _gather_eval(units, outputs, n_pairs: int, ablation: str) -> eg.CircuitEval:
    """Per-pair clean, fully ablated and circuit metrics over every evaluation pair, from the batch units."""
    n_circuits = outputs[0]["circuits"].shape[0]
    clean, empty, circuits = np.zeros(n_pairs), np.zeros(n_pairs), np.zeros((n_circuits, n_pairs))
    for unit, out in zip(units, outputs):
        idx = list(unit.indices)
        clean[idx], empty[idx], circuits[:, idx] = out["clean"], out["empty"], out["circuits"]
    return eg.CircuitEval(clean, empty, circuits, ablation)
