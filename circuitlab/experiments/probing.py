"""probing: where is "harmful vs harmless" linearly readable? Logistic-regression probes.

One probe per layer × position on the residual stream (``resid_pre``: the state entering each
block) and one per attention head on its output ``attn_z`` (the layer × head heatmap of Li et al.
2023, "Inference-Time Intervention"). Accuracy and AUROC are stratified k-fold cross-validated.
The selectivity control of Hewitt & Liang 2019 is the same probe, same folds procedure, trained
and tested on shuffled labels: a probe that is only as good as its control reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.io import plots
from circuitlab.core.model import resolve_positions
from circuitlab.methods.probes import SOLVERS, cross_validated_probe
from circuitlab.core.progress import progress_bar
from circuitlab.io.results import Result
from circuitlab.io.store import ActivationStore
from circuitlab.experiments.base import Experiment, ParameterError, check, check_choice, register
from circuitlab.experiments.checks import check_at_least, check_types

__all__ = ["Probing", "parse_positions"]

_COLUMNS = ["layer", "component", "head", "position", "accuracy_mean", "accuracy_std", "auroc_mean",
            "control_accuracy", "selectivity", "n_train", "n_test"]


def parse_positions(spec):
    """``"post"``/``"last"``/``"mean"`` as is; ``"-3,-1"`` (a CLI string) as a list of ints."""
    if isinstance(spec, str) and spec not in ("post", "last", "mean"):
        try:
            return [int(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"positions={spec!r}: use 'post', 'last', 'mean' or negative offsets like '-3,-1'") from None
    return spec


@register("probing")
@dataclass
class Probing(Experiment):
    """Logistic-regression probes per layer × position (residual stream) and per head, with a shuffled-label control."""

    positions: str = "post"  # "post" (template tokens after the prompt, ending at the last token), "last", "mean", "-3,-1"
    heads: bool = True  # also probe each attention head (attn_z at head_position)
    head_position: int = -1  # which of the read positions the head probes use (ignored for "mean")
    paired: bool = False  # harmful[i] and harmless[i] are a matched pair: keep pairs in one fold
    n_splits: int = 5  # folds; lowered to the smaller class size when there are fewer prompts
    control_repeats: int = 1  # shuffled-label probes averaged into control_accuracy
    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 1000  # solver iterations per probe
    # liblinear: the same L2 logistic loss (it also penalises the intercept), 25-60x faster than
    # lbfgs on these small-n problems here (0.004 s vs 0.25 s per 128x64 fit)
    solver: str = "liblinear"  # scikit-learn LogisticRegression solver
    batch_size: int = 16  # prompts per forward pass
    seed: int = 0  # seed of the folds and the shuffled labels

    def __post_init__(self):
        check_types(self)
        try:
            spec = parse_positions(self.positions)
        except ValueError as err:
            raise ParameterError(str(err)) from None
        check(self.head_position < 0, f"head_position={self.head_position} must be a negative offset such as -1 "
              "(e.g. --set head_position=-1)")
        read = [-1] if spec == "last" else spec if isinstance(spec, list) else None  # "post" needs the model
        check(not self.heads or read is None or self.head_position in read,
              f"head_position={self.head_position} is not among the probed positions {read} "
              f"(e.g. --set head_position={read[-1] if read else -1})")
        check(self.C > 0, f"C={self.C} must be > 0 (e.g. --set C=1.0)")
        check_choice("solver", self.solver, SOLVERS)
        check_at_least(self, 2, "n_splits")
        check_at_least(self, 1, "control_repeats", "max_iter", "batch_size")
        check_at_least(self, 0, "seed")

    def run(self, model, harmful, harmless, *, store=None) -> Result:
        spec = resolve_positions(parse_positions(self.positions), model.n_post)
        n_splits = min(self.n_splits, len(harmful), len(harmless))
        if n_splits < 2:
            raise ValueError(f"probing needs at least 2 prompts per set for 2-fold CV; got {len(harmful)} harmful "
                             f"and {len(harmless)} harmless")
        offsets = [None] if spec.is_mean else list(spec.offsets)
        if self.heads and not spec.is_mean and self.head_position not in offsets:
            raise ValueError(f"head_position={self.head_position} is not among the probed positions {offsets}")
        store = store if store is not None else ActivationStore()
        layers = range(model.n_layers)
        names = [hk.resid_pre(l) for l in layers] + ([hk.attn_z(l) for l in layers] if self.heads else [])
        acts = [store.get(model, list(s), names, spec, batch_size=self.batch_size) for s in (harmful, harmless)]
        y = np.r_[np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)]
        groups = self._pair_ids(harmful, harmless)
        probe = dict(groups=groups, n_splits=n_splits, C=self.C, max_iter=self.max_iter, seed=self.seed,
                     control_repeats=self.control_repeats, solver=self.solver)
        rows = []
        for layer in progress_bar(layers, True, total=model.n_layers, desc="probing layers"):
            resid = _stack(acts, hk.resid_pre(layer))
            for i, offset in enumerate(offsets):
                X = resid if offset is None else resid[:, i]
                rows.append({"layer": layer, "component": "resid_pre", "head": None,
                             "position": "mean" if offset is None else offset, **cross_validated_probe(X, y, **probe)})
            if self.heads:
                z = _stack(acts, hk.attn_z(layer))
                z = z if spec.is_mean else z[:, offsets.index(self.head_position)]
                for head in range(model.n_heads):
                    rows.append({"layer": layer, "component": "head", "head": head,
                                 "position": "mean" if spec.is_mean else self.head_position,
                                 **cross_validated_probe(z[:, head], y, **probe)})
        full = pd.DataFrame(rows)
        full["head"] = pd.array(full["head"], dtype="Int64")
        full = full[_COLUMNS].sort_values(["accuracy_mean", "selectivity", "layer"], ascending=[False, False, True],
                                          kind="stable").reset_index(drop=True)
        labels = _position_labels(model, harmful, offsets)
        figures = {"resid_layer_position": _heatmap(full[full.component == "resid_pre"], "position",
                                                    f"Residual probe accuracy, {model.name}", labels)}
        if self.heads:
            figures["head_layer_head"] = _heatmap(full[full.component == "head"], "head",
                                                  f"Head (attn_z) probe accuracy, {model.name}")
        return Result(full, self.config(model, harmful=harmful, harmless=harmless), figures=figures,
                      summary=_summary(full, n_splits))


    def _pair_ids(self, harmful, harmless):
        if not self.paired:
            return None
        if len(harmful) != len(harmless):
            raise ValueError(f"paired=True needs equally many harmful and harmless prompts, got {len(harmful)} "
                             f"and {len(harmless)}")
        return np.r_[np.arange(len(harmful)), np.arange(len(harmless))]


def _stack(acts, name: str) -> np.ndarray:
    """Harmful rows then harmless rows of one hook, as float64 numpy."""
    return torch.cat([a[name] for a in acts]).double().numpy()


def _position_labels(model, prompts, offsets) -> dict:
    """Offset -> the template token there (the same for every prompt when it is a post position)."""
    if offsets == [None]:
        return {"mean": "mean"}
    ids, _ = model.tokenize([prompts[0]])
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return {o: f"{o} {tokens[o]!r}" if -o <= len(tokens) else str(o) for o in offsets}


def _heatmap(part: pd.DataFrame, columns: str, title: str, labels: dict | None = None):
    return plots.heatmap(part, "layer", columns, "accuracy_mean", title, center=0.5,
                         fmt_labels=(lambda c: labels.get(c, str(c))) if labels else None)


def _summary(full: pd.DataFrame, n_splits: int) -> dict:
    out = {"n_splits": n_splits}
    for comp, part in full.groupby("component"):
        best = part.iloc[0]  # already sorted by accuracy
        key = "resid" if comp == "resid_pre" else "head"
        out[f"best_{key}_layer"] = int(best["layer"])
        out[f"best_{key}_position"] = best["position"] if isinstance(best["position"], str) else int(best["position"])
        if comp == "head":
            out["best_head"] = int(best["head"])
        out[f"best_{key}_accuracy"] = round(float(best["accuracy_mean"]), 4)
        out[f"best_{key}_control_accuracy"] = round(float(best["control_accuracy"]), 4)
        out[f"best_{key}_auroc"] = round(float(best["auroc_mean"]), 4)
    resid = full[full.component == "resid_pre"]
    strong = resid[resid["accuracy_mean"] >= 0.9]
    out["first_layer_accuracy_ge_0.9"] = int(strong["layer"].min()) if len(strong) else None
    return out
