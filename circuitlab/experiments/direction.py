"""refusal-direction: difference-in-means refusal direction, selected and evaluated as in
Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction".

Splits: each given set is shuffled with ``seed`` and cut into train / val / test by ``train_frac`` /
``val_frac`` / the rest (at least one prompt each). ``select`` receives only train and val: the test
split is first touched after a direction is chosen (tests/test_direction.py counts it).

1. Filter (reference code andyrdt/refusal_direction, ``filter_train`` / ``filter_val``): train and val
   keep the harmful prompts the model refuses and the harmless ones it answers, judged by greedy
   generation + ``metrics.is_refusal`` (``filter_by="judge"``, what "the model refuses" means) or by
   refusal score vs ``filter_threshold`` (``filter_by="score"``). A split side with fewer than
   ``min_kept`` survivors is used whole (``filter_fallback``; the ``filter`` table and the summary
   say so), so a selection never rests on a handful of prompts. The test split is never filtered.
2. Candidates (§2.3): ``mean(harmful) - mean(harmless)`` of ``resid_pre(l)`` on the train split, for
   every layer l and every post-instruction position (read through the ActivationStore).
3. Selection (§2.4, App. C) on the val split (``direction_eval.score_candidates``): ``bypass_score``
   (harmful, r̂ ablated everywhere), ``kl`` (harmless, ablated) and ``induce_score`` (harmless, r added
   at ``resid_pre(l)``); layers in the last ``prune_layer_frac`` are excluded. With ``screen_prompts``
   a screening round on that many val prompts per side keeps the best Pareto fronts (``n_finalists``)
   for full scoring. Rule: the paper's filters (kl < ``kl_threshold``, induce_score >
   ``induce_threshold``) with named fallbacks, or with ``kl_budget`` the lowest bypass score within
   that val KL (Pareto front). The ``candidates`` table carries every criterion, ``selection_rule``
   and ``fallback_step``.
4. Evaluation on the test split (``direction_eval.evaluate_direction``) and direct attribution of
   heads / MLPs / neurons onto the direction (``direction_eval.direction_components``).

Units (``UnitExperiment``, so ``--ray`` spreads them): ``plan`` does steps 1-2 and the unintervened val
logits; a unit scores one candidate on the val split (the screening round, then the finalists, as
``score_candidates`` does); ``merge`` selects and runs step 4. ``select`` (and the experiments that call
``score_candidates`` directly) get the same table in one call.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.methods import metrics
from circuitlab.io.datasets import PromptSet, optional_prompts
from circuitlab.methods.direction_eval import (CONDITIONS, candidate_rows, direction_components,
    evaluate_direction, finalists, last_logits_shared, score_candidate, score_candidates, screens,
    select_scored)
from circuitlab.methods.directions import candidate_directions
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.experiments.base import Plan, UnitExperiment, check, check_layers, register
from circuitlab.experiments.checks import check_at_least, check_fraction, check_subset, check_types

__all__ = ["RefusalDirection", "split_three", "FILTERS"]

FILTERS = ("judge", "score")


def split_three(prompts: PromptSet, train_frac: float, val_frac: float, seed: int) -> tuple[PromptSet, ...]:
    """Shuffle with ``seed`` and cut into (train, val, test); each part keeps at least one prompt."""
    if len(prompts) < 3:
        raise ValueError(f"{prompts.name}: need at least 3 prompts for train/val/test, got {len(prompts)}")
    if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
        raise ValueError(f"train_frac={train_frac}, val_frac={val_frac}: both in (0,1) with sum < 1")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = min(max(1, round(n * train_frac)), n - 2)
    n_val = min(max(1, round(n * val_frac)), n - n_train - 1)
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return tuple(PromptSet(f"{prompts.name}:{name}", tuple(prompts.prompts[i] for i in sorted(idx)))
                 for name, idx in zip(("train", "val", "test"), parts))


@register("refusal-direction")
@dataclass
class RefusalDirection(UnitExperiment):
    """Refusal direction (Arditi et al. 2024): diff-in-means candidates, selection, ablation/addition evaluation.

    ``select`` (train/val only), ``filter_refused``, ``candidate_directions`` and ``score_candidates``
    also work alone (the defence experiment's attack and experiments/arditi_2024_tradeoff.py reuse them).
    """

    train_frac: float = 0.4  # share of each prompt set for the candidate directions
    val_frac: float = 0.3  # share for selection (the rest is the test split)
    layers: list[int] | None = None  # candidate layers to evaluate (None: all layers)
    candidate_positions: list[int] | None = None  # post-instruction offsets of the candidates (None: all n_post)
    kl_threshold: float = 0.1  # paper rule: keep candidates whose ablation KL on harmless val prompts is below
    induce_threshold: float | None = 0.0  # paper rule: keep candidates whose addition scores above (None: off)
    kl_budget: float | None = None  # set: select the lowest val bypass score with val KL <= budget (Pareto front)
    prune_layer_frac: float = 0.2  # last fraction of layers excluded from selection (Arditi et al.)
    filter_train: bool = True  # keep refused harmful / answered harmless train prompts (reference code)
    filter_val: bool = True  # the same filter on the validation split
    filter_by: str = "judge"  # judge (greedy generation + metrics.is_refusal) or score (refusal score)
    filter_threshold: float = 0.0  # refusal score that counts as refused when filter_by=score
    min_kept: int = 24  # a filtered split side with fewer survivors is used whole (filter_fallback)
    screen_prompts: int | None = 8  # val prompts per side of the screening round (None: score all on all)
    n_finalists: int = 12  # candidates (whole Pareto fronts of the screen) scored on the whole val split
    evaluate_excluded: bool = False  # also score candidates in the pruned last layers (costly)
    judge: bool = True  # judge refusal by generation in the evaluation (False: logit scores only)
    judge_only: list[str] | None = None  # "condition:split" rows to judge by generation (None: all)
    conditions: list[str] | None = None  # evaluation conditions (None: baseline, ablation, orthogonalized, addition)
    component_prompts: int | None = None  # test prompts per side for the attribution table (None: all)
    max_new_tokens: int = 24  # tokens generated per prompt for the judge (evaluation and filter)
    plaintext: str | None = "plaintext"  # prompt set for the cross-entropy side effect (None: skip)
    n_text: int = 16  # plain texts for the cross-entropy
    top_neurons: int = 20  # neurons per layer in the attribution table
    batch_size: int = 32  # prompts per forward pass
    n_boot: int = 1000  # bootstrap resamples for the confidence intervals
    progress: bool = True  # show progress bars
    seed: int = 0  # seed of the splits and the bootstrap
    direction_: torch.Tensor | None = field(default=None, init=False, repr=False)  # learned: the selected direction
    layer_: int | None = field(default=None, init=False, repr=False)  # learned: its layer
    position_: int | None = field(default=None, init=False, repr=False)  # learned: its post-instruction offset

    def __post_init__(self):
        check_types(self)
        check_fraction(self, "train_frac", "val_frac")
        check(self.train_frac + self.val_frac < 1, f"train_frac + val_frac = {self.train_frac + self.val_frac} "
              "must be < 1 to leave a test split (e.g. --set train_frac=0.4 --set val_frac=0.3)")
        check_layers("layers", self.layers)
        check(self.candidate_positions is None or (len(self.candidate_positions) > 0 and all(p < 0 for p in self.candidate_positions)),
              f"candidate_positions={self.candidate_positions!r} must be None or negative post-instruction offsets "
              "(e.g. --set candidate_positions=-1)")
        check(self.kl_threshold > 0, f"kl_threshold={self.kl_threshold} must be > 0 (e.g. --set kl_threshold=0.1)")
        check(self.kl_budget is None or self.kl_budget > 0,
              f"kl_budget={self.kl_budget} must be None or > 0 (e.g. --set kl_budget=0.1)")
        check(self.filter_by in FILTERS, f"filter_by={self.filter_by!r} must be one of {', '.join(FILTERS)} "
              "(e.g. --set filter_by=judge)")
        check_fraction(self, "prune_layer_frac", closed=True)
        check_subset(self, "conditions", CONDITIONS, allow_none=True)
        check(self.judge_only is None or all(
            isinstance(j, str) and j.count(":") == 1 and j.split(":")[0] in CONDITIONS
            and j.split(":")[1] in ("harmful", "harmless") for j in self.judge_only),
            f"judge_only={self.judge_only!r} must be None or 'condition:split' entries such as "
            "baseline:harmful (e.g. --set judge_only=baseline:harmful,ablation:harmful)")
        check_at_least(self, 1, "component_prompts", "max_new_tokens", "n_text", "top_neurons", "batch_size",
                       "n_boot", "min_kept", "screen_prompts", "n_finalists")
        check_at_least(self, 0, "seed")

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if not k.endswith("_")}

    def plan(self, model, harmful, harmless, *, store=None) -> Plan:
        """Splits, filter and candidate directions (train), the unintervened val logits; units: one candidate
        scored on the val split each (a screening round first when ``screen_prompts`` applies)."""
        store = store if store is not None else ActivationStore()
        harmful, harmless = _as_set(harmful, "harmful"), _as_set(harmless, "harmless")
        h_train, h_val, h_test = split_three(harmful, self.train_frac, self.val_frac, self.seed)
        s_train, s_val, s_test = split_three(harmless, self.train_frac, self.val_frac, self.seed)
        h_train, s_train, h_val, s_val, filtered = self._filtered(model, h_train, s_train, h_val, s_val)
        directions = self.candidate_directions(model, h_train, s_train, store)
        h_val, s_val = list(h_val), list(s_val)
        base = last_logits_shared(model, h_val + s_val, batch_size=self.batch_size)
        base_scores = metrics.refusal_score_from_logits(base, metrics.refusal_tokens(model))
        rows, todo = candidate_rows(model, directions, len(h_val), len(s_val), layers=self.layers,
                                    positions=self.candidate_positions, prune_layer_frac=self.prune_layer_frac,
                                    evaluate_excluded=self.evaluate_excluded)
        k = self.screen_prompts
        stage = "screen" if screens(k, len(h_val), len(s_val), len(todo), self.n_finalists) else "full"
        keys = list(directions)
        units = [CandidateUnit(stage, i, keys[i][0], directions[keys[i]]) for i in todo]
        state = {"harmful": h_val, "harmless": s_val, "base_harmless": base[len(h_val):], "screen_prompts": k}
        context = {"rows": rows, "directions": directions, "filtered": filtered, "test": (h_test, s_test),
                   "store": store, "baseline": {"harmful": base_scores[:len(h_val)].mean().item(),
                                                "harmless": base_scores[len(h_val):].mean().item()}}
        return Plan(units, state, context, label=_stage_label(stage, len(h_val), len(s_val), k))

    def run_unit(self, model, state: dict, unit: "CandidateUnit") -> dict:
        """One candidate's measures on the val split: the screen's (first k prompts per side, ablation only) or
        the full ones (bypass score, KL, induce score); as ``direction_eval.score_candidates`` computes them."""
        return score_candidate(model, unit.direction, unit.layer, state["harmful"], state["harmless"],
                               state["base_harmless"], batch_size=self.batch_size,
                               screen_prompts=state["screen_prompts"] if unit.stage == "screen" else None)

    def next_plan(self, model, harmful, harmless, plan: Plan, outputs: list) -> Plan | None:
        """After a screen: score the best whole Pareto fronts (``n_finalists``) fully; after full scoring: done."""
        if not plan.units or plan.units[0].stage != "screen":
            return None
        rows = _updated(plan.context["rows"], plan.units, outputs)
        by_index = {u.index: u for u in plan.units}
        chosen = finalists(rows, list(by_index), self.n_finalists)
        h, b = plan.state["harmful"], plan.state["harmless"]
        return Plan([dataclasses.replace(by_index[i], stage="full") for i in chosen], plan.state,
                    {**plan.context, "rows": rows},
                    label=_stage_label("full", len(h), len(b), None))

    def merge(self, model, harmful, harmless, plan: Plan, outputs: list) -> Result:
        """Select on val (``select_candidate``), then evaluate the chosen direction on the test split."""
        c = plan.context
        rows = _updated(c["rows"], plan.units, outputs)
        baseline = c["baseline"]
        table, rule = select_scored(rows, baseline, self.kl_threshold, self.induce_threshold, self.kl_budget)
        best = table[table.selected].iloc[0]
        self.layer_, self.position_ = int(best.layer), int(best.position)
        self.direction_ = c["directions"][(self.layer_, self.position_)]
        return self._evaluate(model, _as_set(harmful, "harmful"), _as_set(harmless, "harmless"), table,
                              c["filtered"], rule, baseline, *c["test"], c["store"])

    def _evaluate(self, model, harmful, harmless, table, filtered, rule, baseline, h_test, s_test, store) -> Result:
        """The chosen direction on the test split (the first time a test prompt is used), and the Result."""
        plain = optional_prompts(self.plaintext, self.n_text, self.seed)
        evaluation = evaluate_direction(
            model, self.direction_, self.layer_, list(h_test), list(s_test), plain, judge=self.judge,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, n_boot=self.n_boot,
            seed=self.seed, judge_only=self.judge_only, progress=self.progress,
            **({"conditions": self.conditions} if self.conditions else {}))
        k = self.component_prompts
        components = direction_components(model, self.direction_, list(h_test)[:k], list(s_test)[:k], store,
                                          top_neurons=self.top_neurons, batch_size=self.batch_size)
        summary = {**_summary(table, evaluation, rule, baseline), **_filter_summary(filtered)}
        figures = {"candidates": candidate_heatmap(table, model.name),
                   "tradeoff": candidate_tradeoff(table, self.kl_threshold, model.name, self.kl_budget)}
        if self.judge:
            figures["refusal_rates"] = refusal_bars(evaluation, model.name)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"evaluation": evaluation, "components": components, "candidates": table,
                              "filter": filtered}, figures=figures, summary=summary)

    def select(self, model, h_train, s_train, h_val, s_val, store) -> tuple[pd.DataFrame, pd.DataFrame, str, dict]:
        """Filter, candidates and selection from the train and val splits only (no test prompt comes in).

        Sets ``direction_``, ``layer_``, ``position_``; returns (candidates table, filter table, rule,
        val baselines). The same numbers as ``run``'s units (tests/test_direction.py checks it)."""
        h_train, s_train, h_val, s_val, filtered = self._filtered(model, h_train, s_train, h_val, s_val)
        directions = self.candidate_directions(model, h_train, s_train, store)
        table, rule, baseline = self.score_candidates(model, directions, h_val, s_val)
        best = table[table.selected].iloc[0]
        self.layer_, self.position_ = int(best.layer), int(best.position)
        self.direction_ = directions[(self.layer_, self.position_)]
        return table, filtered, rule, baseline

    def _filtered(self, model, h_train, s_train, h_val, s_val) -> tuple:
        """``filter_train`` / ``filter_val`` applied: (h_train, s_train, h_val, s_val, filter table)."""
        filtered = []
        if self.filter_train:
            h_train, s_train, rows = self.filter_refused(model, h_train, s_train, "train")
            filtered += rows
        if self.filter_val:
            h_val, s_val, rows = self.filter_refused(model, h_val, s_val, "val")
            filtered += rows
        columns = ["split", "side", "n", "kept", "used", "filter_by", "filter_fallback"]
        return h_train, s_train, h_val, s_val, pd.DataFrame(filtered, columns=columns)

    def filter_refused(self, model, harmful, harmless, split: str) -> tuple[PromptSet, PromptSet, list[dict]]:
        """Refused harmful and answered harmless prompts of one split, by ``filter_by``; a side with fewer
        than ``min_kept`` survivors is used whole. Returns (harmful, harmless, one row per side)."""
        prompts = list(harmful) + list(harmless)
        if self.filter_by == "judge":  # metrics.judge_refusals stops a row once it has refused
            refused = torch.tensor(metrics.judge_refusals(model, prompts, max_new_tokens=self.max_new_tokens,
                                                          batch_size=max(self.batch_size, 32), progress=self.progress,
                                                          share_prefix=True))
        else:
            refused = metrics.refusal_score(model, prompts, batch_size=self.batch_size) > self.filter_threshold
        out, rows = [], []
        for side, part, keep in (("harmful", harmful, refused[:len(harmful)]),
                                 ("harmless", harmless, ~refused[len(harmful):])):
            chosen = tuple(p for p, k in zip(part.prompts, keep.tolist()) if k)
            fallback = len(chosen) < min(self.min_kept, len(part))
            used = part.prompts if fallback else chosen
            rows.append({"split": split, "side": side, "n": len(part), "kept": len(chosen), "used": len(used),
                         "filter_by": self.filter_by, "filter_fallback": fallback})
            out.append(PromptSet(f"{part.name}:{'all' if fallback else 'filtered'}", used))
        return out[0], out[1], rows

    def candidate_directions(self, model, harmful, harmless, store) -> dict[tuple[int, int], torch.Tensor]:
        """Difference in means of resid_pre at every (layer, post position), train split (§2.3)."""
        return candidate_directions(model, harmful, harmless, store, batch_size=self.batch_size,
                                    progress=self.progress)

    def score_candidates(self, model, directions, harmful, harmless):
        """Bypass score, KL and induce score per candidate on the val split, then selection (§2.4)."""
        return score_candidates(model, directions, harmful, harmless, layers=self.layers, positions=self.candidate_positions,
                                prune_layer_frac=self.prune_layer_frac, evaluate_excluded=self.evaluate_excluded,
                                kl_threshold=self.kl_threshold, induce_threshold=self.induce_threshold,
                                kl_budget=self.kl_budget, screen_prompts=self.screen_prompts,
                                n_finalists=self.n_finalists, batch_size=self.batch_size, progress=self.progress)


@dataclass(frozen=True)
class CandidateUnit:
    """One candidate direction to score on the val split: ``index`` into the candidate rows, its ``layer``
    (where addition adds it) and ``stage``: ``screen`` (first k prompts per side) or ``full``."""

    stage: str
    index: int
    layer: int
    direction: torch.Tensor


def _updated(rows: list[dict], units, outputs) -> list[dict]:
    """Copies of the candidate rows with each scored unit's measures filled in."""
    rows = [dict(r) for r in rows]
    for unit, out in zip(units, outputs):
        rows[unit.index].update(out)
    return rows


def _stage_label(stage: str, n_harmful: int, n_harmless: int, k) -> str:
    return (f"screening candidates ({k}+{k} val prompts)" if stage == "screen"
            else f"candidates ({n_harmful}+{n_harmless} val prompts)")


def _as_set(prompts, name) -> PromptSet:
    return prompts if isinstance(prompts, PromptSet) else PromptSet(name, tuple(prompts))


def _filter_summary(filtered: pd.DataFrame) -> dict:
    """``{split}_{side}_kept`` as "kept/n", the prompts each split side used, and which sides fell back."""
    out = {}
    for r in filtered.itertuples():
        out[f"{r.split}_{r.side}_kept"] = f"{r.kept}/{r.n}"
        out[f"{r.split}_{r.side}_used"] = int(r.used)
    fell = [f"{r.split}:{r.side}" for r in filtered.itertuples() if r.filter_fallback]
    out["filter_fallback"] = ", ".join(fell) if fell else "none"
    if fell:
        out["filter_note"] = f"fewer than min_kept prompts passed the filter on {', '.join(fell)}: used every prompt there"
    return out


def _summary(table, evaluation, rule, baseline) -> dict:
    best = table[table.selected].iloc[0]
    out = {"selected_layer": int(best.layer), "selected_position": int(best.position), "selection_rule": rule,
           "fallback_step": str(best.fallback_step), "selected_on_pareto_front": bool(best.pareto_front),
           "selected_bypass_score": float(best.bypass_score), "selected_kl": float(best.kl),
           "selected_induce_score": float(best.induce_score), "val_baseline_harmful_score": baseline["harmful"],
           "val_baseline_harmless_score": baseline["harmless"], "n_val_harmful": int(best.n_val_harmful),
           "n_val_harmless": int(best.n_val_harmless), "n_finalists": int(table.finalist.sum()),
           "n_scored_candidates": int((table.finalist | table.screen_bypass_score.notna()).sum())}
    for r in evaluation.itertuples():
        for col in ("refusal_rate", "refusal_score"):
            if hasattr(r, col) and not np.isnan(getattr(r, col)):
                out[f"{r.condition}_{r.split}_{col}"] = float(getattr(r, col))
        if r.split == "harmless":
            out[f"{r.condition}_kl_harmless"] = float(r.kl_harmless)
            out[f"{r.condition}_cross_entropy"] = float(r.cross_entropy)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def candidate_heatmap(table: pd.DataFrame, model_name: str):
    """Layer × position heatmap of the refusal score after ablation (Arditi et al. 2024, Fig. 9 style)."""
    from circuitlab.io import plots

    screened = table.screen_bypass_score.notna().any()  # then only finalists have a full-val bypass score
    fig = plots.heatmap(table, "layer", "position", "screen_bypass_score" if screened else "bypass_score",
                        center=None, cmap="viridis",
                        title=f"Refusal score on harmful ({'val screen' if screened else 'val'}) after ablating "
                              f"each candidate, {model_name}")
    ax = fig.axes[0]
    best = table[table.selected].iloc[0]
    cols = sorted(table.position.unique())
    rows = sorted(table.layer.unique())
    ax.scatter([cols.index(best.position)], [rows.index(best.layer)], marker="*", s=160, c="red", label="selected")
    ax.legend(loc="upper right", fontsize=7)
    return fig


def candidate_tradeoff(table: pd.DataFrame, kl_threshold: float, model_name: str, kl_budget: float | None = None):
    """Bypass score against KL on harmless for every fully scored candidate (val), Pareto front marked."""
    from circuitlab.io.plots import subplots

    t = table[table.bypass_score.notna()]
    fig, ax = subplots(figsize=(6, 4))
    points = ax.scatter(t.kl, t.bypass_score, c=t.layer, cmap="viridis", s=22)
    for r in t.itertuples():
        ax.annotate(f"{r.layer}/{r.position}", (r.kl, r.bypass_score), fontsize=5, alpha=0.7)
    front = t[t.pareto_front].sort_values("kl")
    ax.plot(front.kl, front.bypass_score, color="black", lw=0.8, drawstyle="steps-post", label="Pareto front")
    best = t[t.selected]
    ax.scatter(best.kl, best.bypass_score, marker="*", s=200, c="red", label="selected")
    if kl_budget is not None:
        ax.axvline(kl_budget, color="tab:red", ls="--", lw=1, label=f"KL budget {kl_budget}")
    else:
        ax.axvline(kl_threshold, color="gray", ls="--", lw=1, label=f"KL threshold {kl_threshold}")
    ax.axhline(float(t.baseline_harmful_score.iloc[0]), color="tab:blue", ls=":", lw=1, label="harmful baseline")
    ax.axhline(float(t.baseline_harmless_score.iloc[0]), color="tab:orange", ls=":", lw=1, label="harmless baseline")
    ax.set_xscale("log")
    ax.set_xlabel("KL on harmless (val) after ablation, nats (log)")
    ax.set_ylabel("refusal score on harmful (val) after ablation")
    ax.set_title(f"Candidates (layer/position), {model_name}", fontsize=9)
    fig.colorbar(points, ax=ax, label="layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def refusal_bars(evaluation: pd.DataFrame, model_name: str):
    """Refusal rate with 95% CI: baseline vs ablation (harmful), baseline vs addition (harmless) (Fig. 1)."""
    from circuitlab.io.plots import subplots

    fig, ax = subplots(figsize=(6, 3.5))
    picks = [("harmful", "baseline"), ("harmful", "ablation"), ("harmful", "orthogonalized"),
             ("harmless", "baseline"), ("harmless", "addition")]
    ev = evaluation.set_index(["split", "condition"])
    picks = [p for p in picks if p in ev.index and not np.isnan(ev.loc[p, "refusal_rate"])]
    rate = [ev.loc[p, "refusal_rate"] for p in picks]
    err = np.array([[r - ev.loc[p, "refusal_rate_ci_low"], ev.loc[p, "refusal_rate_ci_high"] - r]
                    for p, r in zip(picks, rate)]).T.clip(min=0)
    colors = ["tab:gray" if c == "baseline" else ("tab:blue" if s == "harmful" else "tab:orange") for s, c in picks]
    ax.bar(range(len(picks)), rate, yerr=err, color=colors, capsize=4)
    ax.set_xticks(range(len(picks)), [f"{s}\n{c}" for s, c in picks], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate (judge, 95% CI)")
    ax.set_title(f"Refusal direction, {model_name} (test split)")
    fig.tight_layout()
    return fig
