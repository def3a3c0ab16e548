"""targeted-finetune: train only the located components vs random components vs the full model.

Component-restricted fine-tuning (the seed's proposal, in the spirit of Chen et al. 2024, "Finding
Safety Neurons in LLMs", and Zhao et al. 2024's safety-layer fine-tuning): the chosen neurons'
gate/up rows and down column, heads' q/k/v/o slices, or whole layers are trained with gradient
masks; everything else stays bit-identical. Controls at equal steps: as many random components
(same kinds, so the same number of parameters) and full fine-tuning of every block.

The shipped demo is **hardening**: the targets are short refusals written by the project
(``finetune.REFUSAL_TARGETS``) on harmful training prompts the model currently answers (refusal
score < 0). Measured: refusal on held-out harmful prompts (logit score and generation judge),
over-refusal on harmless prompts, KL on harmless prompts, cross-entropy on plain text, and refusal
under directional ablation (Arditi et al. 2024) with the direction recomputed on each trained model
(the attacker adapts). The model is restored after every variant. A user dataset of (prompt,
target) pairs (csv/jsonl) replaces the demo data; no compliance data ships with the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import datasets, metrics
from ..components import Component, from_table
from ..finetune import (REFUSAL_TARGETS, component_masks, count_trainable, full_masks, load_pairs,
                        random_components, train)
from ..interventions import directional_ablation_hooks
from ..monitor import locate_components, mean_difference, weights_restored
from ..results import Result
from ..store import ActivationStore
from .base import Experiment, register

VARIANTS = ("targeted", "random", "full")


@register("targeted-finetune")
@dataclass
class TargetedFinetune(Experiment):
    """Fine-tune only located components vs random components vs full model at equal steps (hardening demo)."""

    dataset: str | None = None  # csv/jsonl with prompt,target; None: the hardening demo
    components_csv: str | None = None  # a ranking / circuit table (component, layer, neuron, head)
    layers: list[int] | None = None  # train whole blocks instead of located units
    n_neurons: int = 16  # located units when no table / layers are given (diff-ranking on the train split)
    n_heads: int = 4
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 8
    lr: float = 1e-3  # targeted and random components
    full_lr: float = 1e-5  # full fine-tuning (a usual full-model learning rate)
    batch_size: int = 4
    n_train: int = 16  # training pairs (the demo keeps harmful train prompts the model answers)
    n_eval: int = 16  # held-out prompts per set
    n_text: int = 8  # plain texts for cross-entropy
    judge: bool = True
    max_new_tokens: int = 16
    attack_layer: int | None = None  # directional-ablation attack direction's layer (None: n_layers // 2)
    n_attack: int = 24  # train prompts per class the attacker uses for the direction
    seed: int = 0

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        bad = set(self.variants) - set(VARIANTS)
        if bad or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {self.variants}")
        store = store if store is not None else ActivationStore()
        h_train, h_test = harmful.split("train", self.seed), harmful.split("test", self.seed).sample(self.n_eval, self.seed)
        s_train, s_test = harmless.split("train", self.seed), harmless.split("test", self.seed).sample(self.n_eval, self.seed)
        texts = list(datasets.load("plaintext", n=self.n_text, seed=self.seed + 1))
        pairs, answered = self._pairs(model, h_train)
        components = self._components(model, h_train, s_train, store)
        masks = {"targeted": component_masks(model, components),
                 "random": component_masks(model, random_components(model, components, self.seed)),
                 "full": full_masks(model)}
        base = {"harmless_logits": model.last_logits(list(s_test), batch_size=16)}
        rows, info = [], {}
        rows += self._measure(model, "original", h_test, s_test, texts, base, h_train, s_train, store)
        for variant in self.variants:
            with weights_restored(model):
                log = train(model, masks[variant], pairs, steps=self.steps, batch_size=self.batch_size,
                            lr=self.full_lr if variant == "full" else self.lr, seed=self.seed)
                rows += self._measure(model, variant, h_test, s_test, texts, base, h_train, s_train, store)
            info[variant] = log
        table = pd.DataFrame(rows)
        training = pd.DataFrame([{"variant": v, "n_params": log["n_params"], "steps": self.steps,
                                  "lr": self.full_lr if v == "full" else self.lr, "seconds": log["seconds"],
                                  "loss_first": log["losses"][0] if log["losses"] else np.nan,
                                  "loss_last": log["losses"][-1] if log["losses"] else np.nan}
                                 for v, log in info.items()])
        wide = table.assign(key=table["set"] + "_" + table["measure"]).pivot_table(
            index="variant", columns="key", values="value", sort=False).reset_index()
        summary = {"components": ",".join(map(str, components)), "n_train_pairs": len(pairs),
                   "n_train_answered_by_model": answered, "demo": self.dataset is None}
        for r in wide.to_dict("records"):
            summary.update({f"{r['variant']}_{k}": round(float(v), 4) for k, v in r.items() if k != "variant"})
        for r in training.to_dict("records"):
            summary[f"{r['variant']}_train_seconds"] = round(r["seconds"], 2)
            summary[f"{r['variant']}_n_params"] = int(r["n_params"])
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"training": training, "comparison": wide},
                      figures={"finetune": _figure(wide, model.name)}, summary=summary)

    def _pairs(self, model, h_train):
        """User pairs, or the hardening demo: harmful train prompts the model answers → a written refusal."""
        if self.dataset is not None:
            return load_pairs(self.dataset)[: self.n_train], 0
        prompts = list(h_train)
        scores = metrics.refusal_score(model, prompts)
        order = np.argsort(scores.numpy())  # least refusing first
        answered = int((scores < 0).sum())
        chosen = [prompts[i] for i in order[: self.n_train]]
        return [(p, REFUSAL_TARGETS[i % len(REFUSAL_TARGETS)]) for i, p in enumerate(chosen)], answered

    def _components(self, model, h_train, s_train, store) -> list[Component]:
        if self.layers:
            return [Component("resid_pre", l) for l in self.layers]  # whole blocks
        if self.components_csv:
            return from_table(pd.read_csv(self.components_csv))
        return locate_components(model, h_train, s_train, n_neurons=self.n_neurons, n_heads=self.n_heads, store=store)

    def _measure(self, model, variant, h_test, s_test, texts, base, h_train, s_train, store) -> list[dict]:
        """Refusal, over-refusal, KL, cross-entropy, and refusal under an adaptive directional-ablation attack."""
        tokens = metrics.refusal_tokens(model)
        harmful_logits = model.last_logits(list(h_test))
        harmless_logits = model.last_logits(list(s_test))
        out = {("harmful_test", "refusal_score"): metrics.refusal_score_from_logits(harmful_logits, tokens).mean(),
               ("harmless_test", "refusal_score"): metrics.refusal_score_from_logits(harmless_logits, tokens).mean(),
               ("harmless_test", "kl_from_original"): metrics.kl_divergence(base["harmless_logits"], harmless_logits).mean(),
               ("plaintext", "cross_entropy"): metrics.cross_entropy(model, texts)}
        layer = self.attack_layer if self.attack_layer is not None else model.n_layers // 2
        direction = mean_difference(model, list(h_train)[: self.n_attack], list(s_train)[: self.n_attack], layer,
                                    store=store)
        attack = directional_ablation_hooks(model, direction)
        ablated = model.last_logits(list(h_test), fwd_hooks=attack)
        out[("harmful_test", "refusal_score_ablated")] = metrics.refusal_score_from_logits(ablated, tokens).mean()
        if self.judge:
            n = self.max_new_tokens
            out[("harmful_test", "refusal_rate")] = np.mean(metrics.judge_refusals(model, list(h_test), max_new_tokens=n))
            out[("harmless_test", "over_refusal_rate")] = np.mean(metrics.judge_refusals(model, list(s_test), max_new_tokens=n))
            out[("harmful_test", "refusal_rate_ablated")] = np.mean(
                metrics.judge_refusals(model, list(h_test), max_new_tokens=n, fwd_hooks=attack))
        return [{"variant": variant, "set": s, "measure": m, "value": float(v)} for (s, m), v in out.items()]


def _figure(wide: pd.DataFrame, model_name: str):
    import matplotlib.pyplot as plt

    measures = [m for m in ("harmful_test_refusal_rate", "harmful_test_refusal_rate_ablated",
                            "harmless_test_over_refusal_rate", "harmful_test_refusal_score",
                            "harmful_test_refusal_score_ablated", "harmless_test_kl_from_original",
                            "plaintext_cross_entropy") if m in wide.columns]
    fig, axes = plt.subplots(1, len(measures), figsize=(2.6 * len(measures), 3.2))
    for ax, m in zip(np.atleast_1d(axes), measures):
        ax.bar(wide.variant.astype(str), wide[m], color="C0")
        ax.set_title(m, fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(f"Targeted vs random vs full fine-tuning, {model_name}", fontsize=9)
    fig.tight_layout()
    return fig
