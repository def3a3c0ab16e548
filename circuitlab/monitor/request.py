"""Request monitor: flag harmful requests from the residual stream before any token is generated.

A linear probe (logistic regression, as in Alain & Bengio 2016, "Understanding intermediate layers
using linear classifier probes") or the difference-in-means refusal direction (Arditi et al. 2024,
"Refusal in LMs is mediated by a single direction") reads ``resid_pre`` at the last prompt position
of the best layer. The threshold is calibrated on harmless validation prompts to a chosen
false-positive rate — pooled, or per harmless source with the strictest source's threshold kept
(``calibration="max"``), so that no source seen in calibration exceeds the target. How well that
holds on traffic from a source never seen is what ``leave_one_source_out`` measures: fit and
calibrate without one source, then count false alarms on it. ``check`` runs the model only up to the
monitored layer (``stop_at_layer``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve

from circuitlab.core import hooks as hk
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.methods.directions import diff_in_means
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore

__all__ = ["RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics", "METHODS", "CALIBRATIONS",
           "calibrate_across_sources", "calibrate_threshold", "false_alarm_rate", "leave_one_source_out",
           "direction_readout", "probe_readout", "clopper_pearson"]

METHODS = ("probe", "direction")
CALIBRATIONS = ("pooled", "max")  # one threshold on all harmless val prompts | the strictest per-source one


@dataclass
class RequestCheck:
    """Per-prompt scores (higher: more harmful) and flags (score > threshold)."""

    scores: torch.Tensor
    flagged: torch.Tensor
    threshold: float
    layer: int
    seconds: float


@dataclass
class RequestMonitor:
    """A linear read-out ``w·x + b`` of ``resid_pre(layer)`` at the last prompt position."""

    layer: int
    method: str
    weight: torch.Tensor  # [d_model]
    bias: float
    threshold: float
    target_fpr: float
    val_auroc: float
    layer_scores: dict = field(default_factory=dict)  # layer -> validation AUROC (selection record)
    calibration: str = "pooled"  # how the threshold was set across harmless sources
    source_thresholds: dict = field(default_factory=dict)  # source -> threshold it alone would get

    def reads(self) -> tuple[list[int], bool]:
        """What ``score_features`` needs: the ``resid_pre`` layers and whether the refusal log-odds."""
        return [self.layer], False

    def reads_units(self) -> tuple:
        """The circuit units (neuron / head Components) ``score_features`` needs besides the layers."""
        return ()

    @property
    def depth(self) -> int:
        """Layers a check runs: ``check`` stops before ``resid_pre(layer)``'s block."""
        return self.layer

    def score_features(self, feats: dict) -> torch.Tensor:
        """Scores from ``{layer: [n, d_model] resid_pre at the last position, "logodds": [n]}``
        (``circuitlab.monitor.decision.read_features``): the same numbers ``check`` computes."""
        return self.score_activations(feats[self.layer])

    def score_activations(self, acts: torch.Tensor) -> torch.Tensor:
        """Scores for residual vectors ``[n, d_model]``."""
        return acts.float() @ self.weight.to(acts.device) + self.bias

    def residuals(self, model: HookedModel, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """``resid_pre(layer)`` at the last position, computing only layers ``< layer``."""
        prompts = list(getattr(prompts, "prompts", prompts))
        out = torch.empty(len(prompts), model.d_model)
        with torch.no_grad():
            for idx, ids, mask in model.batches(prompts, batch_size):
                resid = model.forward(ids, mask, stop_at_layer=self.layer)
                out[idx] = resid[:, -1].float().cpu()
        return out

    def check(self, model: HookedModel, prompts: Sequence[str], *, batch_size: int = 16) -> RequestCheck:
        """Score and flag ``prompts``: one forward pass up to the monitored layer, nothing more."""
        start = time.perf_counter()
        scores = self.score_activations(self.residuals(model, prompts, batch_size=batch_size))
        return RequestCheck(scores, scores > self.threshold, self.threshold, self.layer,
                            time.perf_counter() - start)


def direction_readout(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit difference-in-means direction; bias centres the midpoint of the two means at 0."""
    diff = diff_in_means(pos, neg)
    w = diff / (np.linalg.norm(diff) + 1e-12)
    return w, -float(w @ (pos.mean(0) + neg.mean(0)) / 2)


def probe_readout(pos: np.ndarray, neg: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Standardised L2 logistic regression, folded back to raw-residual weights."""
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=2000, random_state=seed).fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - w @ mu)


def calibrate_threshold(negative_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold with at most ``fpr`` of ``negative_scores`` strictly above it."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    s = np.sort(np.asarray(negative_scores, dtype=float))[::-1]
    allowed = int(np.floor(fpr * len(s)))  # how many harmless prompts may be flagged
    return float(s[allowed]) if allowed < len(s) else float(s[-1] - 1e-6)


def detection_metrics(pos_scores, neg_scores, threshold: float | None = None) -> dict:
    """AUROC, TPR at 1 % and 5 % FPR (from the ROC curve of these scores) and rates at ``threshold``."""
    pos, neg = np.asarray(pos_scores, float), np.asarray(neg_scores, float)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    fpr, tpr, _ = roc_curve(y, s)
    out = {"auroc": float(roc_auc_score(y, s)), "n_pos": len(pos), "n_neg": len(neg)}
    for target in (0.01, 0.05):
        out[f"tpr_at_{round(target * 100)}pct_fpr"] = float(tpr[fpr <= target + 1e-12].max())
    if threshold is not None:
        out["tpr_at_threshold"] = float((pos > threshold).mean())
        out["fpr_at_threshold"] = float((neg > threshold).mean())
    return out


def calibrate_across_sources(negative_scores: dict, fpr: float, rule: str = "pooled") -> tuple[float, dict]:
    """Threshold for ``{source: harmless scores}``: ``pooled`` calibrates on all of them together, ``max``
    takes the largest per-source threshold (every source alone then meets ``fpr``); also returns those."""
    if rule not in CALIBRATIONS:
        raise ValueError(f"calibration={rule!r}; use one of {', '.join(CALIBRATIONS)}")
    per_source = {name: calibrate_threshold(v, fpr) for name, v in negative_scores.items()}
    if rule == "max":
        return max(per_source.values()), per_source
    return calibrate_threshold(np.concatenate([np.asarray(v, float) for v in negative_scores.values()]), fpr), per_source


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper & Pearson 1934) two-sided ``level`` interval for a binomial rate ``k / n``."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = (1 - level) / 2
    low = float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    high = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return low, high


def false_alarm_rate(scores, threshold: float, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of harmless ``scores`` above ``threshold``: bootstrap 95 % CI and the exact (Clopper-Pearson)
    95 % upper bound, which stays informative when no prompt was flagged (the bootstrap CI is then [0, 0])."""
    from scipy.stats import beta

    flags = (np.asarray(scores, float) > threshold).astype(float)
    n, k = len(flags), int(flags.sum())
    low, high = bootstrap_ci(flags, n_boot, seed)
    upper = float(beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0
    return {"n": n, "flagged": k, "fpr": k / n if n else float("nan"), "fpr_ci_low": low, "fpr_ci_high": high,
            "fpr_upper_exact": upper}


def _as_sources(prompts) -> dict[str, list[str]]:
    if isinstance(prompts, dict):
        return {name: list(getattr(p, "prompts", p)) for name, p in prompts.items()}
    return {"val": list(getattr(prompts, "prompts", prompts))}


def fit_request_monitor(model: HookedModel, harmful_train, harmless_train, harmful_val, harmless_val, *,
                        layers: Sequence[int] | None = None, method: str = "probe", fpr: float = 0.01,
                        calibration: str = "pooled", store: ActivationStore | None = None, batch_size: int = 16,
                        seed: int = 0) -> RequestMonitor:
    """Fit a read-out at each candidate layer, keep the best by validation AUROC, calibrate the threshold.

    Ties go to the earliest layer (the cheapest ``check``). Layer 0 is excluded: its input is the
    embedding, which carries no context. ``harmless_val`` may be ``{source: prompts}``: AUROC is taken on
    them pooled, the threshold by ``calibration`` (``calibrate_across_sources``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r}; use one of {', '.join(CALIBRATIONS)}")
    layers = list(layers) if layers is not None else list(range(1, model.n_layers))
    bad = [l for l in layers if not 1 <= l < model.n_layers]
    if bad:
        raise ValueError(f"monitored layers must be in 1..{model.n_layers - 1}; got {bad}")
    store = store if store is not None else ActivationStore()
    names = [hk.resid_pre(l) for l in layers]
    val_sources = _as_sources(harmless_val)
    sets = [list(getattr(p, "prompts", p)) for p in (harmful_train, harmless_train, harmful_val)]
    sets.append([p for v in val_sources.values() for p in v])
    for label, s in zip(("harmful_train", "harmless_train", "harmful_val", "harmless_val"), sets):
        if len(s) < 2:
            raise ValueError(f"{label} needs at least 2 prompts, got {len(s)}")
    acts = [store.get(model, s, names, "last", batch_size=batch_size, progress=False) for s in sets]
    best, layer_scores = None, {}
    for layer, name in zip(layers, names):
        hp, hn, vp, vn = (a[name][:, 0].double().numpy() for a in acts)
        w, b = direction_readout(hp, hn) if method == "direction" else probe_readout(hp, hn, seed)
        auc = float(roc_auc_score(np.r_[np.ones(len(vp)), np.zeros(len(vn))], np.r_[vp @ w, vn @ w]))
        layer_scores[layer] = auc
        if best is None or auc > best[1] + 1e-9:
            best = (layer, auc, w, b, vn @ w + b)
    layer, auc, w, b, neg_val = best
    cuts = np.cumsum([0] + [len(v) for v in val_sources.values()])
    by_source = {name: neg_val[cuts[i]:cuts[i + 1]] for i, name in enumerate(val_sources)}
    threshold, per_source = calibrate_across_sources(by_source, fpr, calibration)
    return RequestMonitor(layer=layer, method=method, weight=torch.tensor(w, dtype=torch.float32), bias=b,
                          threshold=threshold, target_fpr=fpr, val_auroc=auc, layer_scores=layer_scores,
                          calibration=calibration, source_thresholds=per_source)


def leave_one_source_out(model: HookedModel, harmful: dict, sources: dict, *, layers: Sequence[int] | None = None,
                         method: str = "probe", fpr: float = 0.01, calibration: str = "max",
                         store: ActivationStore | None = None, batch_size: int = 16, n_boot: int = 1000,
                         seed: int = 0, fit=None) -> list[dict]:
    """For each harmless source: fit and calibrate on the others only, then measure false alarms on it.

    ``harmful``: ``{"train", "val", "test"}`` prompts; ``sources``: ``{name: {"train", "val", "test"}}``
    (at least two). Returns one row per held-out source: its false-alarm rate on ALL its prompts
    (never seen) and on its test split, the in-distribution rate on the other sources' test splits, and
    the detection rate on the harmful test prompts, all at the fold's threshold. ``fit(harmful_train,
    harmless_train, harmful_val, {source: harmless_val})``: another monitor's fit (e.g. a decision monitor,
    calibrated by ``calibration``), scored by its own ``check``; by default ``fit_request_monitor``'s.
    """
    if len(sources) < 2:
        raise ValueError(f"leave-one-source-out needs at least 2 harmless sources, got {list(sources)}")
    store = store if store is not None else ActivationStore()
    rows = []
    for held in sources:
        rest = [n for n in sources if n != held]
        fold = (harmful["train"], [p for n in rest for p in sources[n]["train"]], harmful["val"],
                {n: sources[n]["val"] for n in rest})
        mon = fit(*fold) if fit is not None else fit_request_monitor(
            model, *fold, layers=layers, method=method, fpr=fpr, calibration=calibration, store=store,
            batch_size=batch_size, seed=seed)

        def scores(prompts):
            if fit is not None:
                return mon.check(model, list(prompts), batch_size=batch_size).scores.numpy()
            name = hk.resid_pre(mon.layer)
            acts = store.get(model, list(prompts), [name], "last", batch_size=batch_size, progress=False)[name][:, 0]
            return mon.score_activations(acts).numpy()

        unseen = [p for split in ("train", "val", "test") for p in sources[held][split]]
        row = {"held_out": held, "layer": mon.layer, "threshold": mon.threshold, "calibration": calibration,
               "target_fpr": fpr, "val_auroc": mon.val_auroc}
        row.update({f"unseen_{k}": v for k, v in false_alarm_rate(scores(unseen), mon.threshold, n_boot=n_boot,
                                                                  seed=seed).items()})
        row.update({f"unseen_test_{k}": v for k, v in false_alarm_rate(scores(sources[held]["test"]), mon.threshold,
                                                                       n_boot=n_boot, seed=seed).items()})
        seen = [p for n in rest for p in sources[n]["test"]]
        row.update({f"seen_test_{k}": v for k, v in false_alarm_rate(scores(seen), mon.threshold, n_boot=n_boot,
                                                                     seed=seed).items()})
        row["tpr_harmful_test"] = float((scores(harmful["test"]) > mon.threshold).mean())
        rows.append(row)
    return rows
