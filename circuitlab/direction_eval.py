"""Selection and evaluation of a refusal direction (Arditi et al. 2024, §2.4 and §3-4).

- ``evaluate_direction``: baseline / directional ablation / orthogonalized weights / activation
  addition × harmful / harmless — refusal rate (generation judge, bootstrap 95% CI), refusal
  score (logits), KL on harmless next-token distributions, cross-entropy on plain text.
- ``direction_components``: direct attribution of every head (``z_h W_O^h``), every MLP layer and
  the top MLP neurons onto the unit direction at the last position — which components write it.
- ``score_candidates`` / ``select_candidate``: the paper's choice among difference-in-means
  candidates (bypass score, KL and induce filters; §2.4, App. C).
- ``bootstrap_ci``: percentile bootstrap of a mean.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import hooks as hk
from . import interventions as iv
from . import metrics
from .directions import unit
from .model import HookedModel
from .progress import progress_bar
from .store import ActivationStore
from .weights import writer_weight

__all__ = ["bootstrap_ci", "evaluate_direction", "direction_components", "select_candidate", "score_candidates",
           "CONDITIONS"]

CONDITIONS = ("baseline", "ablation", "orthogonalized", "addition")


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _measure(model, prompts, hooks, judge, max_new_tokens, batch_size, progress):
    logits = model.last_logits(prompts, fwd_hooks=hooks, batch_size=batch_size, progress=progress)
    # generation pays a per-step cost per batch: bigger batches amortise it
    judged = (metrics.judge_refusals(model, prompts, max_new_tokens=max_new_tokens, fwd_hooks=hooks,
                                     batch_size=max(batch_size, 32), progress=progress) if judge else None)
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


def select_candidate(table: pd.DataFrame, kl_threshold: float, induce_threshold: float | None,
                     baseline_harmful: float) -> tuple[pd.DataFrame, str]:
    """Mark the selected candidate; returns (table, rule used).

    Paper rule: induce_score > ``induce_threshold`` (0 = refusal token likelier than not). If no
    candidate reaches it, fall back to the paper's idea relative to this model's baseline: addition
    must raise harmless prompts at least to the harmful baseline score. If still nothing passes, the
    induce filter is dropped (KL kept); if nothing passes KL either, the eligible candidate with the
    lowest bypass score is taken. ``rule`` names the step used.
    """
    t = table.copy()
    t["passes_kl"] = t["kl"] < kl_threshold
    eligible = ~t["excluded"] & t["bypass_score"].notna()
    rule = f"kl<{kl_threshold} & induce_score>{induce_threshold}"
    t["passes_induce"] = t["induce_score"] > (induce_threshold if induce_threshold is not None else -np.inf)
    if not (eligible & t.passes_kl & t.passes_induce).any() and induce_threshold is not None:
        t["passes_induce"] = t["induce_score"] > baseline_harmful
        rule = f"kl<{kl_threshold} & induce_score>baseline harmful score ({baseline_harmful:.3f}) [fallback]"
    pool = eligible & t.passes_kl & t.passes_induce
    if not pool.any() and (eligible & t.passes_kl).any():
        # KL guards the side effects the user sees, so it is the last filter to give up
        pool, rule = eligible & t.passes_kl, f"kl<{kl_threshold}; no candidate induced refusal [fallback]"
    if not pool.any():
        pool, rule = eligible, "no candidate passed the filters: lowest bypass score among eligible layers [fallback]"
    t["selected"] = False
    t.loc[t.loc[pool, "bypass_score"].idxmin(), "selected"] = True
    return t, rule


def score_candidates(model: HookedModel, directions: dict, harmful: Sequence[str], harmless: Sequence[str], *,
                     layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                     prune_layer_frac: float = 0.2, evaluate_excluded: bool = False, kl_threshold: float = 0.1,
                     induce_threshold: float | None = 0.0, batch_size: int = 16,
                     progress: bool = False) -> tuple[pd.DataFrame, str, dict]:
    """Bypass score, KL and induce score per candidate ``{(layer, offset): direction}`` on validation
    prompts, then ``select_candidate`` (Arditi et al. 2024, §2.4); returns (table, rule, baselines).

    Candidates outside ``layers`` / ``positions`` or in the last ``prune_layer_frac`` of layers
    (unless ``evaluate_excluded``) are listed unscored."""
    harmful, harmless = list(harmful), list(harmless)
    tok = metrics.refusal_tokens(model)
    base = model.last_logits(harmful + harmless, batch_size=batch_size)
    base_scores = metrics.refusal_score_from_logits(base, tok)
    base_harmful, base_harmless = base_scores[:len(harmful)].mean().item(), base_scores[len(harmful):].mean().item()
    cutoff = model.n_layers * (1 - prune_layer_frac)
    layers = set(range(model.n_layers) if layers is None else layers)
    offsets = set(range(-model.n_post, 0) if positions is None else positions)
    post_tokens = model.tokenizer(model.format("zq"), add_special_tokens=False).input_ids[-model.n_post:]
    rows = []
    for (l, o), d in progress_bar(list(directions.items()), progress, desc="candidates"):
        excluded = l >= cutoff
        row = {"layer": l, "component": "direction", "position": o,
               "token": model.tokenizer.decode([post_tokens[o]]), "direction_norm": float(d.norm()),
               "excluded": excluded, "bypass_score": np.nan, "induce_score": np.nan, "kl": np.nan}
        # layer 0 at template tokens: identical embeddings, so a zero difference (nothing to test)
        if l in layers and o in offsets and (evaluate_excluded or not excluded) and d.norm() > 1e-6:
            ablated = model.last_logits(harmful + harmless, batch_size=batch_size,
                                        fwd_hooks=iv.directional_ablation_hooks(model, d))
            added = model.last_logits(harmless, batch_size=batch_size,
                                      fwd_hooks=iv.activation_addition_hooks(model, d, l))
            row["bypass_score"] = metrics.refusal_score_from_logits(ablated[:len(harmful)], tok).mean().item()
            row["kl"] = metrics.kl_divergence(base[len(harmful):], ablated[len(harmful):]).mean().item()
            row["induce_score"] = metrics.refusal_score_from_logits(added, tok).mean().item()
        rows.append(row)
    table = pd.DataFrame(rows)
    if table["bypass_score"].isna().all():
        raise ValueError("no candidate was evaluated: layers/positions select nothing outside the pruned "
                         f"last {prune_layer_frac:.0%} of layers; widen layers= or set evaluate_excluded=True")
    table, rule = select_candidate(table, kl_threshold, induce_threshold, base_harmful)
    table["baseline_harmful_score"], table["baseline_harmless_score"] = base_harmful, base_harmless
    return table, rule, {"harmful": base_harmful, "harmless": base_harmless}
