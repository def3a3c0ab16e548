"""refusal-direction: difference-in-means refusal direction, selected and evaluated as in
Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction".

1. Candidates (§2.3): ``mean(harmful) - mean(harmless)`` of ``resid_pre(l)`` on the train split, for
   every layer l and every post-instruction position (read through the ActivationStore).
2. Selection (§2.4, App. C): on the val split, for each candidate r: ``bypass_score`` = mean refusal
   score on harmful prompts with r̂ ablated everywhere (lower is better); ``kl`` = KL on harmless
   prompts after ablation (must be < ``kl_threshold``); ``induce_score`` = mean refusal score on
   harmless prompts with r added at ``resid_pre(l)`` (must exceed ``induce_threshold``); layers in
   the last ``prune_layer_frac`` are excluded. The filtered candidate with the lowest bypass score wins.
3. Evaluation on the test split (``direction_eval.evaluate_direction``) and direct attribution of
   heads / MLPs / neurons onto the direction (``direction_eval.direction_components``).

Splits: each given set is shuffled with ``seed`` and cut into train / val / test by
``train_frac`` / ``val_frac`` / the rest (at least one prompt each). As in the reference code
(andyrdt/refusal_direction, ``filter_train`` / ``filter_val``), train and val keep only the harmful
prompts the model refuses (refusal score > ``filter_threshold``) and the harmless ones it does not
(score < threshold): a model that answers half of AdvBench would otherwise dilute the direction
with prompts that carry no refusal. The test split is never filtered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import metrics
from ..datasets import PromptSet
from ..direction_eval import CONDITIONS, direction_components, evaluate_direction, score_candidates
from ..directions import candidate_directions
from ..results import Result
from ..store import ActivationStore
from .base import Experiment, check, check_layers, register
from .checks import check_at_least, check_fraction, check_subset, check_types

__all__ = ["RefusalDirection", "split_three"]


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
class RefusalDirection(Experiment):
    """Refusal direction (Arditi et al. 2024): diff-in-means candidates, selection, ablation/addition evaluation.

    The steps ``filter_refused``, ``candidate_directions`` and ``score_candidates`` also work alone
    (the defence experiment's attack and experiments/arditi_2024_tradeoff.py reuse them).
    """

    train_frac: float = 0.5  # share of each prompt set for the candidate directions
    val_frac: float = 0.25  # share for selection (the rest is the test split)
    layers: list[int] | None = None  # candidate layers to evaluate (None: all layers)
    positions: list[int] | None = None  # post-instruction offsets to evaluate (None: all n_post)
    kl_threshold: float = 0.1  # selection keeps candidates whose ablation KL on harmless prompts is below
    induce_threshold: float | None = 0.0  # selection keeps candidates whose addition scores above (None: off)
    prune_layer_frac: float = 0.2  # last fraction of layers excluded from selection (Arditi et al.)
    filter_train: bool = True  # keep refused harmful / non-refused harmless train prompts (reference code)
    filter_val: bool = True  # the same filter on the validation split
    filter_threshold: float = 0.0  # refusal score that counts as refused for the filters
    evaluate_excluded: bool = False  # also score candidates in the pruned last layers (costly)
    judge: bool = True  # judge refusal by generation in the evaluation (False: logit scores only)
    judge_only: list[str] | None = None  # "condition:split" rows to judge by generation (None: all)
    conditions: list[str] | None = None  # evaluation conditions (None: baseline, ablation, orthogonalized, addition)
    component_prompts: int | None = None  # test prompts per side for the attribution table (None: all)
    max_new_tokens: int = 24  # tokens generated per prompt for the judge
    plaintext: str | None = "plaintext"  # prompt set for the cross-entropy side effect (None: skip)
    plaintext_n: int = 16  # plain texts for the cross-entropy
    top_neurons: int = 20  # neurons per layer in the attribution table
    batch_size: int = 16  # prompts per forward pass
    n_boot: int = 1000  # bootstrap resamples for the confidence intervals
    progress: bool = True  # show progress bars
    seed: int = 0  # seed of the splits and the bootstrap
    direction_: torch.Tensor | None = field(default=None, init=False, repr=False)  # learned: the selected direction
    layer_: int | None = field(default=None, init=False, repr=False)  # learned: its layer

    def __post_init__(self):
        check_types(self)
        check_fraction(self, "train_frac", "val_frac")
        check(self.train_frac + self.val_frac < 1, f"train_frac + val_frac = {self.train_frac + self.val_frac} "
              "must be < 1 to leave a test split (e.g. --set train_frac=0.5 --set val_frac=0.25)")
        check_layers("layers", self.layers)
        check(self.positions is None or (len(self.positions) > 0 and all(p < 0 for p in self.positions)),
              f"positions={self.positions!r} must be None or negative post-instruction offsets "
              "(e.g. --set positions=-1)")
        check(self.kl_threshold > 0, f"kl_threshold={self.kl_threshold} must be > 0 (e.g. --set kl_threshold=0.1)")
        check_fraction(self, "prune_layer_frac", closed=True)
        check_subset(self, "conditions", CONDITIONS, allow_none=True)
        check(self.judge_only is None or all(
            isinstance(j, str) and j.count(":") == 1 and j.split(":")[0] in CONDITIONS
            and j.split(":")[1] in ("harmful", "harmless") for j in self.judge_only),
            f"judge_only={self.judge_only!r} must be None or 'condition:split' entries such as "
            "baseline:harmful (e.g. --set judge_only=baseline:harmful,ablation:harmful)")
        check_at_least(self, 1, "component_prompts", "max_new_tokens", "plaintext_n", "top_neurons", "batch_size",
                       "n_boot")
        check_at_least(self, 0, "seed")

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if not k.endswith("_")}

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        harmful, harmless = _as_set(harmful, "harmful"), _as_set(harmless, "harmless")
        h_train, h_val, h_test = split_three(harmful, self.train_frac, self.val_frac, self.seed)
        s_train, s_val, s_test = split_three(harmless, self.train_frac, self.val_frac, self.seed)
        kept = {}
        if self.filter_train:
            h_train, s_train = self.filter_refused(model, h_train, s_train, kept, "train")
        if self.filter_val:
            h_val, s_val = self.filter_refused(model, h_val, s_val, kept, "val")
        directions = self.candidate_directions(model, h_train, s_train, store)
        table, rule, baseline = self.score_candidates(model, directions, h_val, s_val)
        best = table[table.selected].iloc[0]
        layer, offset = int(best.layer), int(best.position)
        self.direction_, self.layer_ = directions[(layer, offset)], layer
        plain = _plaintext(self.plaintext, self.plaintext_n, self.seed)
        evaluation = evaluate_direction(
            model, self.direction_, layer, list(h_test), list(s_test), plain, judge=self.judge,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, n_boot=self.n_boot,
            seed=self.seed, judge_only=self.judge_only, progress=self.progress,
            **({"conditions": self.conditions} if self.conditions else {}))
        k = self.component_prompts
        components = direction_components(model, self.direction_, list(h_test)[:k], list(s_test)[:k], store,
                                          top_neurons=self.top_neurons, batch_size=self.batch_size)
        summary = {**_summary(table, evaluation, rule, baseline), **kept}
        figures = {"candidates": candidate_heatmap(table, model.name),
                   "tradeoff": candidate_tradeoff(table, self.kl_threshold, model.name)}
        if self.judge:
            figures["refusal_rates"] = refusal_bars(evaluation, model.name)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"evaluation": evaluation, "components": components, "candidates": table},
                      figures=figures, summary=summary)

    def filter_refused(self, model, harmful, harmless, kept: dict, split: str) -> tuple[PromptSet, PromptSet]:
        """Refused harmful and non-refused harmless prompts of one split; counts go into ``kept``."""
        scores = metrics.refusal_score(model, list(harmful) + list(harmless), batch_size=self.batch_size)
        h_scores, s_scores = scores[:len(harmful)], scores[len(harmful):]
        out = []
        for side, prompts, keep in (("harmful", harmful, h_scores > self.filter_threshold),
                                    ("harmless", harmless, s_scores < self.filter_threshold)):
            chosen = tuple(p for p, k in zip(prompts.prompts, keep.tolist()) if k)
            kept[f"{split}_{side}_kept"] = f"{len(chosen)}/{len(prompts)}"
            if len(chosen) < 2:
                raise ValueError(
                    f"only {len(chosen)} of {len(prompts)} {side} {split} prompts pass the refusal filter "
                    f"(score {'>' if side == 'harmful' else '<'} {self.filter_threshold}): give more prompts, "
                    "change filter_threshold, or turn the filters off with filter_train=False and "
                    "filter_val=False (--set filter_train=false --set filter_val=false)")
            out.append(PromptSet(f"{prompts.name}:filtered", chosen))
        return out[0], out[1]

    def candidate_directions(self, model, harmful, harmless, store) -> dict[tuple[int, int], torch.Tensor]:
        """Difference in means of resid_pre at every (layer, post position), train split (§2.3)."""
        return candidate_directions(model, harmful, harmless, store, batch_size=self.batch_size,
                                    progress=self.progress)

    def score_candidates(self, model, directions, harmful, harmless):
        """Bypass score, KL and induce score per candidate on the val split, then selection (§2.4)."""
        return score_candidates(model, directions, harmful, harmless, layers=self.layers, positions=self.positions,
                                prune_layer_frac=self.prune_layer_frac, evaluate_excluded=self.evaluate_excluded,
                                kl_threshold=self.kl_threshold, induce_threshold=self.induce_threshold,
                                batch_size=self.batch_size, progress=self.progress)


def _as_set(prompts, name) -> PromptSet:
    return prompts if isinstance(prompts, PromptSet) else PromptSet(name, tuple(prompts))


def _plaintext(name, n, seed):
    if not name:
        return None
    from .. import datasets

    return list(datasets.load(name, n=n, seed=seed + 1))


def _summary(table, evaluation, rule, baseline) -> dict:
    best = table[table.selected].iloc[0]
    out = {"selected_layer": int(best.layer), "selected_position": int(best.position), "selection_rule": rule,
           "selected_bypass_score": float(best.bypass_score), "selected_kl": float(best.kl),
           "selected_induce_score": float(best.induce_score), "val_baseline_harmful_score": baseline["harmful"],
           "val_baseline_harmless_score": baseline["harmless"]}
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
    from .. import plots

    fig = plots.heatmap(table, "layer", "position", "bypass_score", center=None, cmap="viridis",
                        title=f"Refusal score on harmful (val) after ablating each candidate, {model_name}")
    ax = fig.axes[0]
    best = table[table.selected].iloc[0]
    cols = sorted(table.position.unique())
    rows = sorted(table.layer.unique())
    ax.scatter([cols.index(best.position)], [rows.index(best.layer)], marker="*", s=160, c="red", label="selected")
    ax.legend(loc="upper right", fontsize=7)
    return fig


def candidate_tradeoff(table: pd.DataFrame, kl_threshold: float, model_name: str):
    """Bypass score against KL on harmless for every scored candidate: what the KL filter costs."""
    import matplotlib.pyplot as plt

    t = table[table.bypass_score.notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(t.kl, t.bypass_score, c=t.layer, cmap="viridis", s=22)
    for r in t.itertuples():
        ax.annotate(f"{r.layer}/{r.position}", (r.kl, r.bypass_score), fontsize=5, alpha=0.7)
    best = t[t.selected]
    ax.scatter(best.kl, best.bypass_score, marker="*", s=200, c="red", label="selected")
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
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
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
