"""Selection and evaluation of a refusal direction (Arditi et al. 2024, §2.4 and §3-4).

- ``evaluate_direction``: baseline / directional ablation / orthogonalized weights / activation
  addition × harmful / harmless — refusal rate (generation judge, bootstrap 95% CI), refusal
  score (logits), KL on harmless next-token distributions, cross-entropy on plain text.
- ``direction_components``: direct attribution of every head (``z_h W_O^h``), every MLP layer and
  the top MLP neurons onto the unit direction at the last position — which components write it.
- ``score_candidates`` / ``select_candidate``: the paper's choice among difference-in-means
  candidates (bypass score, KL and induce filters; §2.4, App. C), or the lowest bypass score
  within a KL budget (a point of the validation Pareto front); every criterion is its own column.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.methods import interventions as iv
from circuitlab.methods import metrics
from circuitlab.methods.directions import unit
from circuitlab.core.generation import prefill
from circuitlab.methods.heretic_scoring import pareto_front
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.core.model import HookedModel
from circuitlab.core.progress import progress_bar
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import writer_weight

__all__ = ["evaluate_direction", "direction_components", "select_candidate", "score_candidates",
           "last_logits_shared", "pareto_ranks", "candidate_rows", "screens", "score_candidate", "finalists",
           "select_scored", "induce_score", "induce_needed", "CONDITIONS", "SELECTION_STEPS", "INDUCE"]

CONDITIONS = ("baseline", "ablation", "orthogonalized", "addition")
# the steps of select_candidate's rule, in the order they are tried (fallback_step names one)
INDUCE = ("all", "selectable")  # score_candidates: which finalists get an induce score
SELECTION_STEPS = ("paper", "induce_relative_to_baseline", "kl_only", "lowest_bypass", "kl_budget",
                   "kl_budget_unmet_lowest_kl")


def _measure(model, prompts, hooks, judge, max_new_tokens, batch_size, progress):
    # direction hooks act on every position and row alike, so the shared chat-template prefix is exact
    logits = last_logits_shared(model, prompts, hooks, batch_size=batch_size, progress=progress)
    # generation pays a per-step cost per batch: bigger batches amortise it
    judged = (metrics.judge_refusals(model, prompts, max_new_tokens=max_new_tokens, fwd_hooks=hooks,
                                     batch_size=max(batch_size, 32), progress=progress, share_prefix=True)
              if judge else None)
    return logits, judged


def evaluate_direction(model: HookedModel, direction: torch.Tensor, layer: int, harmful: Sequence[str],
                       harmless: Sequence[str], plaintext: Sequence[str] | None = None, *,
                       conditions: Sequence[str] = CONDITIONS, coeff: float = 1.0, judge: bool = True,
                       max_new_tokens: int = 24, batch_size: int = 16, n_boot: int = 1000, seed: int = 0,
                       judge_only: Sequence[str] | None = None, base_harmless: torch.Tensor | None = None,
                       progress: bool = False) -> pd.DataFrame:
    """One row per ``condition`` × ``split`` (Arditi et al. 2024, Fig. 1 and Table 4).

    ``ablation``: the unit direction projected out everywhere; ``orthogonalized``: the same, folded
    into the weights (restored afterwards); ``addition``: ``coeff * direction`` added at
    ``resid_pre(layer)`` at every position. ``kl_harmless`` (KL(baseline || condition) at the
    last position of the harmless prompts) and ``cross_entropy`` (on ``plaintext``) are
    per-condition, repeated on both rows of a condition. ``judge_only`` (e.g. ``["baseline:harmful",
    "ablation:harmful"]``) limits the costly generation judge to those rows; others get NaN rates.
    ``base_harmless``: the unintervened last-position logits of ``harmless`` when the caller already
    has them (several directions on the same prompts); without ``baseline`` in ``conditions`` only
    those logits are computed for the KL, nothing else of the baseline.
    """
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    splits = {"harmful": list(harmful), "harmless": list(harmless)}
    token_ids = metrics.refusal_tokens(model)
    hook_sets = {"baseline": [], "ablation": iv.directional_ablation_hooks(model, direction),
                 "orthogonalized": [], "addition": iv.activation_addition_hooks(model, direction, layer, coeff)}
    if base_harmless is None and "baseline" not in conditions and splits["harmless"]:
        base_harmless = model.last_logits(splits["harmless"], batch_size=batch_size, progress=progress)
    rows = []
    for cond in sorted(conditions, key=lambda c: c != "baseline"):  # baseline first: the KL reference
        hooks = hook_sets[cond]
        ctx = iv.orthogonalized(model, direction) if cond == "orthogonalized" else contextlib.nullcontext()
        with ctx:
            measured = {s: _measure(model, p, hooks, judge and (judge_only is None or f"{cond}:{s}" in judge_only),
                                    max_new_tokens, batch_size, progress)
                        for s, p in splits.items() if p}
            ce = (metrics.cross_entropy(model, list(plaintext), fwd_hooks=hooks, batch_size=batch_size)
                  if plaintext else float("nan"))
        if cond == "baseline":
            base_harmless = measured.get("harmless", (None,))[0]
        kl = (float(metrics.kl_divergence(base_harmless, measured["harmless"][0]).mean())
              if base_harmless is not None and "harmless" in measured else float("nan"))
        for split, (logits, judged) in measured.items():
            scores = metrics.refusal_score_from_logits(logits, token_ids).numpy()
            score_low, score_high = bootstrap_ci(scores, n_boot, seed)
            row = {"condition": cond, "split": split, "n": len(scores), "refusal_score": float(scores.mean()),
                   "refusal_score_ci_low": score_low, "refusal_score_ci_high": score_high,
                   "kl_harmless": kl, "cross_entropy": ce}
            if judge:
                rate = np.asarray(judged if judged is not None else [np.nan], dtype=float)
                low, high = bootstrap_ci(rate, n_boot, seed)
                row.update(refusal_rate=float(rate.mean()), refusal_rate_ci_low=low, refusal_rate_ci_high=high)
            rows.append(row)
    return pd.DataFrame(rows)


def _readers(model: HookedModel, kind: str, r_hat: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, how much one unit writes along r̂: ``[n_heads, d_head]`` for heads (head h writes
    ``z_h · u_h``), ``[d_mlp]`` for neurons (``r̂ · W_down[:, n]``)."""
    out = []
    for l in range(model.n_layers):
        read = r_hat @ writer_weight(model, kind, l).detach().float().cpu()  # [heads*d_head] or [d_mlp]
        out.append(read.view(model.n_heads, model.d_head) if kind == "head" else read)
    return out


def direction_components(model: HookedModel, direction: torch.Tensor, harmful: Sequence[str],
                         harmless: Sequence[str], store=None, *, top_neurons: int = 20,
                         layers: Sequence[int] | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Direct attribution onto the unit direction at the last position, per component (beyond the paper).

    For head h of layer l: ``z_h W_O^h · r̂``; for the MLP of layer l: ``mlp_out · r̂``; for neuron n:
    ``post_n · (W_down[:, n] · r̂)``. Means over harmful and harmless prompts and their difference
    (``attribution_diff``): large positive = the component writes the refusal direction on harmful
    prompts. Heads of a layer sum exactly to that layer's attention output (no o_proj bias).
    """
    store = store if store is not None else ActivationStore()
    r_hat = unit(direction, model.d_model)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    names = [f(l) for l in layers for f in (hk.attn_z, hk.mlp_out, hk.mlp_post)]
    acts = {s: store.get(model, list(p), names, "last", batch_size=batch_size, progress=False)
            for s, p in (("harmful", harmful), ("harmless", harmless))}
    heads, neurons = _readers(model, "head", r_hat), _readers(model, "neuron", r_hat)
    rows = []
    for l in layers:
        mean = {s: {n: acts[s][n][:, 0].mean(0) for n in (hk.attn_z(l), hk.mlp_out(l), hk.mlp_post(l))}
                for s in acts}
        head_attr = {s: (mean[s][hk.attn_z(l)] * heads[l]).sum(-1) for s in acts}  # [heads]
        for h in range(model.n_heads):
            rows.append(_row(l, "head", head_attr["harmful"][h], head_attr["harmless"][h], head=h))
        mlp = {s: float(mean[s][hk.mlp_out(l)] @ r_hat) for s in acts}
        rows.append(_row(l, "mlp_out", mlp["harmful"], mlp["harmless"]))
        neuron_attr = {s: mean[s][hk.mlp_post(l)] * neurons[l] for s in acts}
        diff = neuron_attr["harmful"] - neuron_attr["harmless"]
        for n in diff.abs().topk(min(top_neurons, len(diff))).indices.tolist():
            rows.append(_row(l, "neuron", neuron_attr["harmful"][n], neuron_attr["harmless"][n], neuron=n))
    table = pd.DataFrame(rows)
    table["rank"] = table["attribution_diff"].rank(ascending=False, method="first").astype(int)
    return table.sort_values("rank").reset_index(drop=True)


def _row(layer, component, harmful, harmless, head=None, neuron=None) -> dict:
    harmful, harmless = float(harmful), float(harmless)
    return {"layer": layer, "component": component, "head": head, "neuron": neuron, "position": -1,
            "attribution_harmful": harmful, "attribution_harmless": harmless,
            "attribution_diff": harmful - harmless}



def last_logits_shared(model: HookedModel, prompts: Sequence[str], hooks=(), *, batch_size: int = 32,
                       progress: bool = False, desc: str = "logits") -> torch.Tensor:
    """Last-position logits ``[n, vocab]`` under ``hooks`` that act on every position and row alike
    (directional ablation, addition at every position). Exact: the chat-template prefix common to a
    batch is computed once and reused (``generation.prefill(share_prefix=True)``, ~30 % less CPU
    on the embedded model's 24-token system turn), the rest of each prompt on top of its keys/values."""
    out = torch.empty(len(prompts), model.bridge.cfg.d_vocab)
    with torch.no_grad(), model.hooks(list(hooks)):
        for idx, ids, mask in progress_bar(model.batches(list(prompts), batch_size), progress,
                                           total=-(-len(prompts) // batch_size), desc=desc):
            logits, _, _ = prefill(model.bridge, ids, mask, share_prefix=True)
            out[idx] = logits[:, -1].float().cpu()
    return out


def pareto_ranks(bypass: Sequence[float], kl: Sequence[float]) -> np.ndarray:
    """Non-dominated sorting of candidates on (bypass score, KL), both lower-is-better: 0 = the Pareto
    front, 1 = the front once rank 0 is removed, ... (``heretic_scoring.pareto_front`` per round)."""
    ranks = np.full(len(bypass), -1)
    remaining, rank = list(range(len(bypass))), 0
    while remaining:
        front = {remaining[j] for j in pareto_front([bypass[i] for i in remaining], [kl[i] for i in remaining])}
        ranks[list(front)] = rank
        remaining, rank = [i for i in remaining if i not in front], rank + 1
    return ranks


def _nullable(values: pd.Series, known: pd.Series) -> pd.Series:
    """A boolean column that is NA where the criterion was not measured (or is switched off)."""
    return pd.Series(pd.array([bool(v) if k else pd.NA for v, k in zip(values, known)], dtype="boolean"),
                     index=values.index)


def select_candidate(table: pd.DataFrame, kl_threshold: float, induce_threshold: float | None,
                     baseline_harmful: float, kl_budget: float | None = None) -> tuple[pd.DataFrame, str]:
    """Mark the selected candidate (validation numbers only); returns (table, selection rule as text).

    Eligible: not pruned (``excluded``) and fully scored on the val split (``bypass_score`` set).
    Columns added, each kept to its own definition: ``passes_kl`` (kl < ``kl_threshold``),
    ``passes_induce`` (the paper's: induce_score > ``induce_threshold``; NA when off or unmeasured),
    ``passes_induce_relative`` (induce_score > the val harmful baseline score), ``pareto_front``
    (eligible and not dominated in (bypass_score, kl)), ``selection_rule`` and ``fallback_step``
    (the first step of the rule that had a candidate; the same on every row).

    Without ``kl_budget`` the steps are Arditi et al. 2024 §2.4 and its fallbacks: ``paper`` (passes_kl
    and passes_induce), ``induce_relative_to_baseline`` (passes_kl and passes_induce_relative),
    ``kl_only``, ``lowest_bypass``; each takes the lowest bypass score. With ``kl_budget``:
    ``kl_budget`` (lowest bypass score among kl <= budget: a point of the Pareto front), else
    ``kl_budget_unmet_lowest_kl`` (the front's lowest-KL point). This replaces KL cut-offs picked
    after seeing test numbers.
    """
    t = table.copy()
    eligible = ~t["excluded"].astype(bool) & t["bypass_score"].notna()
    scored = t["induce_score"].notna()
    t["passes_kl"] = t["kl"] < kl_threshold
    t["passes_induce"] = _nullable(t["induce_score"] > (induce_threshold or 0.0), scored & (induce_threshold is not None))
    t["passes_induce_relative"] = _nullable(t["induce_score"] > baseline_harmful, scored)
    front = pareto_ranks(t.loc[eligible, "bypass_score"].tolist(), t.loc[eligible, "kl"].tolist()) == 0
    t["pareto_front"] = False
    t.loc[t.index[eligible][front], "pareto_front"] = True
    eligible_text = "eligible (not pruned, fully scored on val)"
    if kl_budget is not None:
        rule = (f"kl_budget: lowest val bypass_score among {eligible_text} candidates with val kl <= {kl_budget} "
                "(a point of the val Pareto front of bypass_score vs kl); if none, kl_budget_unmet_lowest_kl: "
                "the front's lowest-kl point")
        within = eligible & (t["kl"] <= kl_budget)
        if within.any():
            step, pick = "kl_budget", t.loc[within, "bypass_score"].idxmin()
        else:
            step, pick = "kl_budget_unmet_lowest_kl", t[eligible].sort_values(["kl", "bypass_score"]).index[0]
    else:
        induce = (f" and induce_score > {induce_threshold}" if induce_threshold is not None else
                  " (induce filter off)")
        rule = (f"paper (Arditi et al. 2024 §2.4): lowest val bypass_score among {eligible_text} candidates with "
                f"kl < {kl_threshold}{induce}; fallbacks in order: induce_relative_to_baseline (kl < {kl_threshold} "
                f"and induce_score > val harmful baseline {baseline_harmful:.3f}), kl_only, lowest_bypass")
        kl_ok = eligible & t["passes_kl"]
        steps = [("paper", kl_ok & (t["passes_induce"].fillna(False) if induce_threshold is not None else True)),
                 ("induce_relative_to_baseline", kl_ok & t["passes_induce_relative"].fillna(False)),
                 ("kl_only", kl_ok), ("lowest_bypass", eligible)]
        step, pool = next((s, p.astype(bool)) for s, p in steps if p.astype(bool).any())
        pick = t.loc[pool, "bypass_score"].idxmin()
    t["selected"] = False
    t.loc[pick, "selected"] = True
    t["selection_rule"], t["fallback_step"] = rule, step
    return t, rule


def candidate_rows(model: HookedModel, directions: dict, n_harmful: int, n_harmless: int, *,
                   layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                   prune_layer_frac: float = 0.2, evaluate_excluded: bool = False) -> tuple[list[dict], list[int]]:
    """One unscored row per candidate ``{(layer, offset): direction}`` and the indices of those to score:
    inside ``layers`` / ``positions``, not in the last ``prune_layer_frac`` of layers (unless
    ``evaluate_excluded``), non-zero."""
    cutoff = model.n_layers * (1 - prune_layer_frac)
    layers = set(range(model.n_layers) if layers is None else layers)
    offsets = set(range(-model.n_post, 0) if positions is None else positions)
    post_tokens = model.tokenizer(model.format("zq"), add_special_tokens=False).input_ids[-model.n_post:]
    keys = list(directions)
    rows = [{"layer": l, "component": "direction", "position": o, "token": model.tokenizer.decode([post_tokens[o]]),
             "direction_norm": float(directions[(l, o)].norm()), "excluded": l >= cutoff, "finalist": False,
             "screen_bypass_score": np.nan, "screen_kl": np.nan, "bypass_score": np.nan, "induce_score": np.nan,
             "kl": np.nan, "n_val_harmful": n_harmful, "n_val_harmless": n_harmless} for l, o in keys]
    # layer 0 at template tokens: identical embeddings, so a zero difference (nothing to test)
    todo = [i for i, (l, o) in enumerate(keys) if l in layers and o in offsets
            and (evaluate_excluded or not rows[i]["excluded"]) and directions[(l, o)].norm() > 1e-6]
    if not todo:
        raise ValueError("no candidate was evaluated: layers/positions select nothing outside the pruned "
                         f"last {prune_layer_frac:.0%} of layers; widen layers= or set evaluate_excluded=True")
    return rows, todo


def screens(screen_prompts: int | None, n_harmful: int, n_harmless: int, n_todo: int, n_finalists: int) -> bool:
    """Whether a screening round runs first: k set, below both sides, and more candidates than finalists."""
    return bool(screen_prompts) and screen_prompts < min(n_harmful, n_harmless) and n_todo > n_finalists


def score_candidate(model: HookedModel, direction: torch.Tensor, layer: int, harmful: Sequence[str],
                    harmless: Sequence[str], base_harmless: torch.Tensor, *, screen_prompts: int | None = None,
                    induce: bool = True, batch_size: int = 32) -> dict:
    """One candidate's val measures. Screening (``screen_prompts`` k): ablation on the first k prompts per
    side (``screen_bypass_score``, ``screen_kl``). Otherwise ``bypass_score``, ``kl`` (against
    ``base_harmless``, the unintervened logits of ``harmless``) and, with ``induce``, ``induce_score`` on
    every prompt."""
    harmful, harmless, tok = list(harmful), list(harmless), metrics.refusal_tokens(model)
    ablate = iv.directional_ablation_hooks(model, direction)
    if screen_prompts:
        k = screen_prompts
        logits = last_logits_shared(model, harmful[:k] + harmless[:k], ablate, batch_size=batch_size)
        return {"screen_bypass_score": metrics.refusal_score_from_logits(logits[:k], tok).mean().item(),
                "screen_kl": metrics.kl_divergence(base_harmless[:k], logits[k:]).mean().item()}
    ablated = last_logits_shared(model, harmful + harmless, ablate, batch_size=batch_size)
    out = {"finalist": True,
           "bypass_score": metrics.refusal_score_from_logits(ablated[:len(harmful)], tok).mean().item(),
           "kl": metrics.kl_divergence(base_harmless, ablated[len(harmful):]).mean().item()}
    if induce:
        out["induce_score"] = induce_score(model, direction, layer, harmless, batch_size=batch_size)
    return out


def induce_score(model: HookedModel, direction: torch.Tensor, layer: int, harmless: Sequence[str], *,
                 batch_size: int = 32) -> float:
    """Mean refusal score of ``harmless`` with ``direction`` added at ``resid_pre(layer)``, every position."""
    added = last_logits_shared(model, list(harmless), iv.activation_addition_hooks(model, direction, layer),
                               batch_size=batch_size)
    return metrics.refusal_score_from_logits(added, metrics.refusal_tokens(model)).mean().item()


def induce_needed(kl: float, kl_threshold: float, kl_budget: float | None) -> bool:
    """Whether ``select_candidate`` can read a candidate's induce score: only its KL-passing steps do."""
    return kl_budget is None and kl < kl_threshold


def finalists(rows: list[dict], screened: Sequence[int], n_finalists: int) -> list[int]:
    """The screened candidates on the best whole Pareto fronts of (screen bypass score, screen KL), until
    at least ``n_finalists`` are in."""
    ranks = pareto_ranks([rows[i]["screen_bypass_score"] for i in screened], [rows[i]["screen_kl"] for i in screened])
    last = next(r for r in range(ranks.max() + 1) if (ranks <= r).sum() >= n_finalists)
    return [i for i, r in zip(screened, ranks) if r <= last]


def select_scored(rows: list[dict], baseline: dict, kl_threshold: float, induce_threshold: float | None,
                  kl_budget: float | None) -> tuple[pd.DataFrame, str]:
    """``select_candidate`` on the scored rows, with the val baselines as columns: (table, rule)."""
    table, rule = select_candidate(pd.DataFrame(rows), kl_threshold, induce_threshold, baseline["harmful"], kl_budget)
    table["baseline_harmful_score"], table["baseline_harmless_score"] = baseline["harmful"], baseline["harmless"]
    return table, rule


def score_candidates(model: HookedModel, directions: dict, harmful: Sequence[str], harmless: Sequence[str], *,
                     layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                     prune_layer_frac: float = 0.2, evaluate_excluded: bool = False, kl_threshold: float = 0.1,
                     induce_threshold: float | None = 0.0, kl_budget: float | None = None,
                     screen_prompts: int | None = None, n_finalists: int = 12, induce: str = "all",
                     batch_size: int = 32, progress: bool = False) -> tuple[pd.DataFrame, str, dict]:
    """Bypass score, KL and induce score per candidate ``{(layer, offset): direction}`` on validation
    prompts, then ``select_candidate`` (Arditi et al. 2024, §2.4); returns (table, rule, baselines).

    ``bypass_score``: mean refusal score of ``harmful`` with the direction ablated everywhere; ``kl``:
    mean KL(unintervened || ablated) on ``harmless``; ``induce_score``: mean refusal score of
    ``harmless`` with the direction added at ``resid_pre(layer)``. The unintervened logits are
    computed once. Candidates outside ``layers`` / ``positions`` or in the last ``prune_layer_frac``
    of layers (unless ``evaluate_excluded``) are listed unscored.

    ``screen_prompts`` k (set, and smaller than both sides): a screening round first scores every
    candidate's ablation on the first k prompts per side (``screen_bypass_score``, ``screen_kl``);
    only whole Pareto fronts of those two, best first, until ``n_finalists`` are reached
    (``finalist``), are then scored on all prompts and can be selected. A race, to fit a CPU: the
    selection itself rests on every prompt given. The pieces (``candidate_rows``, ``score_candidate``,
    ``finalists``, ``select_scored``) are public so a sharded run (refusal-direction's units) computes the same.

    ``induce="selectable"`` measures the induce score only where the rule can read it (``induce_needed``:
    no ``kl_budget`` and kl below ``kl_threshold``; NaN elsewhere): the same selection, a third fewer
    forwards per rejected finalist. ``"all"`` measures it for every finalist (the paper's figures).
    """
    if induce not in INDUCE:
        raise ValueError(f"induce={induce!r} must be one of {INDUCE}")
    harmful, harmless = list(harmful), list(harmless)
    nh = len(harmful)
    base = last_logits_shared(model, harmful + harmless, batch_size=batch_size)
    base_scores = metrics.refusal_score_from_logits(base, metrics.refusal_tokens(model))
    baseline = {"harmful": base_scores[:nh].mean().item(), "harmless": base_scores[nh:].mean().item()}
    rows, todo = candidate_rows(model, directions, nh, len(harmless), layers=layers, positions=positions,
                                prune_layer_frac=prune_layer_frac, evaluate_excluded=evaluate_excluded)
    keys = list(directions)

    def score(i: int, k: int | None) -> None:
        lazy = k is None and induce == "selectable"
        rows[i].update(score_candidate(model, directions[keys[i]], keys[i][0], harmful, harmless, base[nh:],
                                       screen_prompts=k, induce=not lazy, batch_size=batch_size))
        if lazy and induce_needed(rows[i]["kl"], kl_threshold, kl_budget):
            rows[i]["induce_score"] = induce_score(model, directions[keys[i]], keys[i][0], harmless,
                                                   batch_size=batch_size)

    if screens(screen_prompts, nh, len(harmless), len(todo), n_finalists):
        k = screen_prompts
        for i in progress_bar(todo, progress, desc=f"screening candidates ({k}+{k} val prompts)"):
            score(i, k)
        todo = finalists(rows, todo, n_finalists)
    for i in progress_bar(todo, progress, desc=f"candidates ({nh}+{len(harmless)} val prompts)"):
        score(i, None)
    table, rule = select_scored(rows, baseline, kl_threshold, induce_threshold, kl_budget)
    return table, rule, baseline
