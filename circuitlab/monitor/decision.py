"""Monitors that read the refusal decision, not the request's topic, behind the ``RequestMonitor`` interface.

A content probe at an early layer reads what a request is about (the features ranking finds in layers
1-4) and flags benign questions on sensitive topics. These read what the model is about to do:

- ``direction``: projection of ``resid_pre(L)`` on the unit difference-in-means refusal direction at a
  validation-selected layer ``L`` (Arditi et al. 2024, "Refusal in LMs is mediated by a single direction").
- ``direction-late``: the mean of each layer's own unit difference-in-means projection over ``L`` and later
  layers (the decision as it is carried forward, not only where it is first written).
- ``logodds``: the model's own first-token refusal log-odds (``methods.metrics.refusal_score_from_logits``,
  Arditi et al. §2.4): one full forward, no fitting.
- ``multi-probe``: one L2 logistic probe on ``resid_pre`` of several layers concatenated.
- ``circuit-probe``: one L2 logistic probe on the activations of given circuit units (neurons' ``mlp_post``,
  heads' ``attn_z``; ``circuitlab.monitor.circuit``), typically a circuit map's verified units.

Each is a ``FeatureMonitor``: a linear read-out ``w·concat(resid_pre(l) for l in layers) + b`` (or the
log-odds, or ``w·concat(unit activations) + b``), with a split-conformal threshold
(``circuitlab.monitor.conformal``). ``check`` runs the model only up to its deepest read layer or unit
(``run_with_cache`` stops there); the log-odds needs the whole model.
Fitting works on features read once (``read_features``), so many monitors and folds share one forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.methods.directions import diff_in_means
from circuitlab.methods.metrics import refusal_score_from_logits, refusal_tokens
from circuitlab.monitor.circuit import check_units, unit_features, unit_hooks, unit_key
from circuitlab.monitor.conformal import conformal_across_sources
from circuitlab.monitor.request import RequestCheck, RequestMonitor, probe_readout

__all__ = ["FeatureMonitor", "check_by_features", "read_features", "fit_feature_monitor", "select_layer",
           "DECISION_KINDS", "merge_features", "take", "choose_layers", "CIRCUIT"]

DECISION_KINDS = ("probe", "direction", "direction-late", "logodds", "multi-probe", "circuit-probe")
LOGODDS = "logodds"
CIRCUIT = "circuit-probe"


def read_features(model: HookedModel, prompts: Sequence[str], layers: Sequence[int], *, logodds: bool = False,
                  units: Sequence = (), fwd_hooks=(), batch_size: int = 16, progress: bool = False) -> dict:
    """``{layer: [n, d_model] resid_pre at the last position}`` (+ ``"logodds": [n]``, + each of ``units``
    under ``unit_key(u)``: ``[n, 1]`` a neuron, ``[n, d_head]`` a head) in one forward.

    Without ``logodds`` the forward stops after the deepest layer read. ``fwd_hooks`` (e.g. an attack's
    ablation) stay active, and the monitor sees the activations after they act.
    """
    prompts = list(getattr(prompts, "prompts", prompts))
    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{model.n_layers - 1}")
    units = check_units(units, model)
    names = [hk.resid_pre(l) for l in layers] + ([hk.final_resid()] if logodds else []) + unit_hooks(units)
    if not names:
        raise ValueError("read_features needs at least one layer, units or logodds=True")
    acts = model.run_with_cache(prompts, names, "last", fwd_hooks=fwd_hooks, batch_size=batch_size,
                                progress=progress, desc="monitor features")
    out = {l: acts[hk.resid_pre(l)][:, 0].float() for l in layers}
    out.update(unit_features(acts, units))
    if logodds:
        with torch.no_grad():
            logits = model.final_logits(acts[hk.final_resid()][:, 0]).float().cpu()
        out[LOGODDS] = refusal_score_from_logits(logits, refusal_tokens(model)).float()
    return out


def merge_features(*parts: dict) -> dict:
    """Rows of several feature dicts stacked (keys every part has)."""
    keys = set(parts[0]).intersection(*parts[1:])
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def take(feats: dict, idx) -> dict:
    """The rows ``idx`` of a feature dict."""
    idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return {k: v[idx] for k, v in feats.items()}


@dataclass
class FeatureMonitor(RequestMonitor):
    """``score = w · concat(resid_pre(l) for l in layers, then the units' activations) + b``, or the refusal
    log-odds (``kind="logodds"``).

    ``layer`` (the base field) is the deepest layer read; ``depth`` the layers a check computes.
    """

    layers: tuple = ()
    kind: str = "probe"
    n_model_layers: int = 0  # the whole model's depth (the log-odds runs all of it)
    source_thresholds: dict = field(default_factory=dict)
    units: tuple = ()  # circuit-probe: the neuron / head Components read

    def reads(self) -> tuple[list[int], bool]:
        return list(self.layers), self.kind == LOGODDS

    def reads_units(self) -> tuple:
        return tuple(self.units)

    @property
    def depth(self) -> int:
        if self.kind == LOGODDS:
            return self.n_model_layers
        return max([l + 1 for l in self.layers] + [u.layer + 1 for u in self.units])

    def score_features(self, feats: dict) -> torch.Tensor:
        if self.kind == LOGODDS:
            return feats[LOGODDS].float()
        x = torch.cat([feats[k].float() for k in _keys(self.layers, self.units)], dim=-1)
        return x @ self.weight.to(x.device) + self.bias

    def check(self, model: HookedModel, prompts: Sequence[str], *, batch_size: int = 16,
              fwd_hooks=()) -> RequestCheck:
        """Score and flag ``prompts``: one forward up to the deepest layer read (all layers for the log-odds)."""
        return check_by_features(self, model, prompts, batch_size=batch_size, fwd_hooks=fwd_hooks)


def check_by_features(monitor, model: HookedModel, prompts: Sequence[str], *, batch_size: int = 16,
                      fwd_hooks=()) -> RequestCheck:
    """The ``check`` of any monitor with ``reads()`` and ``score_features()``: one forward up to the
    deepest layer it reads, then its score against its threshold."""
    start = time.perf_counter()
    layers, logodds = monitor.reads()
    scores = monitor.score_features(read_features(model, prompts, layers, logodds=logodds, units=monitor.reads_units(),
                                                  fwd_hooks=fwd_hooks, batch_size=batch_size))
    return RequestCheck(scores, scores > monitor.threshold, monitor.threshold, monitor.layer,
                        time.perf_counter() - start)


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def _keys(layers, units) -> list:
    return list(layers) + [unit_key(u) for u in units]


def _stack(feats: dict, layers) -> np.ndarray:
    return torch.cat([feats[l].double() for l in layers], dim=-1).numpy()


def select_layer(train_pos: dict, train_neg: dict, val_pos: dict, val_neg: dict, layers: Sequence[int],
                 method: str = "probe", seed: int = 0) -> tuple[int, dict]:
    """The candidate layer whose ``method`` read-out (fit on train) has the best validation AUROC; ties go to
    the earliest (cheapest) layer. Returns it and ``{layer: val AUROC}``."""
    scores = {}
    for l in layers:
        w, b = _readout(method, [l], train_pos, train_neg, seed)
        scores[l] = _auroc(_stack(val_pos, [l]) @ w, _stack(val_neg, [l]) @ w)
    best = max(layers, key=lambda l: (round(scores[l], 9), -l))
    return best, scores


def _readout(method, layers, pos, neg, seed):
    hp, hn = _stack(pos, layers), _stack(neg, layers)
    if method in ("probe", "multi-probe", CIRCUIT):
        return probe_readout(hp, hn, seed)
    ws, bs = [], []
    for l in layers:  # per-layer unit direction; the score is their mean projection
        d = diff_in_means(_stack(pos, [l]), _stack(neg, [l]))
        w = d / (np.linalg.norm(d) + 1e-12)
        ws.append(w / len(layers))
        bs.append(-float(w @ (_stack(pos, [l]).mean(0) + _stack(neg, [l]).mean(0)) / 2) / len(layers))
    return np.concatenate(ws), float(sum(bs))


def choose_layers(kind: str, fit_pos: dict, fit_neg: dict, cal_pos: dict, cal_neg: dict, n_layers: int,
                  candidates: Sequence[int] | None = None, seed: int = 0) -> tuple[list[int], dict]:
    """The layers a ``kind`` monitor reads, chosen on features only (``{layer: val AUROC}`` where selected).

    ``probe`` / ``direction``: the best candidate by validation AUROC; ``direction-late``: that layer and every
    second later one; ``multi-probe``: the candidates given, else every ``n_layers // 6``-th layer;
    ``logodds`` and ``circuit-probe`` read no ``resid_pre`` layer. Candidates default to ``1..n_layers-1``.
    """
    if kind in (LOGODDS, CIRCUIT):
        return [], {}
    if kind == "multi-probe":
        step = max(1, n_layers // 6)
        return (list(candidates) if candidates else list(range(step, n_layers, step))), {}
    best, scores = select_layer(fit_pos, fit_neg, cal_pos, cal_neg, list(candidates or range(1, n_layers)),
                                "direction" if kind.startswith("direction") else "probe", seed)
    return (list(range(best, n_layers, 2)) if kind == "direction-late" else [best]), scores


def _is_by_source(val_neg) -> bool:
    """``{source: feature dict}`` (values are dicts), not one feature dict (values are tensors)."""
    return isinstance(val_neg, dict) and bool(val_neg) and all(isinstance(v, dict) for v in val_neg.values())


def fit_feature_monitor(kind: str, train_pos: dict, train_neg: dict, val_pos: dict, val_neg: dict | list,
                        *, layers: Sequence[int] = (), units: Sequence = (), n_model_layers: int, alpha: float = 0.05,
                        calibration: str = "pooled", seed: int = 0) -> FeatureMonitor:
    """Fit a ``kind`` monitor on train features (``{layer: tensor}`` per class) and set its threshold by
    split-conformal calibration on the benign validation features.

    ``val_neg``: one feature dict or ``{source: feature dict}`` (``calibration="max"`` keeps the strictest
    source's conformal threshold). ``layers``: the layer(s) read (``probe``/``direction``: one; the others:
    several; ``logodds`` and ``circuit-probe``: none). ``units``: the neuron / head Components a
    ``circuit-probe`` reads (features from ``read_features(..., units=units)``). AUROC is recorded on the
    validation features.
    """
    if kind not in DECISION_KINDS:
        raise ValueError(f"kind={kind!r}; use one of {', '.join(DECISION_KINDS)}")
    layers, units = tuple(int(l) for l in layers), check_units(units)
    if kind in ("probe", "direction") and len(layers) != 1:
        raise ValueError(f"kind={kind!r} reads one layer; got layers={list(layers)}")
    if kind == CIRCUIT and (layers or not units):
        raise ValueError(f"kind={kind!r} reads circuit units, not layers (got layers={list(layers)}, "
                         f"{len(units)} units); give units=read_units(RUN_OR_CSV) or locate_components(...)")
    if kind not in (LOGODDS, CIRCUIT) and not layers:
        raise ValueError(f"kind={kind!r} needs layers (e.g. layers=[12])")
    units = units if kind == CIRCUIT else ()
    by_source = val_neg if _is_by_source(val_neg) else {"val": val_neg}
    if kind == LOGODDS:
        w, b, layers = np.zeros(0), 0.0, ()
    else:
        method = "direction" if kind.startswith("direction") else kind
        w, b = _readout(method, _keys(layers, units), train_pos, train_neg, seed)
    deepest = n_model_layers if kind == LOGODDS else max([*layers, *(u.layer for u in units)])
    mon = FeatureMonitor(layer=deepest, method=kind, weight=torch.tensor(w, dtype=torch.float32), bias=float(b),
                         threshold=float("inf"), target_fpr=alpha, val_auroc=float("nan"),
                         calibration=f"conformal-{calibration}", layers=layers, kind=kind,
                         n_model_layers=n_model_layers, units=units)
    neg_scores = {name: mon.score_features(f).numpy() for name, f in by_source.items()}
    mon.threshold, mon.source_thresholds = conformal_across_sources(neg_scores, alpha, calibration)
    mon.val_auroc = _auroc(mon.score_features(val_pos).numpy(), np.concatenate(list(neg_scores.values())))
    return mon
