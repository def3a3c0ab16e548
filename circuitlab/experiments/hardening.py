"""robust-hardening: does hardened refusal survive attacks recomputed on the hardened model?

Hardening as in ``targeted-finetune`` (refusals written by the project on harmful train prompts the
model answers; a retain set of the model's own harmless answers + KL against over-refusal; no
compliance data), in two modes at equal steps: ``plain`` and ``adversarial`` — ReFAT (Yu et al. 2024,
"Robust LLM Safeguarding via Refusal Feature Adversarial Training"): the refusal direction is
recomputed on the weights being trained every ``refresh_every`` steps and ablated on the hardening
rows (``adversaries.RefusalAblationAdversary``). Parameters trained: located components (``targeted``),
random components with exactly as many parameters (``random``), every block (``full``).

A third mode, ``distributed`` (DeepRefusal, arXiv 2509.15202): a random member of the refusal subspace
(k <= ``max_k`` directions at random layers × offsets) is ablated at every step
(``adversaries.RandomSubspaceAdversary``). ``targets="extended"``: the hardening targets are the project's
multi-sentence refusals (extended refusal, Abu Shairah et al. 2025; ``finetune.extended_refusals``).
A fourth, ``rerouting`` (Circuit Breakers, Zou et al. 2024): the plain hardening loss plus representation
rerouting of the harmful prompts and retention of the harmless ones at ``reroute_layers``
(``defence.rerouting``); ``rerouting_reading`` records the RepE reading accuracy (LAT vector, Zou et al.
2023; train threshold, validation prompts) of refusal at those layers on the original.
A fifth, ``recovery`` (Qi et al. 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens
Deep"): plain hardening where each hardening row, with chance ``recovery_prob``, starts its assistant turn
with one of the project's harmless affirmative openers (``finetune.prefill_openers``) and learns the refusal
after it; the prefill attack's opener is held out of that list, so the attack stays a test.
A sixth, ``redundant`` (redundant circuits): every step ablates all refusal mechanisms but one (the top
``n_mechanism_units`` attribution-ranked units, the recomputed top direction), the kept one drawn at
random, so each must carry refusal alone (``defence.redundant.MechanismAdversary``). A seventh, ``joint``:
the same two mechanisms ablated together at every step, so refusal must be learnt beyond both. Remedies
combine with ``+`` (``distributed+recovery``: one adversary at most; ``defence.modes``).

Every model then faces the attack suite of ``circuitlab.defence.attacks`` (``suite``; see that module:
strongest direction, rank-k subspace ablation for k in ``n_dirs``, optimised abliteration with
``abliteration_trials`` seeded Optuna trials, top-k units, orthogonalization, prefill), all recomputed on its
own weights; ``comparison`` reports ``refusal_worst`` / ``worst_attack`` and the removal cost at that attack
(``removal_kl`` to the ORIGINAL's harmless outputs, ``removal_cross_entropy``, ``removal_over_refusal``),
and ``entangled`` = removing this model's refusal costs more KL than removing the original's. The
``redundancy`` table: with all but one mechanism (top units, top direction) ablated, does that one alone
keep refusal (``attacks.redundancy``)? The direction attack's rule, the distribution curves and the
comparison's columns: docs/guide/robust_safety.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.io import datasets
from circuitlab.methods import metrics
from circuitlab import graph as eg
from circuitlab.core import hooks as hk
from circuitlab.core.components import from_table
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.defence.attacks import (ATTACK_RULES, adaptive_direction_attack, attribution_units, ranked_keys,
    redundancy, run_attacks, subspace_hooks)
from circuitlab.defence.adversaries import RandomSubspaceAdversary, RefusalAblationAdversary
from circuitlab.defence.finetune import (OPTIMIZERS, TARGET_STYLES, component_masks, full_masks, greedy_targets,
    load_pairs, prefill_openers, random_components, refusal_targets, train)
from circuitlab.defence.modes import ADVERSARY_MODES, KEYED_ADVERSARY_MODES, MODES, check_modes, mode_parts
from circuitlab.defence import report
from circuitlab.defence.redundant import MechanismAdversary
from circuitlab.defence.report import ATTACKS, SUITE
from circuitlab.defence.rerouting import Rerouting, default_layers
from circuitlab.methods.directions import direction_from_pairs, projection_threshold, reading_accuracy
from circuitlab.methods.interventions import ablation_hooks, directional_ablation_hooks, reference_activations
from circuitlab.monitor import locate_components
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import weights_restored
from circuitlab.experiments.base import Experiment, check, check_choice, check_layers, get, register
from circuitlab.experiments.checks import (check_at_least, check_files, check_fraction, check_prompt_sets, check_subset,
    check_types)
from circuitlab.methods.pairs import make_pairs

# adaptive_direction_attack, attribution_units, subspace_hooks: re-exported from defence.attacks (their home)
__all__ = ["RobustHardening", "adaptive_direction_attack", "attribution_units", "subspace_hooks", "MODES",
           "VARIANTS", "ATTACKS", "SUITE", "ATTACK_RULES"]

VARIANTS = ("targeted", "random", "full")


@register("robust-hardening")
@dataclass
class RobustHardening(Experiment):
    """Plain vs adversarial (ReFAT) hardening of located / random / all parameters, under adaptive attacks."""

    dataset: str | None = None  # csv/jsonl with prompt,target; None: the refusal hardening demo
    components_csv: str | None = None  # a ranking / circuit table to train (None: diff-ranking top units)
    n_neurons: int = 16  # located neurons (diff-ranking on the train split)
    n_heads: int = 4  # located heads (random control: fewer if the key/value groups do not allow it, noted)
    variants: list[str] = field(default_factory=lambda: ["targeted"])  # any of targeted, random, full
    modes: list[str] = field(default_factory=lambda: list(MODES))  # plain, adversarial (ReFAT), distributed (DeepRefusal), redundant (all mechanisms but one ablated), joint (all ablated), rerouting (Circuit Breakers), recovery (Qi et al. 2025); combine with + (e.g. distributed+recovery)
    targets: str = "short"  # hardening targets: short refusals or extended (multi-sentence) refusals
    suite: list[str] = field(default_factory=lambda: list(SUITE))  # attacks every model faces (defence.attacks)
    abliteration_trials: int = 4  # optimised abliteration: Optuna trials (Heretic's kernel family, seeded; CPU-sized)
    max_k: int = 8  # distributed: most directions ablated together per step
    n_mechanism_units: int = 16  # redundant, joint: top attribution-ranked units that form the unit mechanism
    reroute_layers: list[int] | None = None  # rerouting: resid_pre layers (None: 1/3 and 2/3 depth, as the paper's 10, 20 of 32)
    reroute_alpha: float = 10.0  # rerouting: the loss weight alpha of the paper's schedule
    recovery_prob: float = 0.5  # recovery: chance a hardening row starts with an affirmative opener before its refusal
    steps: int = 16  # optimizer steps per model (equal for all)
    lr: float = 1e-3  # targeted and random components
    full_lr: float = 1e-5  # all parameters
    optimizer: str = "adam"  # adam | adam8bit | adafactor | sgd (finetune.make_optimizer)
    batch_size: int = 4  # hardening pairs per step (plus as many retain pairs)
    n_train: int = 16  # hardening pairs (the demo: harmful train prompts the model refuses least)
    retain: bool = True  # mix the original model's own harmless answers into every batch
    n_retain: int = 16  # harmless train prompts in the retain set
    retain_tokens: int = 16  # greedy answer length for the retain set
    kl_weight: float = 1.0  # KL-to-original penalty on the retain prompts (0: off)
    refresh_every: int = 4  # adversarial: recompute the refusal direction every this many steps
    adv_prob: float = 0.5  # adversarial: chance a hardening row is ablated (1.0: harmful rows never keep it)
    adv_directions: int = 1  # adversarial: ablate the span of the original's best this-many candidates
    n_adv: int = 16  # prompts per class the adversary's direction is computed on (train split)
    attack_layers: list[int] | None = None  # candidate layers of the direction attack (None: all)
    attack_positions: list[int] | None = None  # post-instruction offsets (None: all)
    prune_layer_frac: float = 0.2  # skip candidates in the last fraction of layers (Arditi et al.)
    attack_rule: str = "strongest"  # the direction attack's pick: strongest (lowest val bypass, any KL) | arditi
    attack_screen: int | None = None  # screen every attack candidate on this many val prompts per side first (None: off)
    n_attack: int = 16  # train prompts per class for the attacks' directions and unit ranking
    n_val: int = 8  # validation prompts per class for choosing the attack direction
    k_grid: list[int] = field(default_factory=lambda: [1, 4, 16])  # top units ablated; the largest is the attack
    n_dirs: list[int] = field(default_factory=lambda: [1, 2, 4])  # ranks k of the rank-k subspace attack
    n_keys: int = 8  # rank-k: the best (layer, offset) candidates whose activations span the subspace
    edge_fraction: float | None = None  # edge circuit of this share of the graph (EAP-IG, top-n): its faithfulness (None: off)
    n_edge_pairs: int = 8  # equal-length pairs (padded) to score edges on (train) and to measure faithfulness on (test)
    n_eval: int = 8  # held-out test prompts per class
    eval_split: str = "test"  # measure on test, or on the val prompts the attacks do not choose on (for choosing settings)
    n_text: int = 4  # plain texts for cross-entropy
    benign: str | None = "sensitive-benign"  # prompt set for over-refusal on benign sensitive questions (None: skip)
    n_benign: int = 16  # prompts of that set judged per model
    judge: bool = True  # judge refusal by generation too (False: logit measures only)
    max_new_tokens: int = 8  # generated tokens per prompt for the judge
    n_boot: int = 1000  # bootstrap resamples for the CIs
    batch_size_eval: int = 16  # prompts per forward pass when measuring
    seed: int = 0  # splits, random control, training order, adversary draws
    progress: bool = True  # print a line per model trained and per attack

    def __post_init__(self):
        check_types(self)
        check_subset(self, "variants", VARIANTS)
        try:
            check_modes(self.modes)
        except ValueError as err:
            check(False, f"{err} (e.g. --set modes=plain,distributed+recovery)")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("attack_rule", self.attack_rule, ATTACK_RULES)
        check_choice("targets", self.targets, TARGET_STYLES)
        check_choice("eval_split", self.eval_split, ("test", "val"))
        check_subset(self, "suite", SUITE)
        check_at_least(self, 1, "abliteration_trials", "max_k", "n_keys")
        check_files(self, "dataset", "components_csv")
        check_prompt_sets(self, "benign")
        check_layers("attack_layers", self.attack_layers)
        check_layers("reroute_layers", self.reroute_layers)
        check(self.reroute_alpha > 0, f"reroute_alpha={self.reroute_alpha} must be > 0 (e.g. --set reroute_alpha=10)")
        positions = self.attack_positions
        check(positions is None or (len(positions) > 0 and all(p < 0 for p in positions)),
              f"attack_positions={positions!r} must be None or negative offsets (e.g. --set attack_positions=-1)")
        check(self.lr > 0 and self.full_lr > 0,
              f"lr={self.lr} and full_lr={self.full_lr} must be > 0 (e.g. --set lr=0.001)")
        check_fraction(self, "adv_prob", closed=True)
        check(self.adv_prob > 0, f"adv_prob={self.adv_prob} must be > 0 (e.g. --set adv_prob=0.5)")
        check_fraction(self, "recovery_prob", closed=True)
        check(self.recovery_prob > 0, f"recovery_prob={self.recovery_prob} must be > 0 (e.g. --set recovery_prob=0.5)")
        check(0 <= self.prune_layer_frac < 1, f"prune_layer_frac={self.prune_layer_frac} must be in [0, 1) "
              "(e.g. --set prune_layer_frac=0.2)")
        check_at_least(self, 0, "n_neurons", "n_heads", "steps", "kl_weight", "seed")
        check_at_least(self, 1, "batch_size", "n_train", "n_retain", "retain_tokens", "refresh_every",
                       "adv_directions", "k_grid", "n_dirs", "n_eval", "n_text", "n_benign", "max_new_tokens", "n_boot",
                       "batch_size_eval")
        check_at_least(self, 2, "n_adv", "n_attack", "n_val")
        check_at_least(self, 1, "attack_screen")
        check(self.edge_fraction is None or 0 < self.edge_fraction <= 1,
              f"edge_fraction={self.edge_fraction!r} must be None or in (0, 1] (e.g. --set edge_fraction=0.02)")
        check_at_least(self, 1, "n_edge_pairs")
        check(len(self.k_grid) > 0 and len(self.n_dirs) > 0,
              "k_grid and n_dirs must be non-empty (e.g. --set k_grid=1,4)")
        check(bool(self.components_csv) or self.n_neurons + self.n_heads > 0,
              "n_neurons and n_heads are both 0 and no components_csv: nothing to train (e.g. --set n_neurons=16)")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        prep = self._prepare(model, harmful, harmless, store)
        rows, curves, cands, training = [], [], [], []
        self._redundancy = []
        self._say("original: attacks")
        original = self._evaluate(model, "original", "none", rows, curves, cands)
        keys = ranked_keys(original)[: self.adv_directions]
        reroute_layers = self.reroute_layers or default_layers(model.n_layers)
        reading = (_reading_accuracy(model, self._sets, reroute_layers, self.seed, self.batch_size_eval)
                   if any("rerouting" in mode_parts(m) for m in self.modes) else {})
        for i, (mode, variant) in enumerate([(m, v) for m in self.modes for v in self.variants]):
            self._say(f"model {i + 1}/{len(self.modes) * len(self.variants)}: {variant} {mode}, {self.steps} steps")
            with weights_restored(model):
                training.append(self._train(model, prep, mode, variant, keys, reroute_layers))
                self._evaluate(model, variant, mode, rows, curves, cands)
        table, curves = pd.DataFrame(rows), pd.DataFrame(curves)
        comparison = report.comparison(table, curves, pd.DataFrame(training), self.judge, self.eval_split)
        summary = {"components": ",".join(map(str, prep["components"])), "adversary_keys": str(keys), "targets": self.targets,
                   "eval_split": self.eval_split,
                   "random_control_note": prep["note"],
                   **({"reroute_layers": ",".join(map(str, reroute_layers)),
                       "rerouting_reading": ",".join(f"L{l}:{a:.3f}" for l, a in reading.items())} if reading else {}),
                   "n_train_pairs": len(prep["pairs"]), "n_retain_pairs": len(prep["retain"]), "demo": self.dataset is None}
        for r in comparison.to_dict("records"):
            summary.update({f"{r['variant']}_{r['mode']}_{k}": v if isinstance(v, str) else round(float(v), 4)
                            for k, v in r.items() if k not in ("variant", "mode") and pd.notna(v)})
        return Result(table, self.config(model, harmful=harmful, harmless=harmless),
                      tables={"comparison": comparison, "curves": curves, "training": pd.DataFrame(training),
                              "redundancy": pd.concat(self._redundancy, ignore_index=True),
                              "attack_candidates": pd.concat(cands, ignore_index=True)},
                      figures={"robust_hardening": report.figure(comparison, curves, model.name, self.judge)}, summary=summary)

    def defend(self, model, harmful, harmless, mode: str, variant: str = "targeted", *, store=None) -> dict:
        """Train ``model`` IN PLACE into one defence of ``run`` (same splits, components, pairs, retain set and
        settings; no attack, no evaluation). Modes with a keyed adversary take the direction attack's best
        ``adv_directions`` keys on these weights, as ``run`` does. Returns the training row with
        ``trained_prompts``: the harmful and harmless prompts the training read. Undo with
        ``weights.weights_restored(model)``."""
        check_modes([mode])
        check_choice("variant", variant, VARIANTS)
        prep = self._prepare(model, harmful, harmless, store)
        keys = []
        if set(KEYED_ADVERSARY_MODES) & set(mode_parts(mode)):
            s = self._sets
            _, table = adaptive_direction_attack(
                model, s["h_train"], s["s_train"], s["h_val"], s["s_val"], layers=self.attack_layers,
                positions=self.attack_positions, prune_layer_frac=self.prune_layer_frac, rule=self.attack_rule,
                screen_prompts=self.attack_screen, batch_size=self.batch_size_eval)
            keys = ranked_keys(table)[: self.adv_directions]
        row = self._train(model, prep, mode, variant, keys, self.reroute_layers or default_layers(model.n_layers))
        read = [p for p, _ in prep["pairs"]] + [p for p, _ in prep["retain"]]
        if set(ADVERSARY_MODES) & set(mode_parts(mode)):  # the adversary's prompts
            read += self._sets["h_train"][: self.n_adv] + self._sets["s_train"][: self.n_adv]
        return {**row, "trained_prompts": read}

    def _prepare(self, model, harmful, harmless, store) -> dict:
        """What every model of a run shares: the prompt sets (``self._sets``), the original's harmless logits,
        the hardening pairs, the located components (and random control), their masks and the retain set."""
        store = store if store is not None else ActivationStore()
        sp = {f"{k}_{s}": p.split(s, self.seed) for k, p in (("h", harmful), ("s", harmless))
              for s in ("train", "val", "test")}
        self._sets = {"h_train": list(sp["h_train"])[: self.n_attack], "s_train": list(sp["s_train"])[: self.n_attack],
                      "h_val": list(sp["h_val"].sample(self.n_val, self.seed)),
                      "s_val": list(sp["s_val"].sample(self.n_val, self.seed)),
                      **{f"{k}_test": self._eval_prompts(sp, k) for k in ("h", "s")},
                      "text": list(datasets.load("plaintext", n=self.n_text, seed=self.seed + 1)),
                      "benign": list(datasets.load(self.benign, n=self.n_benign, seed=self.seed)) if self.benign else []}
        self._base = model.last_logits(self._sets["s_test"], batch_size=self.batch_size_eval)
        self._edge_pairs = None if self.edge_fraction is None else [  # token lengths do not depend on the weights
            make_pairs(model, sp[f"h_{s}"], sp[f"s_{s}"], n_pairs=self.n_edge_pairs, pairing="pad").pairs
            for s in ("train", self.eval_split)]
        pairs = self._pairs(model, list(sp["h_train"]))
        components = (from_table(pd.read_csv(self.components_csv)) if self.components_csv else
                      locate_components(model, sp["h_train"], sp["s_train"], n_neurons=self.n_neurons,
                                        n_heads=self.n_heads, store=store))
        components, control, note = self._control(model, components)
        masks = {"targeted": lambda: component_masks(model, components),
                 "random": lambda: component_masks(model, control), "full": lambda: full_masks(model)}
        retain = greedy_targets(model, list(sp["s_train"])[: self.n_retain], self.retain_tokens) if self.retain else []
        return {"pairs": pairs, "components": components, "note": note, "masks": masks, "retain": retain}

    def _train(self, model, prep: dict, mode: str, variant: str, keys, reroute_layers) -> dict:
        """Train the current weights into the (variant, mode) defence; its row of the ``training`` table."""
        parts = mode_parts(mode)
        h_adv, s_adv = self._sets["h_train"][: self.n_adv], self._sets["s_train"][: self.n_adv]
        adversary = self._adversary(parts, model, h_adv, s_adv, keys)
        rerouting = Rerouting(reroute_layers, alpha=self.reroute_alpha) if "rerouting" in parts else None
        retain = prep["retain"]
        log = train(model, prep["masks"][variant](), prep["pairs"], steps=self.steps,
                    lr=self.full_lr if variant == "full" else self.lr, batch_size=self.batch_size, retain=retain,
                    retain_per_batch=self.batch_size, kl_weight=self.kl_weight if retain else 0.0, seed=self.seed,
                    optimizer=self.optimizer, adversary=adversary, rerouting=rerouting,
                    openers=prefill_openers() if "recovery" in parts else (), opener_prob=self.recovery_prob)
        return {"variant": variant, "mode": mode, "n_params": log["n_params"], "steps": self.steps,
                "seconds": log["seconds"],
                "target_loss_first": log["target_loss"][0] if self.steps else np.nan,
                "target_loss_last": log["target_loss"][-1] if self.steps else np.nan,
                "adversary_refreshes": -(-self.steps // self.refresh_every) if adversary else 0,
                "ablated_rows": int(sum(log["ablated_rows"])), "prefilled_rows": int(sum(log["prefilled_rows"])),
                "reroute_cos_last": log["rerouting"][-1]["reroute_cos"] if log.get("rerouting") else np.nan}

    def _adversary(self, parts, model, harmful, harmless, keys):
        """The one adversary a mode trains against (``defence.modes``), or None."""
        common = {"refresh_every": self.refresh_every, "prob": self.adv_prob, "seed": self.seed,
                  "batch_size": self.batch_size_eval}
        if "adversarial" in parts:
            return RefusalAblationAdversary(model, harmful, harmless, keys, **common)
        if "distributed" in parts:
            return RandomSubspaceAdversary(model, harmful, harmless, max_k=self.max_k, **common)
        if "redundant" in parts or "joint" in parts:
            return MechanismAdversary(model, harmful, harmless, keys, n_units=self.n_mechanism_units,
                                      keep=int("redundant" in parts), **common)
        return None

    def _eval_prompts(self, sp, k: str) -> list[str]:
        """The ``n_eval`` measured prompts of class ``k``: test prompts, or with ``eval_split="val"`` the val
        prompts left after the ``n_val`` the attacks choose on (so settings are chosen without the test split)."""
        if self.eval_split == "test":
            return list(sp[f"{k}_test"].sample(self.n_eval, self.seed))
        chosen = set(sp[f"{k}_val"].sample(self.n_val, self.seed))
        rest = [p for p in sp[f"{k}_val"] if p not in chosen]
        if len(rest) < 2:
            raise ValueError(f"eval_split='val': only {len(rest)} val prompts remain after n_val={self.n_val}; "
                             "give more prompts per class or a smaller n_val")
        return rest[: self.n_eval]

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"robust-hardening: {text}", flush=True)

    def _control(self, model, components):
        """(components, random control, note). Only when ``random`` is a variant; if the located heads hold
        more key/value groups than the model has free, the lowest-ranked heads are dropped (noted)."""
        if "random" not in self.variants:
            return components, None, ""
        dropped = []
        while True:
            try:
                control = random_components(model, components, self.seed)
                break
            except ValueError as err:
                heads = [c for c in components if c.kind == "head"]
                if "key/value groups" not in str(err) or not heads:
                    raise
                dropped.append(heads[-1])
                components = [c for c in components if c != heads[-1]]
        note = (f"dropped {len(dropped)} located head(s) ({', '.join(map(str, dropped))}): the random control "
                "needs as many free key/value groups as the located heads occupy" if dropped else "")
        if note:
            self._say(note)
        return components, control, note

    def _pairs(self, model, h_train):
        if self.dataset is not None:
            return load_pairs(self.dataset)[: self.n_train]
        scores = metrics.refusal_score(model, h_train)
        chosen = [h_train[i] for i in np.argsort(scores.numpy())[: self.n_train]]  # least refusing first
        targets = refusal_targets(self.targets)
        return [(p, targets[i % len(targets)]) for i, p in enumerate(chosen)]

    def _evaluate(self, model, variant, mode, rows, curves, cands) -> pd.DataFrame:
        """Costs, the attack suite (``defence.attacks.run_attacks``, recomputed on these weights), the
        distribution curves and the redundancy check on the current weights; returns the direction candidates."""
        s, bs, tok = self._sets, self.batch_size_eval, metrics.refusal_tokens(model)
        tag = {"variant": variant, "mode": mode}
        measure = "refusal_rate" if self.judge else "refusal_prob"
        on_harmful, on_harmless = f"harmful_{self.eval_split}", f"harmless_{self.eval_split}"  # the measured sets

        def add(condition, split, name, values, k=None):
            values = np.asarray(values, dtype=float)
            low, high = bootstrap_ci(values, self.n_boot, self.seed)
            rows.append({**tag, "condition": condition, "set": split, "measure": name, "k": k,
                         "value": float(values.mean()), "ci_low": low, "ci_high": high, "n": len(values)})

        def refusal(condition, hooks=(), k=None, judge=True):
            score = metrics.refusal_score_from_logits(model.last_logits(s["h_test"], fwd_hooks=hooks, batch_size=bs), tok)
            add(condition, on_harmful, "refusal_score", score, k)
            add(condition, on_harmful, "refusal_prob", torch.sigmoid(score), k)
            if self.judge and judge:
                add(condition, on_harmful, "refusal_rate", metrics.judge_refusals(
                    model, s["h_test"], max_new_tokens=self.max_new_tokens, fwd_hooks=hooks, batch_size=bs), k)
            return float(torch.sigmoid(score).mean())

        def cost(condition, k, kl, ce, over):  # what the attack costs on harmless inputs: the removal cost
            for name, value in (("kl_under_attack", kl), ("cross_entropy_under_attack", ce),
                                ("over_refusal_under_attack", over)):
                if value is not None and pd.notna(value):
                    rows.append({**tag, "condition": condition, "set": on_harmless, "measure": name, "k": k,
                                 "value": float(value), "n": len(s["s_test"])})

        p0 = refusal("none")
        harmless = model.last_logits(s["s_test"], batch_size=bs)
        add("none", on_harmless, "refusal_score", metrics.refusal_score_from_logits(harmless, tok))
        add("none", on_harmless, "kl_from_original", metrics.kl_divergence(self._base, harmless))
        if self.judge:
            add("none", on_harmless, "over_refusal_rate", metrics.judge_refusals(
                model, s["s_test"], max_new_tokens=self.max_new_tokens, batch_size=bs))
            if s["benign"]:
                add("none", "benign", "over_refusal_rate", metrics.judge_refusals(
                    model, s["benign"], max_new_tokens=self.max_new_tokens, batch_size=bs))
        add("none", "plaintext", "cross_entropy", [metrics.cross_entropy(model, [t]) for t in s["text"]])
        start = time.perf_counter()
        searcher = (get("abliteration-search")(variants=["heretic"], n_trials=self.abliteration_trials,
                                               n_startup_trials=min(4, self.abliteration_trials), plaintext=None,
                                               progress=False, batch_size=bs, seed=self.seed)
                    if "abliteration" in self.suite else None)
        # the direction attack always runs (its candidates feed the curves and the redundancy check);
        # units are measured with their curve below
        suite = ["direction_ablation"] + [a for a in self.suite if a not in ("direction_ablation", "unit_ablation")]
        attacked = run_attacks(model, s["h_train"], s["s_train"], s["h_val"], s["s_val"], s["h_test"], s["s_test"],
                               attacks=suite, ranks=self.n_dirs, n_keys=self.n_keys,
                               abliteration=searcher, judge=self.judge, max_new_tokens=self.max_new_tokens,
                               reference_logits=self._base, texts=s["text"], layers=self.attack_layers,
                               positions=self.attack_positions, prune_layer_frac=self.prune_layer_frac,
                               rule=self.attack_rule, screen_prompts=self.attack_screen, n_boot=self.n_boot,
                               seed=self.seed, batch_size=bs, progress=self.progress)
        table = attacked.attrs["candidates"]
        cands.append(table.assign(**tag))
        for r in attacked[~attacked.attack.isin(["none", "worst"])].itertuples():
            rows.append({**tag, "condition": r.attack, "set": on_harmful, "measure": measure, "k": r.k,
                         "value": r.refusal, "ci_low": r.refusal_ci_low, "ci_high": r.refusal_ci_high, "n": r.n})
            if measure != "refusal_prob":
                rows.append({**tag, "condition": r.attack, "set": on_harmful, "measure": "refusal_prob", "k": r.k,
                             "value": r.refusal_prob, "n": r.n})
            cost(r.attack, r.k, getattr(r, "kl", None), getattr(r, "cross_entropy", None), getattr(r, "over_refusal", None))
            if r.attack == "rank_k_ablation":
                curves.append({**tag, "curve": "directions", "k": r.k, "refusal_prob": r.refusal_prob,
                               "refusal_prob_before": p0})
        units = attribution_units(model, s["h_train"], s["s_train"], batch_size=bs)
        comps = from_table(units.head(max(self.k_grid)))
        reference = reference_activations(model, comps, s["s_train"], ActivationStore(disk=False), batch_size=bs)
        for k in sorted(self.k_grid):
            hooks = ablation_hooks(model, comps[:k], "mean", reference=reference)
            top = k == max(self.k_grid)
            p = refusal("unit_ablation", hooks, k, judge=top and "unit_ablation" in self.suite)
            curves.append({**tag, "curve": "units", "k": k, "refusal_prob": p, "refusal_prob_before": p0,
                           "top_unit": str(comps[0]), "top_attribution_share": float(
                               units.attribution.iloc[0] / units.attribution.clip(lower=0).sum())})
            if top and "unit_ablation" in self.suite:
                over = (np.mean(metrics.judge_refusals(model, s["s_test"], max_new_tokens=self.max_new_tokens,
                                                       fwd_hooks=hooks, batch_size=bs)) if self.judge else None)
                cost("unit_ablation", k, float(metrics.kl_divergence(self._base, model.last_logits(
                    s["s_test"], fwd_hooks=hooks, batch_size=bs)).mean()),
                    float(np.mean([metrics.cross_entropy(model, [t], fwd_hooks=hooks) for t in s["text"]])), over)
        rows.append({**tag, "condition": "attacks", "set": "-", "measure": "attack_seconds",
                     "value": time.perf_counter() - start, "n": 1})
        best = table[table.selected].iloc[0]
        mechanisms = {"top_units": ablation_hooks(model, comps, "mean", reference=reference),
                      "top_direction": directional_ablation_hooks(
                          model, attacked.attrs["directions"][(int(best.layer), int(best.position))])}
        self._redundancy.append(redundancy(model, s["h_test"], mechanisms, batch_size=bs).assign(**tag))
        if self._edge_pairs is not None:
            self._edge_circuit(model, tag, tok, rows)
        return table

    def _edge_circuit(self, model, tag: dict, tokens, rows) -> None:
        """Faithfulness of a fixed-size edge circuit found on these weights (EAP-IG on train pairs, top-n,
        measured on test pairs, or val with ``eval_split="val"``): a smaller value at the same size means
        refusal is spread over more edges."""
        graph = eg.EdgeGraph.from_model(model)
        def metric(logits):
            return metrics.refusal_score_from_logits(logits, tokens)

        found = eg.find_circuit(model, *self._edge_pairs, metric, eg.n_for_fraction(graph, self.edge_fraction),
                                method="eap-ig", selection="topn", graph=graph, batch_size=min(self.batch_size_eval, 8))
        i = found.info
        rows.append({**tag, "condition": "edge_circuit", "set": f"harmful_{self.eval_split}", "measure": "edge_faithfulness",
                     "k": i["n_edges"], "value": i["faithfulness"], "n": i["n_eval_pairs"]})


def _reading_accuracy(model, sets, layers, seed, batch_size) -> dict[int, float]:
    """RepE reading accuracy of refusal at ``layers`` on the original: the LAT vector of the last
    post-instruction token (train prompts), threshold from train, accuracy on validation prompts."""
    names = [hk.resid_pre(l) for l in layers]
    acts = {k: model.run_with_cache(sets[k], names, [-1], batch_size=batch_size)
            for k in ("h_train", "s_train", "h_val", "s_val")}
    out = {}
    for l, name in zip(layers, names):
        h, s = acts["h_train"][name][:, 0].float(), acts["s_train"][name][:, 0].float()
        v = direction_from_pairs(h, s, "pca", seed=seed)
        out[l] = reading_accuracy(acts["h_val"][name][:, 0].float(), acts["s_val"][name][:, 0].float(), v,
                                  projection_threshold(h, s, v))
    return out
