"""ablation: what happens to refusal when the top-k ranked units are ablated, against k random ones.

The fragility curve answers "if I ablate the 50 most safety-relevant neurons, what happens?" with
its control: for each k, the top-k units of a diff-ranking (computed on a held-apart half of the
prompts, or read from a ranking csv) are ablated, and so are k random units of the same kind
drawn with the same per-layer counts (several seeds). Each condition records refusal on harmful
prompts (logit score, and the generation judge), over-refusal on harmless prompts, KL of the
harmless next-token distributions against the unablated model, and cross-entropy on plain text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import datasets, metrics, plots
from .. import hooks as hk
from ..components import Component
from ..direction_eval import bootstrap_ci
from ..interventions import ablation_hooks, reference_activations
from ..progress import progress_bar
from ..results import Result
from ..store import ActivationStore
from .base import Experiment, register
from .circuit_map import attribution_estimates
from .diff_ranking import DiffRanking

__all__ = ["Ablation", "attribution_ranking", "halve_split", "matched_random", "top_components"]


def halve_split(prompts, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and cut in two: (ranking half, evaluation half)."""
    items = list(prompts)
    random.Random(seed).shuffle(items)
    cut = len(items) // 2
    if cut < 2:
        raise ValueError(f"need at least 4 prompts per set to rank on one half and evaluate on the other, got {len(items)}")
    return items[:cut], items[cut:]


def top_components(ranking: pd.DataFrame, kind: str, k: int) -> list[Component]:
    """The ``k`` best-ranked units of ``kind`` from a diff-ranking table (``rank`` ascending)."""
    part = ranking[ranking["component"] == kind].sort_values("rank", kind="stable")
    col = "neuron" if kind == "neuron" else "head"
    units = [Component(kind, int(r.layer), int(getattr(r, col))) for r in part.itertuples(index=False)]
    if len(units) < k:
        raise ValueError(f"the ranking has {len(units)} {kind}s, fewer than k={k}; rank with a larger top_k")
    return units[:k]


def matched_random(top: list[Component], width: int, n_layers: int, seed: int) -> list[Component]:
    """``len(top)`` random units of the same kind, none of them in ``top``, with the same count per
    layer as ``top``; where a layer has too few units left, the rest come from the nearest layers."""
    rng = random.Random(seed)
    kind = top[0].kind
    taken = {(c.layer, c.index) for c in top}
    pools = {l: [i for i in range(width) if (l, i) not in taken] for l in range(n_layers)}
    if sum(map(len, pools.values())) < len(top):
        raise ValueError(f"only {sum(map(len, pools.values()))} {kind}s lie outside the top set; "
                         f"a random control of {len(top)} is impossible")
    out = []
    for layer in range(n_layers):
        need = sum(c.layer == layer for c in top)
        for near in sorted(range(n_layers), key=lambda l: (abs(l - layer), l)):
            if need == 0:
                break
            picks = rng.sample(pools[near], min(need, len(pools[near])))
            pools[near] = [i for i in pools[near] if i not in picks]
            out += [Component(kind, near, i) for i in picks]
            need -= len(picks)
    return sorted(out)


def attribution_ranking(model, harmful, harmless, kind: str, store, batch_size: int = 16) -> pd.DataFrame:
    """Every unit of ``kind`` ranked by its attribution-patching estimate (Nanda 2023) of how much
    replacing it by its harmless mean at the post positions lowers the harmful refusal score."""
    hook = hk.mlp_post if kind == "neuron" else hk.attn_z
    names = [hook(l) for l in range(model.n_layers)]
    other = hk.attn_z if kind == "neuron" else hk.mlp_post  # estimates come for both kinds; keep one
    acts = store.get(model, list(harmless), names + [other(l) for l in range(model.n_layers)], "post",
                     batch_size=batch_size, progress=False)
    est = attribution_estimates(model, list(harmful), {n: t.mean(0) for n, t in acts.items()},
                                batch_size=batch_size)[kind]
    layer, index = np.divmod(np.arange(est.numel()), est.shape[1])
    table = pd.DataFrame({"layer": layer, "component": kind, kind: index, "attribution": est.flatten().numpy()})
    table["rank"] = table["attribution"].rank(ascending=False, method="first").astype(int)
    return table.sort_values("rank").reset_index(drop=True)


@register("ablation")
@dataclass
class Ablation(Experiment):
    """Fragility curve: refusal and side effects as top-k ranked units are ablated, vs k random units."""

    kind: str = "neuron"  # neuron | head
    k_grid: list[int] = field(default_factory=lambda: [1, 5, 10, 50])
    method: str = "mean"  # zero | mean | resample (reference = the ranking half of both sets)
    random_seeds: int = 3
    ranking: str | None = None  # csv of a ranking table; None: rank on the held-apart half (rank_by)
    rank_by: str = "effect_size"  # effect_size (diff-ranking's Cohen's d) | attribution (AtP refusal drop)
    judge: bool = True  # generation judge on harmful prompts (top-k and the first random seed)
    judge_harmless: bool = True  # over-refusal judged on harmless prompts under top-k ablation
    max_new_tokens: int = 16
    n_text: int = 16  # plain-text passages for cross-entropy
    batch_size: int = 16
    seed: int = 0

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        if self.kind not in ("neuron", "head"):
            raise ValueError(f"kind={self.kind!r}: use 'neuron' or 'head'")
        grid = sorted({int(k) for k in self.k_grid})
        width = model.d_mlp if self.kind == "neuron" else model.n_heads
        if not grid or grid[0] < 1 or grid[-1] > width * model.n_layers:
            raise ValueError(f"k_grid must hold ints in 1..{width * model.n_layers} for {self.kind}s, got {self.k_grid}")
        store = store if store is not None else ActivationStore()
        rank_h, eval_h = halve_split(harmful, self.seed)
        rank_b, eval_b = halve_split(harmless, self.seed)
        ranking = self._ranking(model, rank_h, rank_b, grid[-1], store)
        reference = None if self.method == "zero" else reference_activations(
            model, [Component(self.kind, l, 0) for l in range(model.n_layers)], rank_h + rank_b, store)
        texts = list(datasets.load("plaintext", split="test", n=self.n_text, seed=self.seed))
        base = self._measure(model, [], eval_h, eval_b, texts, None, judge=self.judge, judge_harmless=self.judge_harmless)
        rows = [dict(selection="baseline", seed=-1, k=0, **base["row"])]
        conditions = []
        for k in grid:
            top = top_components(ranking, self.kind, k)
            conditions.append(("top", -1, k, top))
            for s in range(self.random_seeds):
                conditions.append(("random", s, k, matched_random(top, width, model.n_layers, self.seed * 1000 + s)))
        for selection, s, k, comps in progress_bar(conditions, True, desc=f"ablating {self.kind}s"):
            hooks = ablation_hooks(model, comps, self.method, reference=reference, seed=self.seed)
            judge = self.judge and (selection == "top" or s == 0)
            m = self._measure(model, hooks, eval_h, eval_b, texts, base, judge=judge,
                              judge_harmless=self.judge_harmless and selection == "top")
            rows.append(dict(selection=selection, seed=s, k=k, **m["row"]))
        table = pd.DataFrame(rows)
        table.insert(0, "component", self.kind)
        summary = _summary(table, self.kind)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"ranking_used": ranking.head(grid[-1])},
                      figures={f"fragility_{self.kind}": plots.fragility(table, self.kind, model.name)},
                      summary=summary)

    def _ranking(self, model, rank_h, rank_b, k_max, store) -> pd.DataFrame:
        if self.ranking is not None:
            table = pd.read_csv(self.ranking)
            missing = {"layer", "component", "rank"} - set(table.columns)
            if missing:
                raise ValueError(f"{self.ranking}: not a diff-ranking table (missing columns {sorted(missing)})")
            return table
        if self.rank_by == "attribution":
            return attribution_ranking(model, rank_h, rank_b, self.kind, store, self.batch_size)
        if self.rank_by != "effect_size":
            raise ValueError(f"rank_by={self.rank_by!r}: use 'effect_size' or 'attribution'")
        ranker = DiffRanking(top_k=k_max, neurons=self.kind == "neuron", heads=self.kind == "head",
                             batch_size=self.batch_size, seed=self.seed)
        return ranker.run(model, datasets.PromptSet("rank-harmful", tuple(rank_h)),
                          datasets.PromptSet("rank-harmless", tuple(rank_b)), store=store).table

    def _measure(self, model, hooks, harmful, harmless, texts, base, *, judge: bool, judge_harmless: bool) -> dict:
        """Refusal (score, judge), over-refusal, KL vs ``base`` and cross-entropy under ``hooks``."""
        bs = self.batch_size
        scores = metrics.refusal_score(model, harmful, fwd_hooks=hooks, batch_size=bs).numpy()
        harmless_logits = model.last_logits(harmless, fwd_hooks=hooks, batch_size=bs)
        harmless_scores = metrics.refusal_score_from_logits(harmless_logits, metrics.refusal_tokens(model)).numpy()
        row = {"refusal_score": float(scores.mean()), "harmless_refusal_score": float(harmless_scores.mean())}
        row["refusal_score_ci_low"], row["refusal_score_ci_high"] = bootstrap_ci(scores, seed=self.seed)
        row["kl_harmless"] = 0.0 if base is None else float(
            metrics.kl_divergence(base["harmless_logits"], harmless_logits).mean())
        row["cross_entropy"] = metrics.cross_entropy(model, texts, fwd_hooks=hooks, batch_size=bs)
        row["refusal_rate"] = row["refusal_rate_ci_low"] = row["refusal_rate_ci_high"] = np.nan
        row["over_refusal_rate"] = np.nan
        if judge:
            verdicts = np.array(metrics.judge_refusals(model, harmful, max_new_tokens=self.max_new_tokens,
                                                       fwd_hooks=hooks, batch_size=bs), dtype=float)
            row["refusal_rate"] = float(verdicts.mean())
            row["refusal_rate_ci_low"], row["refusal_rate_ci_high"] = bootstrap_ci(verdicts, seed=self.seed)
        if judge_harmless:
            row["over_refusal_rate"] = float(np.mean(metrics.judge_refusals(
                model, harmless, max_new_tokens=self.max_new_tokens, fwd_hooks=hooks, batch_size=bs)))
        return {"row": row, "harmless_logits": harmless_logits}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _summary(table: pd.DataFrame, kind: str) -> dict:
    """Headline numbers: drop at the largest k (top vs random), and the smallest k that halves refusal."""
    base = table[table.selection == "baseline"].iloc[0]
    measure = "refusal_rate" if not np.isnan(base["refusal_rate"]) else "refusal_score"
    out = {f"baseline_{measure}": float(base[measure]), "kind": kind, "measure": measure}
    top = table[table.selection == "top"].set_index("k")
    rnd = table[table.selection == "random"].groupby("k")[[measure, "kl_harmless", "cross_entropy"]].mean()
    for k in top.index:
        out[f"top{k}_{measure}"] = float(top.loc[k, measure])
        out[f"random{k}_{measure}"] = float(rnd.loc[k, measure]) if k in rnd.index else None
        out[f"top{k}_kl_harmless"] = float(top.loc[k, "kl_harmless"])
    if measure == "refusal_rate":
        halved = top[top[measure] <= base[measure] / 2]
    else:  # without the judge: halve the refusal-token probability, sigmoid(log-odds)
        halved = top[_sigmoid(top[measure]) <= _sigmoid(base[measure]) / 2]
    if not base[measure] > (0 if measure == "refusal_rate" else -np.inf):
        halved = top.iloc[:0]  # nothing to halve: the model does not refuse these prompts
    out["k_to_halve_refusal"] = int(halved.index.min()) if len(halved) else None
    if len(halved):
        k = int(halved.index.min())
        out["kl_at_halving"] = float(top.loc[k, "kl_harmless"])
        out["cross_entropy_at_halving"] = float(top.loc[k, "cross_entropy"])
    out["baseline_cross_entropy"] = float(base["cross_entropy"])
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
