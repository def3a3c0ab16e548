"""Linear probes: cross-validated logistic regression with a shuffled-label control.

Probing for linearly readable information (Alain & Bengio 2016, "Understanding intermediate layers
using linear classifier probes"; per head as in Li et al. 2023, "Inference-Time Intervention"). The
selectivity control of Hewitt & Liang 2019 is the same probe, same folds procedure, trained and
tested on shuffled labels: a probe that is only as good as its control reads nothing.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["cross_validated_probe", "best_position_accuracy", "SOLVERS"]

SOLVERS = ("liblinear", "lbfgs", "newton-cg", "newton-cholesky", "sag", "saga")


def _folds(y: np.ndarray, n_splits: int, seed: int, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; with ``groups`` (matched pairs) a group never straddles train and test."""
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def _shuffle_labels(y: np.ndarray, seed: int, groups=None) -> np.ndarray:
    """Labels permuted at random (within each group when groups are given: pairs stay pairs)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(y)
    out = y.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = rng.permutation(y[idx])
    return out


def _fit_score(X, y, folds, C, max_iter, solver) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy and AUROC of a standardised logistic-regression probe."""
    acc, auc = [], []
    for train, test in folds:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, solver=solver))
        probe.fit(X[train], y[train])
        acc.append(probe.score(X[test], y[test]))
        auc.append(roc_auc_score(y[test], probe.decision_function(X[test])))
    return np.array(acc), np.array(auc)


def cross_validated_probe(X: np.ndarray, y: np.ndarray, *, groups=None, n_splits: int = 5, C: float = 1.0,
                          max_iter: int = 1000, seed: int = 0, control_repeats: int = 1,
                          solver: str = "liblinear") -> dict:
    """Cross-validated probe accuracy/AUROC on ``X [n, d]``, labels ``y``, and its shuffled-label control.

    ``groups`` (e.g. a pair id for matched prompt pairs) keeps each group inside one fold, so a
    probe is never tested on the twin of a training prompt.
    """
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    y = np.asarray(y)
    groups = None if groups is None else np.asarray(groups)
    folds = _folds(y, n_splits, seed, groups)
    acc, auc = _fit_score(X, y, folds, C, max_iter, solver)
    control = [np.nan] if control_repeats == 0 else []  # 0: no control (callers that need accuracy only)
    for repeat in range(control_repeats):  # more repeats: less noise in the control accuracy
        shuffled = _shuffle_labels(y, seed + repeat, groups)
        control.append(_fit_score(X, shuffled, _folds(shuffled, n_splits, seed, groups), C, max_iter, solver)[0].mean())
    control = np.array(control)
    return {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()), "auroc_mean": float(np.mean(auc)),
            "control_accuracy": float(control.mean()), "selectivity": float(acc.mean() - control.mean()),
            "n_train": int(round(np.mean([len(tr) for tr, _ in folds]))),
            "n_test": int(round(np.mean([len(te) for _, te in folds])))}


def best_position_accuracy(harmful: np.ndarray, harmless: np.ndarray, *, n_splits: int = 5, seed: int = 0,
                           **probe) -> float:
    """Best cross-validated accuracy over positions of probes telling harmful ``[n, positions, d]`` from
    harmless activations (no shuffled-label control: the caller reads accuracy only)."""
    X = np.concatenate([np.asarray(harmful, dtype=np.float64), np.asarray(harmless, dtype=np.float64)])
    y = np.r_[np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)]
    n_splits = min(n_splits, len(harmful), len(harmless))
    return max(cross_validated_probe(X[:, j], y, n_splits=n_splits, seed=seed, control_repeats=0,
                                     **probe)["accuracy_mean"] for j in range(X.shape[1]))
