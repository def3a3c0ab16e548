"""abliteration-search: circuitlab's own refusal-removal search — a seeded multi-objective Optuna study
per parameter family, refusal against KL, its Pareto front then measured on held-out prompts.

Splits: each given set is cut by ``PromptSet.split`` (the deterministic 60/20/20 train / val / test
parts, shuffled with ``seed``). Train gives the per-layer difference-in-means directions
(``abliteration.residual_directions``) and, for ``targeted``, the writer ranking; val scores every
trial; test is first touched by ``evaluate``, after the search (tests/test_abliteration_search.py counts it).

Families (``variants``), one study each, seeded ``seed + i``:

- ``heretic``: Heretic's kernel family (``abliteration.AbliterationParams``) over Heretic 1.4.0's
  ranges — direction scope (per layer / global), direction index in [0.4, 0.9] × last layer, per
  writer max_weight in [0.8, 1.5], peak position in [0.6, 1] × last layer, min_weight as a fraction
  of max_weight, min_weight_distance in [1, max(1, 0.6 × last layer)]; plain projection of the
  per-layer directions (Heretic with ``--row-normalization none --no-orthogonalize-direction``).
- ``heretic-defaults``: the same kernels and ranges with Heretic 1.4.0's defaults: projected
  directions (``orthogonalize_direction``: ``residual_directions(..., orthogonalize=True)``) and
  norm-preserving rows (``row_normalization="full"``: ``abliteration.norm_preserved``, exact, where
  Heretic stores a rank-3 LoRA approximation of it).
- ``targeted``: the global direction at ``direction_index`` removed only from the ``top_n`` writers
  (``target_kinds``) that write it most on train prompts (``direction_eval.direction_components``).
- ``global``: one global direction, one weight, every layer's attention and MLP output.
- ``cone``: the refusal cone (Wollschläger et al. 2025): Heretic's kernels and ranges, each edit
  removing a rank-``k`` subspace, k in 1..``max_k`` (an Optuna parameter), of that layer's cone (or
  the global cone at ``direction_index``), ``cone.cone_bases`` on train prompts; plain projection.
  At k = 1 it is the ``heretic`` family.

Objectives, both minimised on val: ``refusal`` = ``score`` (mean calibrated refusal score of the
harmful prompts: cheap, runs on a CPU) or ``markers`` (Heretic's count of greedy responses with a
refusal marker); and Heretic's first-token KL on the harmless prompts. The ``trials`` table has one
row per trial (parameters, objectives, ``pareto_front`` over all trials, ``variant_front`` within its
family, seconds); ``table`` holds each family's front measured on the test split (refusal score, KL,
cross-entropy, marker refusals when ``judge``, arithmetic accuracy when ``capability``, over-refusal
on ``benign`` sensitive questions when set) plus the unedited model (``variant`` = original).
``kl_budget`` selects the front's lowest val refusal within that val KL. ``export`` writes any trial's
model as an HF folder.

``journal`` (a file path): every told trial is also written to an Optuna journal there, one study per
family and settings (named by a digest of the model's weights, the four prompt lists, the family, its
seed and every parameter the objectives depend on). A rerun with the same journal and settings reads
the trials it finds back (objectives and durations as recorded, edits rebuilt from their parameters;
``from_journal`` True in the trials table) and runs only the rest up to ``n_trials``: a search killed
after hours resumes, and a converged-front run can add trials to an earlier one. The resumed sampler
draws from a fresh seeded state, so its new trials are not the ones an uninterrupted run would draw.

``converge`` (a share, e.g. 0.02): each family runs past ``n_trials`` until its val hypervolume
(``hypervolume_box``, ``heretic_scoring.hypervolume_change``) grew by less than that share over its last
20 % of trials, or ``max_trials`` is reached; ``convergence_`` records per family the trials, the change
and what stopped it. Journal trials are read back under the same rule, so a rerun stops where it did.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from circuitlab.methods import metrics
from circuitlab.methods.abliteration import (AbliterationParams, Kernel, abliterated, describe_edits,
    direction_at, export_abliterated, global_edits, heretic_edits, residual_directions, score_model,
    targeted_edits, top_writers)
from circuitlab.methods.cone import MAX_K, ConeParams, cone_bases, cone_edits
from circuitlab.io.datasets import DatasetError, PromptSet, optional_prompts
from circuitlab.methods.direction_eval import last_logits_shared, pareto_ranks
from circuitlab.methods.heretic_scoring import hypervolume_change
from circuitlab.core.progress import progress_bar
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.io.unit_cache import digest
from circuitlab.experiments.base import Experiment, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_prompt_sets, check_subset, check_types

__all__ = ["AbliterationSearch", "VARIANTS", "REFUSAL_OBJECTIVES", "SAMPLERS", "TEST_FRONTS", "suggest",
           "hypervolume_box"]

VARIANTS = ("heretic", "heretic-defaults", "targeted", "global", "cone")
_HERETIC_FAMILIES = ("heretic", "heretic-defaults", "cone")  # Heretic's kernel parameters
REFUSAL_OBJECTIVES = ("score", "markers")
SAMPLERS = ("tpe", "nsga2")
TEST_FRONTS = ("variant", "pareto")  # the val front measured on test: each family's own, or all families' together
TARGET_KINDS = ("head", "mlp_out", "neuron")
# parameters a trial's val objectives do not depend on (test-only measures, the budget, display, the journal)
_NOT_IN_STUDY_NAME = ("n_trials", "converge", "max_trials", "variants", "progress", "journal", "judge", "kl_budget",
                      "plaintext", "n_text", "capability", "benign", "n_benign", "test_front")


@register("abliteration-search")
@dataclass
class AbliterationSearch(Experiment):
    """Abliteration search (Optuna, refusal vs KL): Heretic's kernel family, top-writer targeting; front on test."""

    variants: list[str] = field(default_factory=lambda: ["heretic", "targeted"])  # families, any of VARIANTS
    n_trials: int = 30  # Optuna trials per family (with converge: the fewest)
    converge: float | None = None  # add trials to a family until its val front grew < this share over its last 20 %
    max_trials: int | None = None  # with converge: most trials per family (None: 4 x n_trials)
    sampler: str = "tpe"  # multi-objective sampler: tpe (multivariate TPE, as Heretic) or nsga2 (NSGA-II)
    n_startup_trials: int = 10  # TPE: random trials before it models the front; NSGA-II: population size
    refusal: str = "score"  # val refusal objective: score (refusal score, cheap) or markers (Heretic, generates)
    max_new_tokens: int = 24  # tokens generated per prompt for marker refusals (objective, test judge)
    judge: bool = False  # on the test split also generate: marker refusals, circuitlab's judge and over-refusal
    kl_budget: float | None = None  # select the front's lowest val refusal with val KL <= this (None: no pick)
    max_top_n: int = 8  # targeted: most writers a trial may edit
    target_kinds: list[str] = field(default_factory=lambda: ["head", "mlp_out"])  # targeted: head, mlp_out, neuron
    max_k: int = MAX_K  # cone: largest rank k of the removed subspace
    plaintext: str | None = "plaintext"  # prompt set for the test cross-entropy (None: skip)
    n_text: int = 16  # plain texts for the cross-entropy
    capability: int = 0  # test: generated arithmetic questions for the capability probe (0: skip)
    benign: str | None = None  # test: prompt set judged for over-refusal on benign sensitive questions (None: skip)
    n_benign: int = 16  # prompts of that set judged per test point
    test_front: str = "variant"  # val front measured on test: variant (each family's own) or pareto (all together)
    batch_size: int = 32  # prompts per forward pass
    progress: bool = True  # show progress bars
    seed: int = 0  # seed of the splits and the samplers
    journal: str | None = None  # Optuna journal file: a rerun with the same settings resumes each family's study
    directions_: torch.Tensor | None = field(default=None, init=False, repr=False)  # learned: per-layer directions
    projected_: torch.Tensor | None = field(default=None, init=False, repr=False)  # learned: heretic-defaults'
    cones_: torch.Tensor | None = field(default=None, init=False, repr=False)  # learned: cone's per-layer bases
    trials_: pd.DataFrame | None = field(default=None, init=False, repr=False)  # learned: one row per trial (val)
    convergence_: dict = field(default_factory=dict, init=False, repr=False)  # learned: family -> trials, change
    params_: dict = field(default_factory=dict, init=False, repr=False)  # learned: trial -> (variant, parameters)

    def __post_init__(self):
        check_types(self)
        check_subset(self, "variants", VARIANTS)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("refusal", self.refusal, REFUSAL_OBJECTIVES)
        check_choice("test_front", self.test_front, TEST_FRONTS)
        check_subset(self, "target_kinds", TARGET_KINDS)
        check_prompt_sets(self, "benign")
        check_at_least(self, 1, "n_trials", "max_new_tokens", "max_top_n", "max_k", "n_text", "n_benign", "batch_size")
        check_at_least(self, 0, "n_startup_trials", "capability", "seed")
        check(self.sampler != "nsga2" or self.n_startup_trials >= 2, f"n_startup_trials={self.n_startup_trials} "
              "is NSGA-II's population size and must be >= 2 (e.g. --set n_startup_trials=10)")
        check(self.journal is None or (Path(self.journal).parent.is_dir() and not Path(self.journal).is_dir()),
              f"journal={self.journal!r} must be a file path in an existing folder (e.g. --set journal=out/search.journal)")
        check(self.converge is None or 0 < self.converge < 1,
              f"converge={self.converge} must be None or in (0, 1) (e.g. --set converge=0.02: < 2 % growth)")
        check(self.max_trials is None or self.max_trials >= self.n_trials,
              f"max_trials={self.max_trials} must be None or >= n_trials={self.n_trials} (e.g. --set max_trials=144)")
        check(self.kl_budget is None or self.kl_budget > 0,
              f"kl_budget={self.kl_budget} must be None or > 0 (e.g. --set kl_budget=0.1)")

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if not k.endswith("_")}

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        store = store if store is not None else ActivationStore()
        harmful, harmless = _as_set(harmful, "harmful"), _as_set(harmless, "harmless")
        (h_train, h_val, h_test), (s_train, s_val, s_test) = _splits(harmful, self.seed), _splits(harmless, self.seed)
        trials = self.search(model, h_train, s_train, h_val, s_val, store=store)
        # the test split is used from here on only
        front, summary = self.evaluate(model, h_test, s_test)
        summary.update(splits={s.name: len(s) for s in (h_train, h_val, h_test, s_train, s_val, s_test)})
        return Result(front, self.config(model, harmful=harmful, harmless=harmless), tables={"trials": trials},
                      figures={"front": front_figure(trials, front, model.name)}, summary=summary)

    # ---- search (train + val only) ---------------------------------------------------------------

    def search(self, model, h_train, s_train, h_val, s_val, *, store=None) -> pd.DataFrame:
        """Directions from train, one seeded study per family scored on val; sets ``directions_``,
        ``trials_``, ``params_`` and returns the trials table. No test prompt comes in."""
        store = store if store is not None else ActivationStore()
        h_train, s_train, h_val, s_val = (list(p) for p in (h_train, s_train, h_val, s_val))
        self.directions_ = residual_directions(model, h_train, s_train, store=store, batch_size=self.batch_size)
        if "heretic-defaults" in self.variants:
            self.projected_ = residual_directions(model, h_train, s_train, store=store, batch_size=self.batch_size,
                                                  orthogonalize=True)
        if "cone" in self.variants:
            self.cones_ = cone_bases(model, h_train, s_train, max_k=self.max_k, store=store, batch_size=self.batch_size)
        self._train, self._store, self._writers = (h_train, s_train), store, {}
        tok = metrics.refusal_tokens(model)
        self._val = (h_val, s_val, last_logits_shared(model, s_val, batch_size=self.batch_size), tok)
        base_val = self._objectives(model, [])
        rows, self.params_, self.convergence_ = [], {}, {}
        for i, variant in enumerate(self.variants):
            study = _study(self.sampler, self.n_startup_trials, self.seed + i, self.journal,
                           self._study_name(model, variant, self.seed + i, (h_train, s_train, h_val, s_val)))
            told, family = _complete_trials(study), []
            # journal trials are read back in order under the same stopping rule, so a rerun stops where this one did
            for _ in progress_bar(itertools.count(), self.progress, total=self.n_trials, desc=f"{variant} trials"):
                if self._enough(variant, family, base_val[0], len(h_val)):
                    break
                j = len(family)
                row = (self._replayed(model, told[j], variant, len(rows)) if j < len(told)
                       else self._trial(model, study, variant, len(rows)))
                family.append(row)
                rows.append(row)
        trials = _flag_fronts(pd.DataFrame(rows))
        trials["val_baseline_refusal"], trials["val_baseline_kl"] = base_val
        self.trials_ = trials
        return trials

    def _enough(self, variant: str, family: list[dict], base_refusal: float, n_val: int) -> bool:
        """Whether a family has its trials: ``n_trials``; with ``converge``, until its val front grew by less than
        that over its last 20 % of trials (``heretic_scoring.hypervolume_change``), at most ``max_trials``."""
        n = len(family)
        if n < self.n_trials:
            return False
        change = None
        if self.converge is not None:
            points, box = hypervolume_box(self.refusal, [r["val_refusal"] for r in family], base_refusal, n_val)
            change = hypervolume_change(points, [r["val_kl"] for r in family], ref=box)
        converged = change is not None and change < self.converge  # NaN (no front area yet) is not converged
        cap = self.max_trials or 4 * self.n_trials
        self.convergence_[variant] = {"trials": n, "hypervolume_change_last_20pct": change, "converged": converged,
                                      "stopped_by": "n_trials" if change is None else
                                      "converge" if converged else "max_trials" if n >= cap else None}
        return change is None or converged or n >= cap

    def _trial(self, model, study, variant: str, number: int) -> dict:
        start = time.perf_counter()
        trial = study.ask()
        params = suggest(trial, variant, model.n_layers, self.max_top_n, self.max_k)
        edits = self.edits(model, variant, params)
        refusal, kl = self._objectives(model, edits)
        study.tell(trial, [refusal, kl])
        return self._row(number, variant, trial.number, params, edits, refusal, kl, time.perf_counter() - start, False)

    def _replayed(self, model, told, variant: str, number: int) -> dict:
        """The row of a trial read back from the journal: its parameters replayed, its objectives as recorded."""
        import optuna

        params = suggest(optuna.trial.FixedTrial(told.params), variant, model.n_layers, self.max_top_n, self.max_k)
        edits = self.edits(model, variant, params)
        return self._row(number, variant, told.number, params, edits, *told.values, told.duration.total_seconds(), True)

    def _row(self, number, variant, study_trial, params, edits, refusal, kl, seconds, from_journal) -> dict:
        self.params_[number] = (variant, params)
        flat = params.flat() if isinstance(params, (AbliterationParams, ConeParams)) else dict(params)
        return {"trial": number, "variant": variant, "study_trial": study_trial, "component": "direction", **flat,
                "n_edits": len(edits), "edits": describe_edits(edits), "refusal_objective": self.refusal,
                "val_refusal": float(refusal), "val_kl": float(kl), "seconds": round(seconds, 3),
                "from_journal": from_journal}

    def _study_name(self, model, variant: str, seed: int, prompts) -> str:
        """One journal study per family and everything its objectives depend on (not n_trials: more may be added)."""
        settings = {k: v for k, v in self.params().items() if k not in _NOT_IN_STUDY_NAME}
        return f"{variant}-seed{seed}-" + digest((model.fingerprint, variant, seed, settings, prompts))[:16]

    def _objectives(self, model, edits) -> tuple[float, float]:
        """(refusal, KL) on the val split with ``edits`` in the weights."""
        h_val, s_val, base, tok = self._val
        with abliterated(model, edits):
            scores = score_model(model, h_val, s_val, base, refusal_tokens=tok, markers=self.refusal == "markers",
                                 max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        refusal = scores["marker_refusals"] if self.refusal == "markers" else scores["refusal_score"]
        return float(refusal), float(scores["kl"])

    def edits(self, model, variant: str, params):
        """The ``abliteration.Edit`` list of one trial's parameters (after ``search``: uses its directions)."""
        if self.directions_ is None:
            raise ValueError("no directions yet: run the search first (run() or search())")
        if variant == "heretic":
            return heretic_edits(model, self.directions_, params)
        if variant == "heretic-defaults":
            return heretic_edits(model, self.projected_, params, norm_preserving=True)
        if variant == "cone":
            return cone_edits(model, self.cones_, params)
        direction = direction_at(self.directions_, params["direction_index"])
        if not direction.any():  # the sets' means coincide there: nothing to remove
            return []
        if variant == "global":
            return global_edits(model, direction, params["weight"])
        key = params["direction_index"]
        if key not in self._writers:  # the ranking depends only on the direction: once per index
            h_train, s_train = self._train
            self._writers[key] = top_writers(model, direction, h_train, s_train, store=self._store,
                                             kinds=self.target_kinds, top_n=self.max_top_n, batch_size=self.batch_size)
        return targeted_edits(self._writers[key], direction, params["top_n"], params["weight"], self.target_kinds)

    # ---- after the search ------------------------------------------------------------------------

    def evaluate(self, model, h_test, s_test) -> tuple[pd.DataFrame, dict]:
        """The val front (each family's own, or with ``test_front="pareto"`` the front of all families together)
        and the unedited model, measured on the test split; plus the summary."""
        if self.trials_ is None:
            raise ValueError("no trials yet: run the search first (run() or search())")
        h_test, s_test = list(h_test), list(s_test)
        plain = optional_prompts(self.plaintext, self.n_text, self.seed)
        base = last_logits_shared(model, s_test, batch_size=self.batch_size)
        kwargs = dict(markers=self.judge, judge=self.judge, max_new_tokens=self.max_new_tokens, plaintext=plain,
                      batch_size=self.batch_size, seed=self.seed, capability=self.capability,
                      benign=optional_prompts(self.benign, self.n_benign, self.seed))
        rows = [{"trial": -1, "variant": "original", "component": "direction",
                 **_test(score_model(model, h_test, s_test, base, **kwargs))}]
        front = self.trials_[self.trials_[f"{self.test_front}_front"]]
        for r in progress_bar(list(front.itertuples()), self.progress, total=len(front), desc="test split"):
            with abliterated(model, self.edits(model, *self.params_[r.trial])):
                rows.append({"trial": r.trial, **_test(score_model(model, h_test, s_test, base, **kwargs))})
        measured = pd.DataFrame(rows)
        table = front.merge(measured.drop(columns=["variant", "component"]), on="trial", how="left")
        table = pd.concat([measured[measured.trial == -1], table], ignore_index=True)
        table[["pareto_front", "variant_front"]] = table[["pareto_front", "variant_front"]].fillna(False).astype(bool)
        table["n_test_harmful"], table["n_test_harmless"] = len(h_test), len(s_test)
        if self.judge:
            table["test_marker_refusal_rate"] = table.test_marker_refusals / len(h_test)
        first = ["trial", "variant", "component", "pareto_front", "variant_front", "val_refusal", "val_kl",
                 *[c for c in table.columns if c.startswith("test_")]]
        table = table[first + [c for c in table.columns if c not in first]]
        table, summary = _select(table, self.kl_budget, self.refusal)
        return table, summary

    def export(self, model, trial: int, path):
        """Write the model edited by ``trial`` (a ``trials_`` row) as an HF folder; returns its path."""
        if not self.params_:
            raise ValueError("no trials yet: run the search first (run() or search()), then export one of its trials")
        if trial not in self.params_:
            raise ValueError(f"trial {trial} is not one of this search's trials 0..{len(self.params_) - 1}")
        return export_abliterated(model, self.edits(model, *self.params_[trial]), path)


# ---- parameter space -------------------------------------------------------------------------------

def suggest(trial, variant: str, n_layers: int, max_top_n: int = 8, max_k: int = MAX_K):
    """One trial's parameters: ``AbliterationParams`` (heretic, heretic-defaults), ``ConeParams`` (cone: the same
    kernels and a rank k in 1..max_k) or a dict (targeted, global); Heretic 1.4.0's ranges, with the
    distance range widened to at least 1 layer for very shallow models."""
    last = n_layers - 1
    if variant in _HERETIC_FAMILIES:
        scope = trial.suggest_categorical("direction_scope", ["global", "per layer"])
        # always sampled, as in Heretic: multivariate TPE needs the same parameters in every trial
        index = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
        kernels = {}
        for w in ("attn", "mlp"):
            top = trial.suggest_float(f"{w}.max_weight", 0.8, 1.5)
            kernels[w] = Kernel(max_weight=top,
                                max_weight_position=trial.suggest_float(f"{w}.max_weight_position", 0.6 * last, last),
                                min_weight=trial.suggest_float(f"{w}.min_weight", 0.0, 1.0) * top,
                                min_weight_distance=trial.suggest_float(f"{w}.min_weight_distance", 1.0,
                                                                        max(1.0, 0.6 * last)))
        params = AbliterationParams(direction_index=None if scope == "per layer" else index, **kernels)
        return ConeParams(params, trial.suggest_int("k", 1, max_k)) if variant == "cone" else params
    params = {"direction_index": trial.suggest_float("direction_index", 0.4 * last, 0.9 * last),
              "weight": trial.suggest_float("weight", 0.8, 1.5)}
    if variant == "targeted":
        params["top_n"] = trial.suggest_int("top_n", 1, max_top_n)
    return params


def _study(sampler: str, n_startup: int, seed: int, journal: str | None = None, name: str | None = None):
    """A seeded two-objective (refusal, KL) study, minimised, with Optuna's logging silenced; with ``journal``,
    the study ``name`` in that journal file, created or loaded."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sampler == "nsga2":
            chosen = optuna.samplers.NSGAIISampler(population_size=n_startup, seed=seed)
        else:
            chosen = optuna.samplers.TPESampler(n_startup_trials=n_startup, multivariate=True, seed=seed)
        storage = None
        if journal is not None:
            from optuna.storages.journal import JournalFileBackend

            storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        return optuna.create_study(directions=["minimize", "minimize"], sampler=chosen, storage=storage,
                                   study_name=name if journal is not None else None, load_if_exists=True)


def hypervolume_box(refusal: str, val_refusal: list[float], baseline_refusal: float,
                    n_val: int | None) -> tuple[list[float], tuple[float, float]]:
    """A family's val points and the box its hypervolume is measured in: marker counts as fractions of the
    ``n_val`` harmful prompts in (1, 1); a refusal score in (the unedited model's val score, 1), so only edits
    that lower refusal add area (a score is a log-odds, not a fraction)."""
    if refusal == "markers":
        return [r / n_val if n_val else r for r in val_refusal], (1.0, 1.0)
    return list(val_refusal), (float(baseline_refusal), 1.0)


def _complete_trials(study) -> list:
    """The study's finished trials in order (a trial left running by a killed process is not one)."""
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


# ---- helpers ---------------------------------------------------------------------------------------

def _as_set(prompts, name) -> PromptSet:
    return prompts if isinstance(prompts, PromptSet) else PromptSet(name, tuple(prompts))


def _splits(prompts: PromptSet, seed: int) -> tuple[PromptSet, PromptSet, PromptSet]:
    """train / val / test (PromptSet.split, 60/20/20); every part must hold a prompt."""
    try:
        return tuple(prompts.split(s, seed=seed) for s in ("train", "val", "test"))
    except DatasetError:
        raise ValueError(f"{prompts.name}: {len(prompts)} prompts leave an empty train/val/test part "
                         "(60/20/20); give at least 4 prompts per set") from None


def _test(scores: dict) -> dict:
    return {f"test_{k}": v for k, v in scores.items()}


def _flag_fronts(trials: pd.DataFrame) -> pd.DataFrame:
    """``pareto_front``: not dominated in (val_refusal, val_kl) by any trial; ``variant_front``: within its family."""
    trials["pareto_front"] = pareto_ranks(trials.val_refusal.tolist(), trials.val_kl.tolist()) == 0
    trials["variant_front"] = False
    for _, group in trials.groupby("variant"):
        ranks = pareto_ranks(group.val_refusal.tolist(), group.val_kl.tolist())
        trials.loc[group.index[ranks == 0], "variant_front"] = True
    return trials


def _select(table: pd.DataFrame, kl_budget: float | None, refusal: str) -> tuple[pd.DataFrame, dict]:
    """Mark the selected front point (val numbers only) and write the summary."""
    table["selected"] = False
    front = table[table.pareto_front]
    original = table[table.variant == "original"].iloc[0]
    summary = {"refusal_objective": {"score": "mean refusal score (calibrated refusal tokens) on val harmful",
                                     "markers": "Heretic marker refusals of greedy responses on val harmful"}[refusal],
               "kl_objective": "Heretic first-token KL(original || edited) on val harmless",
               "n_front": int(len(front)), "test_original_refusal_score": round(float(original.test_refusal_score), 4)}
    if kl_budget is None:
        summary["selection"] = "none (no kl_budget): every front point is reported"
        return table, summary
    within = front[front.val_kl <= kl_budget]
    if within.empty:
        lowest = float(front.val_kl.min())
        summary["selection"] = (f"no trial met kl_budget={kl_budget}: the lowest val KL on the front is {lowest:.4g}; "
                                "the front is shown unselected (raise kl_budget or run more trials)")
        warnings.warn(summary["selection"], stacklevel=3)
        return table, summary
    pick = within.sort_values(["val_refusal", "val_kl"]).index[0]
    table.loc[pick, "selected"] = True
    row = table.loc[pick]
    summary.update(selection=f"kl_budget: lowest val refusal on the front with val KL <= {kl_budget}",
                   selected_trial=int(row.trial), selected_variant=str(row.variant),
                   selected_val_refusal=round(float(row.val_refusal), 4), selected_val_kl=round(float(row.val_kl), 4),
                   selected_test_refusal_score=round(float(row.test_refusal_score), 4),
                   selected_test_kl=round(float(row.test_kl), 4))
    return table, summary


def front_figure(trials: pd.DataFrame, table: pd.DataFrame, model_name: str):
    """Val refusal vs val KL of every trial (fronts joined), and the fronts measured on test."""
    import matplotlib

    from circuitlab.io.plots import subplots

    fig, axes = subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(sorted(trials.variant.unique()), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]))
    for variant, group in trials.groupby("variant"):
        axes[0].scatter(group.val_kl, group.val_refusal, s=12, alpha=0.4, color=colors[variant], label=variant)
        front = group[group.variant_front].sort_values("val_kl")
        axes[0].plot(front.val_kl, front.val_refusal, color=colors[variant], drawstyle="steps-post")
        test = table[table.variant == variant].sort_values("test_kl")
        axes[1].plot(test.test_kl, test.test_refusal_score, "o-", color=colors[variant], label=variant, ms=4)
    original = table[table.variant == "original"]
    axes[1].scatter(original.test_kl, original.test_refusal_score, marker="*", s=160, c="black", label="original")
    axes[0].axhline(float(trials.val_baseline_refusal.iloc[0]), color="black", ls=":", lw=1, label="original")
    for ax, split in zip(axes, ("val (search)", "test (front only)")):
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"first-token KL on harmless, {split}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"refusal on harmful ({trials.refusal_objective.iloc[0]})")
    axes[1].set_ylabel("refusal score on harmful (test)")
    fig.suptitle(f"Abliteration search, {model_name}", fontsize=10)
    fig.tight_layout()
    return fig
