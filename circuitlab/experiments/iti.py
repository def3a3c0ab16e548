"""iti: inference-time intervention (Li et al. 2023, "Inference-Time Intervention") on refusal, side by
side with activation addition of the difference-in-means refusal direction at equal KL.

Splits: each set's deterministic 60/20/20 train/val/test split (``PromptSet.split`` with ``seed``),
each part sampled down to ``n_train`` / ``n_val`` / ``n_test`` prompts (None: the whole part).

1. Per head, a logistic probe on ``attn_z`` at the last prompt position, fit on train, scored on
   val (``methods.iti.probe_heads``); the top ``n_heads`` by val accuracy are shifted (ties, common
   here, by val log-loss: ``methods.iti.select_heads``).
2. Per shifted head the mass-mean direction and σ from train (``methods.iti.fit_shifts``).
3. α sweep on the test split (``methods.iti.evaluate_intervention``): refusal rate on harmful,
   over-refusal on harmless, refusal scores, first-token KL on harmless vs the unhooked model, and
   cross-entropy on plain text (shift at every position there, as the reference code does).
   α > 0 shifts toward "harmful": more refusal, a defence.
4. ``compare_addition``: the difference-in-means of ``resid_pre(addition_layer)`` at the last
   position (train) is added at every position with coefficients ``addition_coeffs``; for each α
   the coefficient whose val KL equals ITI's val KL is interpolated on that grid (validation
   only), then evaluated on test like ITI.

Tables: ``table`` = the probe heat map (one row per head, ``selected``); ``sweep`` = one row per
method × strength on test; ``kl_match`` = the val KL grid used for matching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from circuitlab.core import hooks as hk
from circuitlab.io import datasets, plots
from circuitlab.io.datasets import PromptSet
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.methods import interventions as iv
from circuitlab.methods import metrics
from circuitlab.methods.directions import diff_in_means
from circuitlab.methods.iti import SHIFT_POSITIONS, evaluate_intervention, fit_shifts, iti_hooks, probe_heads, \
    select_heads
from circuitlab.methods.probes import SOLVERS
from circuitlab.experiments.base import Experiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_types

__all__ = ["InferenceTimeIntervention", "split_sets", "match_kl"]


def split_sets(prompts, n_train, n_val, n_test, seed: int) -> tuple[PromptSet, PromptSet, PromptSet]:
    """(train, val, test): ``PromptSet.split`` parts, each sampled down to its ``n_*`` (None: whole)."""
    prompts = prompts if isinstance(prompts, PromptSet) else PromptSet("prompts", tuple(prompts))
    if len(prompts) < 5:
        raise ValueError(f"{prompts.name}: need at least 5 prompts for a train/val/test split, got {len(prompts)}")
    return tuple(prompts.split(name, seed).sample(n, seed) for name, n in
                 (("train", n_train), ("val", n_val), ("test", n_test)))


def match_kl(coeffs, kls, target: float) -> tuple[float, bool]:
    """The coefficient whose KL equals ``target``, interpolated (log-log) on a measured grid; with
    whether ``target`` lay inside the grid's KL range (outside: the nearest end is returned)."""
    c, k = np.asarray(coeffs, float), np.maximum(np.asarray(kls, float), 1e-12)
    order = np.argsort(k)
    c, k = c[order], k[order]
    inside = bool(k[0] <= target <= k[-1])
    return float(np.exp(np.interp(np.log(max(target, 1e-12)), np.log(k), np.log(c)))), inside


@register("iti")
@dataclass
class InferenceTimeIntervention(Experiment):
    """Inference-time intervention (Li et al. 2023): probe every head, shift the top-K along their mass-mean direction, sweep alpha."""

    n_heads: int = 4  # K: heads shifted (the top K by validation probe accuracy)
    alphas: list[float] = field(default_factory=lambda: [0.0, 5.0])  # shift strengths α (in units of σ)
    positions: str = "last"  # last (last prompt token + every generated token) or all (every position)
    n_train: int | None = None  # train prompts per side (None: the whole 60% train part)
    n_val: int | None = None  # val prompts per side (None: the whole 20% val part)
    n_test: int | None = None  # test prompts per side (None: the whole 20% test part)
    compare_addition: bool = True  # also run activation addition of the diff-in-means direction at equal KL
    addition_layer: int | None = None  # resid_pre layer of the added direction (None: 40% depth, rounded)
    addition_coeffs: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])  # val grid for KL matching
    judge: bool = True  # judge refusal by generation (False: logit scores only)
    max_new_tokens: int = 24  # tokens generated per prompt for the judge
    plaintext: str | None = "plaintext"  # prompt set for the cross-entropy side effect (None: skip)
    n_text: int = 16  # plain texts for the cross-entropy
    C: float = 1.0  # inverse L2 strength of the head probes
    solver: str = "liblinear"  # scikit-learn solver of the head probes
    batch_size: int = 16  # prompts per forward pass
    n_boot: int = 1000  # bootstrap resamples for the confidence intervals
    seed: int = 0  # seed of the splits and the bootstrap

    def __post_init__(self):
        check_types(self)
        check(len(self.alphas) > 0, "alphas must be a non-empty list of numbers (e.g. --set alphas=0,5)")
        check(len(self.addition_coeffs) > 1 and all(c > 0 for c in self.addition_coeffs),
              f"addition_coeffs={self.addition_coeffs!r} must hold at least 2 positive numbers "
              "(e.g. --set addition_coeffs=0.25,0.5,1,2)")
        check_choice("positions", self.positions, SHIFT_POSITIONS)
        check_choice("solver", self.solver, SOLVERS)
        check(self.C > 0, f"C={self.C} must be > 0 (e.g. --set C=1.0)")
        check_at_least(self, 1, "n_heads", "max_new_tokens", "n_text", "batch_size", "n_boot")
        check_at_least(self, 2, "n_train", "n_val", "n_test")
        check_at_least(self, 0, "seed", "addition_layer")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        h_train, h_val, h_test = split_sets(harmful, self.n_train, self.n_val, self.n_test, self.seed)
        s_train, s_val, s_test = split_sets(harmless, self.n_train, self.n_val, self.n_test, self.seed)
        add_layer = round(0.4 * model.n_layers) if self.addition_layer is None else self.addition_layer
        if add_layer >= model.n_layers:
            raise ValueError(f"addition_layer={add_layer} is out of range for a {model.n_layers}-layer model")
        n_probed = model.n_layers * model.n_heads
        if self.n_heads > n_probed:
            raise ValueError(f"n_heads={self.n_heads} exceeds the model's {n_probed} heads")
        names = [hk.attn_z(l) for l in range(model.n_layers)] + [hk.resid_pre(add_layer)]
        acts = {k: store.get(model, list(p), names, "last", batch_size=self.batch_size, progress=True)
                for k, p in (("th", h_train), ("ts", s_train), ("vh", h_val), ("vs", s_val))}
        z = {k: {l: a[hk.attn_z(l)][:, 0] for l in range(model.n_layers)} for k, a in acts.items()}
        heads = probe_heads(z["th"], z["ts"], z["vh"], z["vs"], C=self.C, solver=self.solver)
        chosen = select_heads(heads, self.n_heads)
        heads["selected"] = [(r.layer, r.head) in chosen for r in heads.itertuples()]
        shifts = fit_shifts(z["th"], z["ts"], chosen)
        plain = list(datasets.load(self.plaintext, n=self.n_text, seed=self.seed + 1)) if self.plaintext else None
        base_val = model.last_logits(list(s_val), batch_size=self.batch_size)
        base_test = model.last_logits(list(s_test), batch_size=self.batch_size)
        ev = dict(base_harmless=base_test, judge=self.judge, max_new_tokens=self.max_new_tokens,
                  batch_size=self.batch_size, n_boot=self.n_boot, seed=self.seed)
        rows, kl_rows = [], []
        for alpha in self.alphas:
            hooks = iti_hooks(model, shifts, alpha, self.positions)
            val_kl = _val_kl(model, hooks, s_val, base_val, self.batch_size)
            kl_rows.append({"method": "iti", "strength": alpha, "val_kl_harmless": val_kl})
            measured = evaluate_intervention(model, hooks, h_test, s_test, plain,
                                             ce_hooks=iti_hooks(model, shifts, alpha, "all"), **ev)
            rows.append({"method": "iti", "strength": alpha, "layer": None, "component": "head",
                         "val_kl_harmless": val_kl, **measured})
        if self.compare_addition:
            direction = diff_in_means(acts["th"][hk.resid_pre(add_layer)][:, 0],
                                      acts["ts"][hk.resid_pre(add_layer)][:, 0])
            grid = [_val_kl(model, iv.activation_addition_hooks(model, direction, add_layer, c), s_val, base_val,
                            self.batch_size) for c in self.addition_coeffs]
            kl_rows += [{"method": "addition", "strength": c, "val_kl_harmless": k}
                        for c, k in zip(self.addition_coeffs, grid)]
            for row in [r for r in rows if r["strength"] != 0]:
                coeff, inside = match_kl(self.addition_coeffs, grid, row["val_kl_harmless"])
                hooks = iv.activation_addition_hooks(model, direction, add_layer, coeff)
                rows.append({"method": "addition", "strength": coeff, "layer": add_layer, "component": "resid_pre",
                             "matched_alpha": row["strength"], "kl_matched_inside_grid": inside,
                             "val_kl_harmless": _val_kl(model, hooks, s_val, base_val, self.batch_size),
                             **evaluate_intervention(model, hooks, h_test, s_test, plain, **ev)})
        sweep = pd.DataFrame(rows)
        sweep["layer"] = pd.array(sweep["layer"], dtype="Int64")
        heads["head"] = heads["head"].astype("Int64")
        sizes = {"n_train": (len(h_train), len(s_train)), "n_val": (len(h_val), len(s_val)),
                 "n_test": (len(h_test), len(s_test))}
        summary = _summary(heads, sweep, chosen, shifts, add_layer, sizes)
        config = self.config(model, harmful=harmful, harmless=harmless)
        figures = {"head_heatmap": plots.heatmap(heads, "layer", "head", "val_accuracy",
                                                 f"Head probe accuracy (val), {model.name}", center=0.5),
                   "alpha_curve": alpha_figure(sweep, model.name)}
        return Result(heads, config, tables={"sweep": sweep, "kl_match": pd.DataFrame(kl_rows)},
                      figures=figures, summary=summary)


def _val_kl(model, hooks, prompts, base, batch_size) -> float:
    """Mean first-token KL(unhooked || hooked) on validation prompts (the matching criterion)."""
    return float(metrics.kl_divergence(base, model.last_logits(list(prompts), fwd_hooks=hooks,
                                                               batch_size=batch_size)).mean())


def _summary(heads, sweep, chosen, shifts, add_layer, sizes) -> dict:
    out = {"selected_heads": [f"L{l}H{h}" for l, h in chosen],
           "selected_val_accuracy": [round(float(heads.loc[(heads["layer"] == l) & (heads["head"] == h), "val_accuracy"]
                                                 .iloc[0]), 4) for l, h in chosen],
           "sigmas": [round(s.sigma, 4) for s in shifts], "addition_layer": add_layer,
           "best_head_val_accuracy": round(float(heads["val_accuracy"].max()), 4), **{k: list(v) for k, v in sizes.items()}}
    for r in sweep.itertuples():
        key = f"{r.method}_{r.strength:g}"
        for m in ("refusal_rate", "over_refusal_rate", "kl_harmless", "cross_entropy"):
            if hasattr(r, m) and pd.notna(getattr(r, m)):
                out[f"{key}_{m}"] = round(float(getattr(r, m)), 4)
    return out


def alpha_figure(sweep: pd.DataFrame, model_name: str):
    """Li et al. 2023 Fig. 5-style α curve: refusal on harmful and over-refusal on harmless vs α, and
    both methods' refusal rate vs test KL (ITI vs direction addition at equal val KL)."""
    from circuitlab.io.plots import subplots

    fig, (a, b) = subplots(1, 2, figsize=(9, 3.6))
    iti = sweep[sweep.method == "iti"].sort_values("strength")
    rate = "refusal_rate" if "refusal_rate" in sweep else "refusal_score_harmful"
    over = "over_refusal_rate" if "over_refusal_rate" in sweep else "refusal_score_harmless"
    a.plot(iti.strength, iti[rate], "o-", label=f"harmful: {rate}")
    a.plot(iti.strength, iti[over], "s--", label=f"harmless: {over}")
    a.set_xlabel("α (shift in units of σ)")
    a.set_title("ITI α sweep (test)")
    a.legend(fontsize=7)
    for method, marker in (("iti", "o-"), ("addition", "^-")):
        part = sweep[sweep.method == method].sort_values("kl_harmless")
        if len(part):
            b.plot(part.kl_harmless, part[rate], marker, label=f"{method}: harmful")
            b.plot(part.kl_harmless, part[over], marker.replace("-", ":"), label=f"{method}: harmless", alpha=0.7)
    b.set_xlabel("first-token KL on harmless (test)")
    b.set_title("ITI vs direction addition")
    b.legend(fontsize=7)
    fig.suptitle(model_name, fontsize=9)
    fig.tight_layout()
    return fig
