"""Evaluation pieces of the refusal-direction experiment (Arditi et al. 2024, §3-4).

- ``evaluate_direction``: baseline / directional ablation / orthogonalized weights / activation
  addition × harmful / harmless — refusal rate (generation judge, bootstrap 95% CI), refusal
  score (logits), KL on harmless next-token distributions, cross-entropy on plain text.
- ``direction_components``: direct attribution of every head (``z_h W_O^h``), every MLP layer and
  the top MLP neurons onto the unit direction at the last position — which components write it.
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
from .model import HookedModel

__all__ = ["bootstrap_ci", "evaluate_direction", "direction_components", "CONDITIONS"]

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


def _head_readers(model: HookedModel, r_hat: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[n_heads, d_head]``: ``W_O^h`` read back along r̂, so head h writes ``z_h · u_h``."""
    out = []
    for layer in iv._decoder_layers(model.hf_model):
        w = iv._orig(iv._orig(layer.self_attn).o_proj).weight.detach().float().cpu()  # [d_model, heads*d_head]
        out.append((r_hat @ w).view(model.n_heads, model.d_head))
    return out


def _neuron_readers(model: HookedModel, r_hat: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[d_mlp]``: how much one unit of each neuron writes along r̂ (``r̂ · W_down[:, n]``)."""
    return [r_hat @ iv._orig(iv._orig(layer.mlp).down_proj).weight.detach().float().cpu()
            for layer in iv._decoder_layers(model.hf_model)]


def direction_components(model: HookedModel, direction: torch.Tensor, harmful: Sequence[str],
                         harmless: Sequence[str], store=None, *, top_neurons: int = 20,
                         layers: Sequence[int] | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Direct attribution onto the unit direction at the last position, per component (beyond the paper).

    For head h of layer l: ``z_h W_O^h · r̂``; for the MLP of layer l: ``mlp_out · r̂``; for neuron n:
    ``post_n · (W_down[:, n] · r̂)``. Means over harmful and harmless prompts and their difference
    (``attribution_diff``): large positive = the component writes the refusal direction on harmful
    prompts. Heads of a layer sum exactly to that layer's attention output (no o_proj bias).
    """
    from .store import ActivationStore

    store = store if store is not None else ActivationStore()
    r_hat = iv.unit(direction, model.d_model)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    names = [f(l) for l in layers for f in (hk.attn_z, hk.mlp_out, hk.mlp_post)]
    acts = {s: store.get(model, list(p), names, "last", batch_size=batch_size, progress=False)
            for s, p in (("harmful", harmful), ("harmless", harmless))}
    heads, neurons = _head_readers(model, r_hat), _neuron_readers(model, r_hat)
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
