"""targeted-finetune: train only the located components vs random components vs the full model.

Component-restricted fine-tuning (the seed's proposal, in the spirit of Chen et al. 2024, "Finding
Safety Neurons in LLMs", and Zhao et al. 2024's safety-layer fine-tuning): the chosen neurons'
gate/up rows and down column, heads' q/k/v/o slices, or whole layers are trained with gradient
masks; everything else stays bit-identical. Controls at equal steps: as many random components
(same kinds, so the same number of parameters) and full fine-tuning of every block.

The shipped demo is **hardening**: the targets are short refusals written by the project
(``finetune.REFUSAL_TARGETS``) on harmful training prompts the model currently answers (refusal
score < 0). Against over-refusal every batch also holds harmless train prompts paired with the
original model's own greedy answers (made at run time, never saved), plus a KL-to-original penalty
on them (``finetune.train``). Measured: refusal on held-out harmful prompts (logit score and
generation judge), over-refusal on harmless prompts, KL on harmless prompts, cross-entropy on plain
text, and refusal under directional ablation (Arditi et al. 2024). The attack direction is chosen
as the refusal-direction experiment chooses it (diff-in-means of ``resid_pre`` at post-instruction
positions of ``attack_layers``; the candidate whose ablation lowers the refusal score most on
validation prompts, under its KL / induce filters) on the ORIGINAL model, which the table shows
it breaks; it is then applied to each trained model as is (``_fixed``) and recomputed at the same
layer and position on the trained model (the attacker adapts; ``refusal_*_ablated``). The model is
restored after every variant. A user dataset of (prompt, target) pairs (csv/jsonl) replaces the
demo data; no compliance data ships with the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from circuitlab.io import datasets
from circuitlab.methods import metrics
from circuitlab.core import hooks as hk
from circuitlab.core.components import Component, from_table
from circuitlab.methods.direction_eval import score_candidates
from circuitlab.methods.directions import candidate_directions, diff_in_means
from circuitlab.defence.finetune import (REFUSAL_TARGETS, component_masks, full_masks, greedy_targets,
    load_pairs, random_components, train)
from circuitlab.methods.interventions import directional_ablation_hooks
from circuitlab.monitor import locate_components
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import weights_restored
from circuitlab.experiments.base import Experiment, check, check_layers, register
from circuitlab.experiments.checks import check_at_least, check_files, check_subset, check_types

__all__ = ["TargetedFinetune", "VARIANTS"]

VARIANTS = ("targeted", "random", "full")


@register("targeted-finetune")
@dataclass
class TargetedFinetune(Experiment):
    """Fine-tune only located components vs random components vs full model at equal steps (hardening demo)."""

    dataset: str | None = None  # csv/jsonl with prompt,target; None: the hardening demo
    components_csv: str | None = None  # a ranking / circuit table (component, layer, neuron, head)
    layers: list[int] | None = None  # train whole blocks instead of located units
    n_neurons: int = 16  # located units when no table / layers are given (diff-ranking on the train split)
    n_heads: int = 4  # located heads (with n_neurons)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # any of targeted, random, full
    steps: int = 8  # optimizer steps per variant (equal for all)
    lr: float = 1e-3  # targeted and random components
    full_lr: float = 1e-5  # full fine-tuning (a usual full-model learning rate)
    batch_size: int = 4  # training pairs per step
    n_train: int = 16  # training pairs (the demo keeps harmful train prompts the model answers)
    n_eval: int = 16  # held-out prompts per set
    n_text: int = 8  # plain texts for cross-entropy
    judge: bool = True  # also judge refusal by generation (False: logit scores only)
    max_new_tokens: int = 16  # tokens generated per prompt for the judge
    retain: bool = True  # mix harmless prompts with the original model's own greedy answers into each batch
    n_retain: int = 16  # harmless train prompts in the retain set
    retain_tokens: int = 16  # greedy answer length for the retain set
    retain_weight: float = 1.0  # weight of the retain-set cross-entropy in the loss
    kl_weight: float = 1.0  # KL-to-original penalty on the retain prompts (0: off)
    attack_layers: list[int] | None = None  # candidate layers for the attack direction (None: 50/62/75 % depth)
    attack_positions: list[int] | None = None  # post-instruction offsets (None: [-1], Arditi et al.'s usual pick)
    n_attack: int = 24  # train prompts per class the attacker uses for the direction
    n_attack_val: int = 16  # validation prompts per class for choosing the attack direction
    seed: int = 0  # seed of the splits, the random control and the training order

    def __post_init__(self):
        check_types(self)
        check_subset(self, "variants", VARIANTS)
        check_layers("layers", self.layers)
        check_files(self, "dataset", "components_csv")
        check_layers("attack_layers", self.attack_layers)
        check(self.attack_positions is None or (len(self.attack_positions) > 0
                                                and all(p < 0 for p in self.attack_positions)),
              f"attack_positions={self.attack_positions!r} must be None or negative post-instruction offsets "
              "(e.g. --set attack_positions=-1)")
        check(self.lr > 0 and self.full_lr > 0, f"lr={self.lr} and full_lr={self.full_lr} must be > 0 "
              "(e.g. --set lr=0.001 --set full_lr=1e-5)")
        check_at_least(self, 0, "n_neurons", "n_heads", "steps", "retain_weight", "kl_weight", "seed")
        check_at_least(self, 1, "batch_size", "n_train", "n_eval", "n_text", "max_new_tokens", "n_retain",
                       "retain_tokens")
        check_at_least(self, 2, "n_attack", "n_attack_val")
        check(bool(self.layers or self.components_csv) or self.n_neurons + self.n_heads > 0,
              "n_neurons and n_heads are both 0 and no layers or components_csv are given: nothing to train "
              "(e.g. --set n_neurons=16)")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        h_train, h_test = harmful.split("train", self.seed), harmful.split("test", self.seed).sample(self.n_eval, self.seed)
        s_train, s_test = harmless.split("train", self.seed), harmless.split("test", self.seed).sample(self.n_eval, self.seed)
        texts = list(datasets.load("plaintext", n=self.n_text, seed=self.seed + 1))
        pairs, answered = self._pairs(model, h_train)
        components = self._components(model, h_train, s_train, store)
        control = random_components(model, components, self.seed)
        masks = {"targeted": component_masks(model, components), "random": component_masks(model, control),
                 "full": full_masks(model)}
        # the original model's own answers on harmless train prompts (kept in memory only)
        retain = greedy_targets(model, list(s_train)[: self.n_retain], self.retain_tokens) if self.retain else []
        attack, candidates = self._attack(model, h_train, s_train, harmful, harmless, store)
        base = {"harmless_logits": model.last_logits(list(s_test), batch_size=16)}
        rows, info = [], {}
        rows += self._measure(model, "original", h_test, s_test, texts, base, h_train, s_train, attack)
        for variant in self.variants:
            with weights_restored(model):
                log = train(model, masks[variant], pairs, steps=self.steps, batch_size=self.batch_size,
                            lr=self.full_lr if variant == "full" else self.lr, seed=self.seed, retain=retain,
                            retain_per_batch=self.batch_size, retain_weight=self.retain_weight,
                            kl_weight=self.kl_weight if retain else 0.0)
                rows += self._measure(model, variant, h_test, s_test, texts, base, h_train, s_train, attack)
            info[variant] = log
        table = pd.DataFrame(rows)
        training = pd.DataFrame([{"variant": v, "n_params": log["n_params"], "steps": self.steps,
                                  "lr": self.full_lr if v == "full" else self.lr, "seconds": log["seconds"],
                                  "n_retain": len(retain), "kl_weight": self.kl_weight if retain else 0.0,
                                  **{f"{k}_{at}": log[k][i] if log[k] else np.nan
                                     for k in ("losses", "target_loss", "retain_loss", "kl")
                                     for at, i in (("first", 0), ("last", -1))}}
                                 for v, log in info.items()])
        wide = table.assign(key=table["set"] + "_" + table["measure"]).pivot_table(
            index="variant", columns="key", values="value", sort=False).reset_index()
        chosen = candidates[candidates.selected].iloc[0]
        summary = {"components": ",".join(map(str, components)), "random_components": ",".join(map(str, control)),
                   "n_train_pairs": len(pairs), "n_retain_pairs": len(retain),
                   "n_train_answered_by_model": answered, "demo": self.dataset is None,
                   "attack_layer": int(chosen.layer), "attack_position": int(chosen.position),
                   "attack_val_bypass_score": round(float(chosen.bypass_score), 4),
                   "attack_val_baseline_score": round(float(chosen.baseline_harmful_score), 4)}
        for r in wide.to_dict("records"):
            summary.update({f"{r['variant']}_{k}": round(float(v), 4) for k, v in r.items() if k != "variant"})
        for r in training.to_dict("records"):
            summary[f"{r['variant']}_train_seconds"] = round(r["seconds"], 2)
            summary[f"{r['variant']}_n_params"] = int(r["n_params"])
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"training": training, "comparison": wide, "attack_candidates": candidates},
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

    def _attack(self, model, h_train, s_train, harmful, harmless, store):
        """The attack direction on the original model, chosen as the refusal-direction experiment chooses it."""
        layers = self.attack_layers or sorted({int(model.n_layers * f) for f in (0.5, 0.625, 0.75)})
        positions = self.attack_positions or [-1]
        bad = [o for o in positions if not -model.n_post <= o < 0]
        if bad:
            raise ValueError(f"attack_positions must be post-instruction offsets in -{model.n_post}..-1, got {bad}")
        n = self.n_attack
        directions = candidate_directions(model, list(h_train)[:n], list(s_train)[:n], store)
        directions = {k: d for k, d in directions.items() if k[0] in layers and k[1] in positions}
        h_val = harmful.split("val", self.seed).sample(self.n_attack_val, self.seed)
        s_val = harmless.split("val", self.seed).sample(self.n_attack_val, self.seed)
        table, rule, _ = score_candidates(model, directions, h_val, s_val, layers=layers, positions=positions,
                                          prune_layer_frac=0.0)
        best = table[table.selected].iloc[0]
        key = (int(best.layer), int(best.position))
        table["selection_rule"] = rule
        return {"layer": key[0], "position": key[1], "direction": directions[key]}, table

    def _adapted_direction(self, model, attack, h_train, s_train):
        """The attacker recomputes diff-in-means at the chosen layer and position on the current weights."""
        name, n = hk.resid_pre(attack["layer"]), self.n_attack
        acts = [model.run_with_cache(list(p)[:n], [name], [attack["position"]])[name][:, 0] for p in (h_train, s_train)]
        return diff_in_means(*acts)

    def _measure(self, model, variant, h_test, s_test, texts, base, h_train, s_train, attack) -> list[dict]:
        """Refusal, over-refusal, KL, cross-entropy, and refusal under the directional-ablation attack."""
        tokens = metrics.refusal_tokens(model)
        harmful_logits = model.last_logits(list(h_test))
        harmless_logits = model.last_logits(list(s_test))
        out = {("harmful_test", "refusal_score"): metrics.refusal_score_from_logits(harmful_logits, tokens).mean(),
               ("harmless_test", "refusal_score"): metrics.refusal_score_from_logits(harmless_logits, tokens).mean(),
               ("harmless_test", "kl_from_original"): metrics.kl_divergence(base["harmless_logits"], harmless_logits).mean(),
               ("plaintext", "cross_entropy"): metrics.cross_entropy(model, texts)}
        fixed = directional_ablation_hooks(model, attack["direction"])
        hooks = {"": fixed}
        if variant != "original":  # on the original model the adapted direction is the fixed one
            hooks = {"": directional_ablation_hooks(model, self._adapted_direction(model, attack, h_train, s_train)),
                     "_fixed": fixed}
        for suffix, attack_hooks in hooks.items():
            ablated = model.last_logits(list(h_test), fwd_hooks=attack_hooks)
            out[("harmful_test", "refusal_score_ablated" + suffix)] = metrics.refusal_score_from_logits(
                ablated, tokens).mean()
        if self.judge:
            n = self.max_new_tokens
            out[("harmful_test", "refusal_rate")] = np.mean(metrics.judge_refusals(model, list(h_test), max_new_tokens=n))
            out[("harmless_test", "over_refusal_rate")] = np.mean(metrics.judge_refusals(model, list(s_test), max_new_tokens=n))
            for suffix, attack_hooks in hooks.items():
                out[("harmful_test", "refusal_rate_ablated" + suffix)] = np.mean(
                    metrics.judge_refusals(model, list(h_test), max_new_tokens=n, fwd_hooks=attack_hooks))
        if variant == "original":  # one column set for every row: the fixed attack is the adapted one here
            for key in [k for k in out if k[1].startswith("refusal_") and k[1].endswith("_ablated")]:
                out[(key[0], key[1] + "_fixed")] = out[key]
        return [{"variant": variant, "set": s, "measure": m, "value": float(v)} for (s, m), v in out.items()]


def _figure(wide: pd.DataFrame, model_name: str):
    from circuitlab.io.plots import subplots

    measures = [m for m in ("harmful_test_refusal_rate", "harmful_test_refusal_rate_ablated",
                            "harmful_test_refusal_rate_ablated_fixed", "harmless_test_over_refusal_rate", "harmful_test_refusal_score",
                            "harmful_test_refusal_score_ablated", "harmless_test_kl_from_original",
                            "plaintext_cross_entropy") if m in wide.columns]
    fig, axes = subplots(1, len(measures), figsize=(2.6 * len(measures), 3.2))
    for ax, m in zip(np.atleast_1d(axes), measures):
        ax.bar(wide.variant.astype(str), wide[m], color="C0")
        ax.set_title(m, fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(f"Targeted vs random vs full fine-tuning, {model_name}", fontsize=9)
    fig.tight_layout()
    return fig
