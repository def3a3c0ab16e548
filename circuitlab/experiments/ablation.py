"""ablation: what happens to refusal when the top-k ranked units are ablated, against k random ones.

The fragility curve answers "if I ablate the 50 most safety-relevant neurons, what happens?" with
its control: for each k, the top-k units of a ranking (computed on a held-apart half of the
prompts, or read from a ranking csv) are ablated, and so are k random units of the same kind
drawn with the same per-layer counts (``random_seeds`` draws). ``random_at="decisive"`` draws the
random controls only at the k the conclusions rest on (``decisive_ks``: the halving k and the largest
k, known once the top-k curve is scored): a shorter run whose figure has fewer random points.

**Scored everywhere.** Every condition (baseline, and each k for top-k and every random draw) gets
the measures that cost one forward pass of the prompts: the refusal score (log-odds that the next
token opens a refusal, ``metrics.refusal_score``; it ranks prompts like the generation judge, AUROC
0.95 on the embedded model) on harmful prompts and its ``refusal_prob`` = mean over prompts of
sigmoid(score), the refusal-token probability; the same score on harmless prompts; KL of the
harmless next-token distributions against the unablated model. (Under ``random_at="decisive"``
the random controls exist at the decisive k only.)

**Judged where it decides.** The generation judge (greedy decoding + refusal phrases:
``refusal_rate`` on harmful prompts, ``over_refusal_rate`` on harmless ones) costs a decoding per
prompt, so ``judge_at`` says where it runs:

- ``"decisive"`` (default): the points the conclusions rest on: the baseline, top-k at the
  smallest k that halves refusal and at the largest k, and the first random draw at those k;
- ``"all"``: the baseline, top-k and the first random draw at every k;
- ``"none"``: nowhere; the conclusions rest on the score alone.

Over-refusal (harmless prompts, ``judge_harmless``) is judged at the judged top-k points and the
baseline only. The table's ``judged`` column marks the rows with a judged refusal rate.
Cross-entropy on plain text (a forward pass of ``n_text`` passages that shares no prefix) is
measured with the judge (``cross_entropy_at="judged"``, default: the baseline and every judged
point; with ``judge_at="none"`` the baseline only) or at every point (``"all"``); elsewhere it is NaN.

**Halving rule.** The smallest k that halves refusal is read off the score curve: the first top-k
whose ``refusal_prob`` is at most half the baseline's. Halving is taken on the probability, not the
log-odds, since a refusal rate is what halves; a mean of per-prompt probabilities is the
score-side estimate of the fraction of prompts that refuse. The judge runs at that k, and the
summary says whether it agrees (``halving_confirmed_by_judge``) and which judged k first halves
the judged rate (``k_to_halve_refusal_judged``).

**Computed once.** ``run(..., shared=d)``: a dict passed to several runs (e.g. the three rankings of
``make demo``) keeps what does not depend on the ranking (the unablated baseline with its
judged rates, and the attribution estimates, which hold both unit kinds), keyed by everything it
depends on, so a run with other prompts or settings recomputes. The unablated scores and
harmless logits are read from the activation store's final residual (no forward pass when an
earlier experiment cached it), and the mean-ablation reference of both unit kinds is cached in
one pass. Under zero / mean ablation (hooks that treat every position and row alike) the scored
forward passes compute the chat-template prefix a batch shares once
(``direction_eval.last_logits_shared``, exact), harmful and harmless prompts in one length-sorted call.

**Units** (``UnitExperiment``, so ``--ray`` spreads them): ``plan`` computes the ranking, the ablation
reference and the baseline once (shared state); round one scores one grid point (``GridPoint``: top-k
or one random draw at one k) per unit; round two (``next_plan``) judges the points the score curve
made decisive, one per unit, and under ``random_at="decisive"`` scores (and judges) the random draws at
those k; ``merge`` fills the verdicts in and adds those rows. ``run`` is the same rounds in one process.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.io import datasets, plots
from circuitlab.io.datasets import PromptSet
from circuitlab.methods import metrics
from circuitlab.core import hooks as hk
from circuitlab.methods.attribution import mean_patch_estimates
from circuitlab.core.components import Component
from circuitlab.methods.direction_eval import last_logits_shared
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.methods.interventions import ABLATION_METHODS, ablation_hooks, reference_activations
from circuitlab.methods.ranking import rank_components, top_components
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.io.unit_cache import digest
from circuitlab.experiments.base import Plan, UnitExperiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_files, check_types

__all__ = ["Ablation", "GridPoint", "attribution_ranking", "decisive_ks", "halve_split", "halving_k", "matched_random",
           "KINDS", "RANK_BY", "JUDGE_AT", "RANDOM_AT", "CROSS_ENTROPY_AT"]

KINDS = ("neuron", "head")
RANK_BY = ("effect_size", "attribution")
JUDGE_AT = ("decisive", "all", "none")
RANDOM_AT = ("all", "decisive")
CROSS_ENTROPY_AT = ("judged", "all")
_JUDGE_COLUMNS = ["refusal_rate", "refusal_rate_ci_low", "refusal_rate_ci_high", "over_refusal_rate", "judged"]


def _memo(shared: dict | None, key: tuple, compute):
    if shared is None:
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def halve_split(prompts, seed: int) -> tuple[list[str], list[str]]:
    """(ranking half, evaluation half): ``PromptSet.halves`` as lists."""
    prompts = prompts if isinstance(prompts, PromptSet) else PromptSet("prompts", tuple(prompts))
    rank, evaluate = prompts.halves(seed, ("rank", "evaluate"))
    return list(rank), list(evaluate)


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


def attribution_ranking(model, harmful, harmless, kind: str, store, batch_size: int = 16, *,
                        shared: dict | None = None) -> pd.DataFrame:
    """Every unit of ``kind`` ranked by its attribution-patching estimate (Nanda 2023) of how much
    replacing it by its harmless mean at the post positions lowers the harmful refusal score.
    The estimates come for both kinds in one pass; ``shared`` keeps them for the other kind."""
    def estimates():
        names = [f(l) for l in range(model.n_layers) for f in (hk.mlp_post, hk.attn_z)]
        acts = store.get(model, list(harmless), names, "post", batch_size=batch_size, progress=False)
        return mean_patch_estimates(model, list(harmful), {n: t.mean(0) for n, t in acts.items()},
                                    batch_size=batch_size)

    key = ("attribution", digest((model.fingerprint, list(harmful), list(harmless), batch_size)))
    est = _memo(shared, key, estimates)[kind]
    layer, index = np.divmod(np.arange(est.numel()), est.shape[1])
    table = pd.DataFrame({"layer": layer, "component": kind, kind: index, "attribution": est.flatten().numpy()})
    table["rank"] = table["attribution"].rank(ascending=False, method="first").astype(int)
    return table.sort_values("rank").reset_index(drop=True)


def decisive_ks(grid: list[int], k_half: int | None) -> list[int]:
    """The k the conclusions rest on: the largest k of the grid and the k that halves the score (if any)."""
    return sorted({grid[-1]} | ({k_half} if k_half is not None else set()))


def halving_k(table: pd.DataFrame) -> int | None:
    """The score-curve halving rule: the smallest top-k whose ``refusal_prob`` is at most half the baseline's."""
    base = float(table.loc[table.selection == "baseline", "refusal_prob"].iloc[0])
    top = table[table.selection == "top"]
    hit = top[top.refusal_prob <= base / 2]
    return int(hit.k.min()) if len(hit) else None


@dataclass(frozen=True)
class GridPoint:
    """One point of the fragility curve: ``selection`` (top | random) with its draw ``seed`` (-1 for top),
    ``k`` and the units ablated; ``judge`` marks a judge unit (second round) instead of a scored one;
    ``score`` a second-round unit that is also scored (a random control placed at a decisive k)."""

    selection: str
    seed: int
    k: int
    components: tuple[Component, ...]
    judge: bool = False
    judge_harmless: bool = False  # judge units: also judge over-refusal on the harmless prompts
    score: bool = False  # second-round units: also the scored measures (random_at="decisive")

    @property
    def key(self) -> tuple[str, int, int]:
        return self.selection, self.seed, self.k


@register("ablation")
@dataclass
class Ablation(UnitExperiment):
    """Fragility curve: refusal and side effects as top-k ranked units are ablated, vs k random units."""

    kind: str = "neuron"  # neuron | head
    k_grid: list[int] = field(default_factory=lambda: [1, 5, 10, 50])  # numbers of top units ablated
    method: str = "mean"  # zero | mean | resample (reference = the ranking half of both sets)
    random_seeds: int = 3  # random control sets per k
    random_at: str = "all"  # random controls at every k (all), or only at the judge's decisive k (decisive)
    ranking: str | None = None  # csv of a ranking table; None: rank on the held-apart half (rank_by)
    rank_by: str = "effect_size"  # effect_size (diff-ranking's Cohen's d) | attribution (AtP refusal drop)
    judge_at: str = "decisive"  # generation judge: decisive (baseline, k that halves the score, largest k) | all | none
    judge_harmless: bool = True  # also judge over-refusal on harmless prompts (baseline and judged top-k points)
    cross_entropy_at: str = "judged"  # plain-text cross-entropy: judged (baseline + judged points) | all (every point)
    max_new_tokens: int = 16  # tokens generated per prompt for the judge
    n_text: int = 16  # plain-text passages for cross-entropy
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # seed of the ranking/evaluation split, the resample draws and the random controls

    def __post_init__(self):
        check_types(self)
        check_choice("kind", self.kind, KINDS)
        check_choice("method", self.method, ABLATION_METHODS)
        check_choice("rank_by", self.rank_by, RANK_BY)
        check_choice("judge_at", self.judge_at, JUDGE_AT)
        check_choice("cross_entropy_at", self.cross_entropy_at, CROSS_ENTROPY_AT)
        check_choice("random_at", self.random_at, RANDOM_AT)
        check(len(self.k_grid) > 0 and all(k >= 1 for k in self.k_grid),
              f"k_grid={self.k_grid!r} must be a non-empty list of ints >= 1 (e.g. --set k_grid=1,5,10,50)")
        check_at_least(self, 0, "random_seeds", "seed")
        check_files(self, "ranking")
        check_at_least(self, 1, "max_new_tokens", "n_text", "batch_size")

    def run(self, model, harmful, harmless, *, store=None, shared: dict | None = None) -> Result:
        """The fragility curve; ``shared``: a dict shared by several runs (module docstring, "Computed once")."""
        plan = self.plan(model, harmful, harmless, store=store, shared=shared)
        return self.run_plan(model, harmful, harmless, plan, store=store)

    def plan(self, model, harmful, harmless, *, store=None, shared: dict | None = None) -> Plan:
        """Ranking, ablation reference and baseline once; units: one grid point (top-k or a random draw) each."""
        grid = sorted(set(self.k_grid))
        width = self._units_per_layer(model)
        if grid[-1] > width * model.n_layers:
            raise ValueError(f"k_grid must hold ints in 1..{width * model.n_layers} for {self.kind}s, got {self.k_grid}")
        store = store if store is not None else ActivationStore()
        rank_h, eval_h = halve_split(harmful, self.seed)
        rank_b, eval_b = halve_split(harmless, self.seed)
        ranking = self._ranking(model, rank_h, rank_b, grid[-1], store, shared)
        reference = None if self.method == "zero" else self._reference(model, rank_h + rank_b, store)
        base = self.baseline(model, harmful, harmless, store=store, shared=shared)
        points = []
        for k in grid:  # each k's top-k point, then (random_at="all") its random controls
            top = GridPoint("top", -1, k, tuple(top_components(ranking, self.kind, k)))
            points += [top] + (self._random_points(model, [top]) if self.random_at == "all" else [])
        state = {"reference": reference, "harmful": eval_h, "harmless": eval_b, "texts": self._texts(),
                 "base_logits": base["harmless_logits"]}
        return Plan(points, state, {"grid": grid, "ranking": ranking, "base_row": base["row"]},
                    label=f"scoring {self.kind} ablations")

    def _units_per_layer(self, model) -> int:
        """Neurons per MLP layer or heads per attention layer: the width random draws are made in."""
        return model.d_mlp if self.kind == "neuron" else model.n_heads

    def _random_points(self, model, tops: list[GridPoint]) -> list[GridPoint]:
        """Layer-matched random draws (``random_seeds`` each) beside each of the top-k points ``tops``."""
        width = self._units_per_layer(model)
        return [GridPoint("random", s, top.k, tuple(matched_random(list(top.components), width, model.n_layers,
                                                                   self.seed * 1000 + s)))
                for top in tops for s in range(self.random_seeds)]

    def run_unit(self, model, state: dict, unit: "GridPoint") -> dict:
        """A scored row (first round), the judge's verdicts (second round), or both (``unit.score``)."""
        hooks = ablation_hooks(model, list(unit.components), self.method, reference=state["reference"],
                               seed=self.seed)
        out = {}
        if unit.score or not unit.judge:
            texts = state["texts"] if self.cross_entropy_at == "all" else None
            out = self._score(model, hooks, state["harmful"], state["harmless"], texts, state["base_logits"])
        if unit.judge:
            out.update(self._judge(model, hooks, state["harmful"], state["harmless"] if unit.judge_harmless else None))
            if self.cross_entropy_at == "judged":
                out["cross_entropy"] = self._cross_entropy(model, hooks, state["texts"])
        return out

    def next_plan(self, model, harmful, harmless, plan: Plan, outputs: list) -> Plan | None:
        """After scoring: judge the points the score curve makes decisive (``judge_at``), with the random
        controls there scored too under ``random_at="decisive"``; after judging: done."""
        if "table" in plan.context:
            return None
        rows = [dict(selection="baseline", seed=-1, k=0, **plan.context["base_row"])]
        rows += [dict(selection=p.selection, seed=p.seed, k=p.k, **row) for p, row in zip(plan.units, outputs)]
        table = pd.DataFrame(rows)
        grid, k_half = plan.context["grid"], halving_k(table)
        on_harmful, on_harmless = self._judged_points(grid, k_half)
        second = [dataclasses.replace(p, judge=True, judge_harmless=p.key in on_harmless)
                  for p in plan.units if p.key in on_harmful]
        if self.random_at == "decisive":
            ks = decisive_ks(grid, k_half)
            tops = [p for p in plan.units if p.selection == "top" and p.k in ks]
            second += [dataclasses.replace(p, score=True, judge=p.key in on_harmful)
                       for p in self._random_points(model, tops)]
        return Plan(second, plan.state, {**plan.context, "table": table}, label=f"judging {self.kind} ablations")

    def merge(self, model, harmful, harmless, plan: Plan, outputs: list) -> Result:
        table = plan.context["table"].copy()
        added = []
        for point, verdicts in zip(plan.units, outputs):
            if point.score:  # a random control scored in this round: a new row
                added.append(dict(selection=point.selection, seed=point.seed, k=point.k, **verdicts))
                continue
            at = (table.selection == point.selection) & (table.seed == point.seed) & (table.k == point.k)
            for col, value in verdicts.items():
                table.loc[at, col] = value
        if added:  # each k's random rows after its top row, as random_at="all" orders them
            table = pd.concat([table, pd.DataFrame(added)], ignore_index=True).sort_values("k", kind="stable")
            table = table.reset_index(drop=True)
        table.insert(0, "component", self.kind)
        summary = _summary(table, self.kind, self.judge_at)
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"ranking_used": plan.context["ranking"].head(plan.context["grid"][-1])},
                      figures={f"fragility_{self.kind}": plots.fragility(table, self.kind, model.name)},
                      summary=summary)

    def baseline(self, model, harmful, harmless, *, store=None, shared: dict | None = None) -> dict:
        """The unablated measures on the evaluation halves: ``{"row": table row, "harmless_logits": [n, vocab]}``.

        The same for every kind, ranking and method; kept in ``shared`` under a key of what it depends on.
        """
        store = store if store is not None else ActivationStore()
        eval_h, eval_b = halve_split(harmful, self.seed)[1], halve_split(harmless, self.seed)[1]
        judge = self.judge_at != "none"
        texts = self._texts()
        key = ("baseline", digest((model.fingerprint, eval_h, eval_b, texts, self.max_new_tokens, judge,
                                  judge and self.judge_harmless, self.batch_size, self.seed)))
        return _memo(shared, key, lambda: self._measure_baseline(model, eval_h, eval_b, texts, store, judge))

    def _measure_baseline(self, model, eval_h, eval_b, texts, store, judge: bool) -> dict:
        name = hk.final_resid()  # cached at the last position by the circuit map: no forward pass then
        resid = store.get(model, eval_h + eval_b, [name], "last", batch_size=self.batch_size,
                          progress=False)[name][:, -1]
        with torch.no_grad():  # final_logits casts the stored float32 back to the model dtype (lossless)
            logits = torch.cat([model.final_logits(r).float().cpu()
                                for r in resid.split(self.batch_size)])
        scores = metrics.refusal_score_from_logits(logits[:len(eval_h)], metrics.refusal_tokens(model)).numpy()
        base = {"harmless_logits": logits[len(eval_h):]}
        row = self._row(model, scores, base["harmless_logits"], None, [], texts)
        if judge:
            row.update(self._judge(model, [], eval_h, eval_b if self.judge_harmless else None))
        base["row"] = row
        return base

    def _texts(self) -> list[str]:
        return list(datasets.load("plaintext", split="test", n=self.n_text, seed=self.seed))

    def _reference(self, model, prompts, store) -> dict:
        """Mean-ablation reference; both kinds' hooks in one store pass, so a run of the other kind hits."""
        every = [f(l) for l in range(model.n_layers) for f in (hk.mlp_post, hk.attn_z)]
        store.get(model, prompts, every, "mean", batch_size=self.batch_size, progress=False)
        return reference_activations(model, [Component(self.kind, l, 0) for l in range(model.n_layers)], prompts,
                                     store, batch_size=self.batch_size)

    def _ranking(self, model, rank_h, rank_b, k_max, store, shared) -> pd.DataFrame:
        if self.ranking is not None:
            table = pd.read_csv(self.ranking)
            missing = {"layer", "component", "rank"} - set(table.columns)
            if missing:
                raise ValueError(f"{self.ranking}: not a diff-ranking table (missing columns {sorted(missing)})")
            return table
        if self.rank_by == "attribution":
            return attribution_ranking(model, rank_h, rank_b, self.kind, store, self.batch_size, shared=shared)
        full = rank_components(model, rank_h, rank_b, neurons=self.kind == "neuron", heads=self.kind == "head",
                               store=store, batch_size=self.batch_size)
        return full[full["rank"] <= k_max].reset_index(drop=True)

    def _judged_points(self, grid: list[int], k_half: int | None) -> tuple[set, set]:
        """(selection, seed, k) of the conditions judged on harmful prompts, and on harmless prompts."""
        if self.judge_at == "none":
            return set(), set()
        ks = grid if self.judge_at == "all" else decisive_ks(grid, k_half)
        top = {("top", -1, k) for k in ks}
        controls = {("random", 0, k) for k in ks} if self.random_seeds else set()
        return top | controls, (top if self.judge_harmless else set())

    def _score(self, model, hooks, harmful, harmless, texts, base_logits) -> dict:
        """The forward-pass measures under ``hooks`` (refusal score, KL; cross-entropy unless ``texts`` is None)."""
        logits = self._last_logits(model, list(harmful) + list(harmless), hooks)
        scores = metrics.refusal_score_from_logits(logits[:len(harmful)], metrics.refusal_tokens(model)).numpy()
        return self._row(model, scores, logits[len(harmful):], base_logits, hooks, texts)

    def _last_logits(self, model, prompts, hooks):
        # zero / mean ablation act on every position and row alike, so the chat-template prefix a batch
        # shares is computed once (exact); resample draws a reference row per batch row and cannot share it
        if self.method == "resample":
            return model.last_logits(prompts, fwd_hooks=hooks, batch_size=self.batch_size)
        return last_logits_shared(model, prompts, hooks, batch_size=self.batch_size)

    def _row(self, model, scores, harmless_logits, base_logits, hooks, texts) -> dict:
        harmless_scores = metrics.refusal_score_from_logits(harmless_logits, metrics.refusal_tokens(model)).numpy()
        row = {"refusal_score": float(scores.mean()), "refusal_prob": float(_sigmoid(scores).mean()),
               "harmless_refusal_score": float(harmless_scores.mean())}
        row["refusal_score_ci_low"], row["refusal_score_ci_high"] = bootstrap_ci(scores, seed=self.seed)
        row["kl_harmless"] = 0.0 if base_logits is None else float(
            metrics.kl_divergence(base_logits, harmless_logits).mean())
        row["cross_entropy"] = np.nan if texts is None else self._cross_entropy(model, hooks, texts)
        row.update(dict.fromkeys(_JUDGE_COLUMNS[:-1], np.nan), judged=False)
        return row

    def _cross_entropy(self, model, hooks, texts) -> float:
        return metrics.cross_entropy(model, texts, fwd_hooks=hooks, batch_size=self.batch_size)

    def _judge(self, model, hooks, harmful, harmless) -> dict:
        """Judged refusal rate (with CI) on ``harmful``; over-refusal rate on ``harmless`` unless None."""
        kw = dict(max_new_tokens=self.max_new_tokens, fwd_hooks=hooks, batch_size=self.batch_size,
                  share_prefix=self.method != "resample")  # resample's hooks differ per row
        verdicts = np.array(metrics.judge_refusals(model, harmful, **kw), dtype=float)
        out = {"refusal_rate": float(verdicts.mean()), "judged": True}
        out["refusal_rate_ci_low"], out["refusal_rate_ci_high"] = bootstrap_ci(verdicts, seed=self.seed)
        if harmless is not None:
            out["over_refusal_rate"] = float(np.mean(metrics.judge_refusals(model, harmless, **kw)))
        return out


def _summary(table: pd.DataFrame, kind: str, judge_at: str) -> dict:
    """Headline numbers: the score curve at every k (top vs random), the judged rates where judged,
    and the smallest k that halves refusal (score rule, with the judge's verdict there)."""
    base = table[table.selection == "baseline"].iloc[0]
    top = table[table.selection == "top"].set_index("k")
    rnd = table[table.selection == "random"]
    out = {"kind": kind, "measure": "refusal_prob", "judge_at": judge_at,
           "baseline_refusal_prob": float(base.refusal_prob), "baseline_refusal_score": float(base.refusal_score)}
    for k in top.index:
        r = rnd[rnd.k == k]
        out[f"top{k}_refusal_prob"] = float(top.loc[k, "refusal_prob"])
        out[f"random{k}_refusal_prob"] = float(r.refusal_prob.mean()) if len(r) else None
        out[f"top{k}_kl_harmless"] = float(top.loc[k, "kl_harmless"])
    judged = [int(k) for k in top.index if bool(top.loc[k, "judged"])]
    out["judged_k"] = judged
    base_rate = float(base.refusal_rate) if bool(base.judged) else None
    if base_rate is not None:
        out["baseline_refusal_rate"] = base_rate
        out["baseline_over_refusal_rate"] = None if np.isnan(base.over_refusal_rate) else float(base.over_refusal_rate)
    for k in judged:
        r = rnd[(rnd.k == k) & rnd.judged]
        out[f"top{k}_refusal_rate"] = float(top.loc[k, "refusal_rate"])
        out[f"random{k}_refusal_rate"] = float(r.refusal_rate.mean()) if len(r) else None
        over = top.loc[k, "over_refusal_rate"]
        out[f"top{k}_over_refusal_rate"] = None if np.isnan(over) else float(over)
    k_half = halving_k(table)
    out["k_to_halve_refusal"] = k_half
    out["halving_rule"] = "refusal_prob <= baseline/2"
    if k_half is not None:
        out["kl_at_halving"] = float(top.loc[k_half, "kl_harmless"])
        ce = top.loc[k_half, "cross_entropy"]
        out["cross_entropy_at_halving"] = None if np.isnan(ce) else float(ce)  # not measured there (cross_entropy_at)
        if k_half in judged and base_rate is not None:
            out["refusal_rate_at_halving"] = float(top.loc[k_half, "refusal_rate"])
            out["halving_confirmed_by_judge"] = bool(base_rate > 0 and top.loc[k_half, "refusal_rate"] <= base_rate / 2)
    halved = [k for k in judged if base_rate and top.loc[k, "refusal_rate"] <= base_rate / 2]
    out["k_to_halve_refusal_judged"] = min(halved) if halved else None
    out["baseline_cross_entropy"] = float(base.cross_entropy)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
