"""Inference-time intervention (Li et al. 2023, "Inference-Time Intervention: Eliciting Truthful
Answers from a Language Model"), with harmful vs harmless as the probed attribute.

1. ``probe_heads``: per attention head, a logistic probe on that head's output (``attn_z`` at the
   last prompt position) trained on the train split and scored on the validation split (§3.1,
   the layer × head heat map of Fig. 2).
2. ``select_heads``: the top-K heads by validation accuracy (§3.2), ties by validation log-loss.
3. ``fit_shifts``: per selected head the mass-mean direction θ (mean harmful − mean harmless of
   its train activations, unit length) and σ, the standard deviation of the train activations
   projected on θ (§3.2, "mass mean shift").
4. ``iti_hooks``: add ``α·σ·θ`` to those heads' ``attn_z``. ``positions="last"`` shifts the last
   position of every forward: the last prompt token at prefill, then every generated token (the
   reference code's ``head_output[:, -1]`` under KV-cached decoding); ``"all"`` shifts every
   position (the reference code's setting for its cross-entropy measurement).

``evaluate_intervention`` measures any list of hooks the way Arditi et al. 2024 do (refusal score,
judged refusal rate with bootstrap CIs, first-token KL on harmless prompts vs the unhooked model,
cross-entropy on plain text), so ITI and direction addition are compared on one footing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.methods import metrics
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.methods.directions import direction_from_pairs, unit
from circuitlab.methods.probes import SOLVERS

__all__ = ["HeadShift", "heldout_probe_accuracy", "probe_heads", "select_heads", "fit_shifts", "iti_hooks",
           "evaluate_intervention", "SHIFT_POSITIONS"]

SHIFT_POSITIONS = ("last", "all")


@dataclass(frozen=True)
class HeadShift:
    """One ITI head: unit mass-mean ``direction`` ``[d_head]`` and ``sigma`` (std of projections)."""

    layer: int
    head: int
    direction: torch.Tensor
    sigma: float


def heldout_probe_accuracy(X_train, y_train, X_val, y_val, *, C: float = 1.0, solver: str = "liblinear",
                           max_iter: int = 1000) -> dict:
    """``train_accuracy``, held-out ``val_accuracy`` and ``val_log_loss`` of the standardised logistic
    probe of ``methods.probes``, fit on ``X_train`` and scored on ``X_val`` (Li et al. 2023 §3.1:
    train / validation split). The log-loss ranks probes that tie on accuracy."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {', '.join(SOLVERS)}")
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    if len(np.unique(y_train)) < 2:
        raise ValueError("the probe needs both classes (harmful and harmless) in its training rows")
    X_train, X_val = np.asarray(X_train, dtype=np.float64), np.asarray(X_val, dtype=np.float64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, solver=solver))
    probe.fit(X_train, y_train)
    return {"train_accuracy": float(probe.score(X_train, y_train)), "val_accuracy": float(probe.score(X_val, y_val)),
            "val_log_loss": float(log_loss(y_val, probe.predict_proba(X_val)[:, 1], labels=[0, 1]))}


def _check_heads(acts: Mapping[int, torch.Tensor], name: str) -> None:
    for layer, a in acts.items():
        if a.dim() != 3:
            raise ValueError(f"{name}[{layer}] must be [n_prompts, n_heads, d_head] head outputs, got "
                             f"shape {tuple(a.shape)}")


def probe_heads(train_harmful: Mapping[int, torch.Tensor], train_harmless: Mapping[int, torch.Tensor],
                val_harmful: Mapping[int, torch.Tensor], val_harmless: Mapping[int, torch.Tensor], *,
                C: float = 1.0, solver: str = "liblinear") -> pd.DataFrame:
    """One row per (layer, head): ``train_accuracy``, ``val_accuracy`` and ``val_log_loss`` of a probe on
    that head's output.

    Each argument maps layer -> ``[n_prompts, n_heads, d_head]`` (``attn_z`` at the last position).
    """
    for name, acts in (("train_harmful", train_harmful), ("train_harmless", train_harmless),
                       ("val_harmful", val_harmful), ("val_harmless", val_harmless)):
        _check_heads(acts, name)
    rows = []
    for layer in sorted(train_harmful):
        th, ts, vh, vs = (a[layer].double().numpy() for a in (train_harmful, train_harmless, val_harmful, val_harmless))
        y_train = np.r_[np.ones(len(th), dtype=int), np.zeros(len(ts), dtype=int)]
        y_val = np.r_[np.ones(len(vh), dtype=int), np.zeros(len(vs), dtype=int)]
        for head in range(th.shape[1]):
            scores = heldout_probe_accuracy(np.r_[th[:, head], ts[:, head]], y_train,
                                            np.r_[vh[:, head], vs[:, head]], y_val, C=C, solver=solver)
            rows.append({"layer": layer, "component": "head", "head": head, "position": -1, **scores})
    return pd.DataFrame(rows)


def select_heads(table: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the highest ``val_accuracy`` (Li et al. 2023 §3.2); ties, common when the
    attribute is easy to read (harmful vs harmless), go to the lower ``val_log_loss`` (a held-out,
    continuous version of the same criterion), then the lower layer and head."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(table):
        raise ValueError(f"k={k!r} must be an int between 1 and the number of probed heads ({len(table)})")
    ranked = table.sort_values(["val_accuracy", "val_log_loss", "layer", "head"],
                               ascending=[False, True, True, True], kind="stable")
    return [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]


def fit_shifts(train_harmful: Mapping[int, torch.Tensor], train_harmless: Mapping[int, torch.Tensor],
               heads: Sequence[tuple[int, int]]) -> list[HeadShift]:
    """Mass-mean direction and σ per head (Li et al. 2023 §3.2) from train head outputs
    (layer -> ``[n, n_heads, d_head]``); σ is the std of both classes' projections on θ."""
    shifts = []
    for layer, head in heads:
        if layer not in train_harmful or layer not in train_harmless:
            raise ValueError(f"no train activations for layer {layer}; read attn_z of every selected head's layer")
        h, s = train_harmful[layer][:, head].double(), train_harmless[layer][:, head].double()
        theta = unit(direction_from_pairs(h, s, "mean", paired=False))
        sigma = float((torch.cat([h, s]).float() @ theta).std(unbiased=False))  # np.std, as the reference code
        shifts.append(HeadShift(layer, head, theta, sigma))
    return shifts


def iti_hooks(model: HookedModel, shifts: Sequence[HeadShift], alpha: float, positions: str = "last") -> list:
    """Hooks adding ``alpha · σ · θ`` to each shifted head's ``attn_z`` (Li et al. 2023 §3.2).

    ``positions``: ``"last"`` (the last position of every forward: the last prompt token, then each
    generated token) or ``"all"``. ``alpha`` > 0 moves toward "harmful" (more refusal), < 0 away.
    """
    if positions not in SHIFT_POSITIONS:
        raise ValueError(f"positions={positions!r} is not one of {', '.join(SHIFT_POSITIONS)}")
    if isinstance(alpha, bool) or not np.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    by_layer: dict[int, list[HeadShift]] = {}
    for s in shifts:
        if not 0 <= s.head < model.n_heads or s.direction.numel() != model.d_head:
            raise ValueError(f"shift for head {s.head} of layer {s.layer} does not fit the model "
                             f"({model.n_heads} heads of width {model.d_head})")
        by_layer.setdefault(s.layer, []).append(s)

    def make(layer_shifts: list[HeadShift]):
        idx = torch.tensor([s.head for s in layer_shifts])
        delta = torch.stack([float(alpha) * s.sigma * s.direction.float() for s in layer_shifts])  # [k, d_head]

        def shift(act, hook):
            out = act.clone()
            d = delta.to(device=act.device, dtype=act.dtype)
            i = idx.to(act.device)
            if positions == "all":
                out[:, :, i] += d
            else:
                out[:, -1, i] += d
            return out

        return shift

    return [(hk.attn_z(layer), make(group)) for layer, group in sorted(by_layer.items())]


def _rate(values, n_boot: int, seed: int) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(values, n_boot, seed)
    return float(values.mean()), low, high


def evaluate_intervention(model: HookedModel, hooks, harmful: Sequence[str], harmless: Sequence[str],
                          plaintext: Sequence[str] | None = None, *, base_harmless: torch.Tensor,
                          ce_hooks=None, judge: bool = True, max_new_tokens: int = 24, batch_size: int = 16,
                          n_boot: int = 1000, seed: int = 0) -> dict:
    """Refusal and side effects of one intervention (``hooks``), as Arditi et al. 2024 measure them.

    ``refusal_rate`` (harmful) and ``over_refusal_rate`` (harmless): greedy generation judged by
    ``metrics.judge_refusals`` (bootstrap 95% CIs); ``refusal_score_*``: the logit refusal score at
    the last prompt position; ``kl_harmless``: mean first-token KL(``base_harmless`` || hooked) on
    ``harmless``; ``cross_entropy`` on ``plaintext`` under ``ce_hooks`` (default: ``hooks``).
    """
    tokens = metrics.refusal_tokens(model)
    out: dict = {}
    for split, prompts in (("harmful", list(harmful)), ("harmless", list(harmless))):
        logits = model.last_logits(prompts, fwd_hooks=hooks, batch_size=batch_size)
        out[f"refusal_score_{split}"] = float(metrics.refusal_score_from_logits(logits, tokens).mean())
        if split == "harmless":
            out["kl_harmless"] = float(metrics.kl_divergence(base_harmless, logits).mean())
        if judge:
            key = "refusal_rate" if split == "harmful" else "over_refusal_rate"
            verdicts = metrics.judge_refusals(model, prompts, max_new_tokens=max_new_tokens, fwd_hooks=hooks,
                                              batch_size=max(batch_size, 32))
            out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = _rate(verdicts, n_boot, seed)
    out["cross_entropy"] = (metrics.cross_entropy(model, list(plaintext), fwd_hooks=hooks if ce_hooks is None
                                                  else ce_hooks, batch_size=batch_size)
                            if plaintext else float("nan"))
    return out
