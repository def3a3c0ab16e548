"""refusal-scores: how strongly the model refuses each prompt, by logits and by generation."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from sklearn.metrics import roc_auc_score

from circuitlab.methods import metrics
from circuitlab.io import plots
from circuitlab.io.results import Result
from circuitlab.experiments.base import Experiment, register
from circuitlab.experiments.checks import check_at_least, check_types

__all__ = ["RefusalScores"]


@register("refusal-scores")
@dataclass
class RefusalScores(Experiment):
    """Refusal score (logit log-odds) and generation-judge verdict per prompt, harmful vs harmless."""

    judge: bool = True  # also generate and judge each completion (False: logit scores only)
    max_new_tokens: int = 24  # tokens generated per prompt for the judge
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # recorded for provenance (scoring is deterministic)

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "max_new_tokens", "batch_size")
        check_at_least(self, 0, "seed")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        rows = []
        for set_name, prompts in (("harmful", harmful), ("harmless", harmless)):
            scores = metrics.refusal_score(model, list(prompts), batch_size=self.batch_size, progress=True)
            judged = (metrics.judge_refusals(model, list(prompts), max_new_tokens=self.max_new_tokens,
                                             batch_size=self.batch_size, progress=True, share_prefix=True)
                      if self.judge else [None] * len(prompts))
            for i, (s, j) in enumerate(zip(scores.tolist(), judged)):
                rows.append({"set": set_name, "prompt_id": i, "refusal_score": s, "judged_refusal": j})
        table = pd.DataFrame(rows)
        summary = _summarise(table)
        fig = plots.score_histogram(
            {s: table.loc[table.set == s, "refusal_score"].to_numpy() for s in ("harmful", "harmless")},
            title=f"Refusal score, {model.name}")
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      figures={"refusal_scores": fig}, summary=summary)


def _summarise(table: pd.DataFrame) -> dict:
    """Means per set, AUROC of harmful-vs-harmless, and score/judge agreement."""
    out = {f"mean_score_{s}": float(table.loc[table.set == s, "refusal_score"].mean()) for s in ("harmful", "harmless")}
    labels = (table.set == "harmful").to_numpy()
    out["auroc_harmful_vs_harmless"] = float(roc_auc_score(labels, table.refusal_score))
    if table.judged_refusal.notna().all():
        judged = table.judged_refusal.astype(bool).to_numpy()
        for s in ("harmful", "harmless"):
            out[f"judge_refusal_rate_{s}"] = float(judged[table.set == s].mean())
        predicted = table.refusal_score.to_numpy() > 0
        out["score_judge_agreement"] = float((predicted == judged).mean())
        if 0 < judged.sum() < len(judged):
            out["score_judge_auroc"] = float(roc_auc_score(judged, table.refusal_score))
    return {k: round(v, 4) for k, v in out.items()}
