"""Split-conformal calibration of a monitor's threshold (Vovk et al. 2005; Angelopoulos & Bates 2021,
"A gentle introduction to conformal prediction", §1: the finite-sample quantile).

Guarantee: if the ``n`` calibration scores and a new benign prompt's score are exchangeable (the new
prompt comes from the same traffic), then with ``t`` the ``k``-th smallest calibration score,
``k = ceil((n + 1)(1 - alpha))``, ``P(score_new > t) <= alpha`` (averaged over calibration draws;
for continuous scores it is also ``>= alpha - 1/(n + 1)``). With ``k > n`` no finite threshold meets
``alpha``: the threshold is ``+inf`` (the monitor never fires) and ``min_calibration_size`` says how
many prompts are needed. The guarantee says nothing about traffic from a source the calibration set
did not sample: that is what leave-one-source-out measures.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["conformal_threshold", "conformal_rank", "min_calibration_size", "conformal_across_sources"]


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank (1-based, ascending) of the calibration score used as threshold."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n < 1:
        raise ValueError(f"conformal calibration needs at least 1 benign score, got {n}")
    return math.ceil((n + 1) * (1 - alpha) - 1e-12)  # the epsilon keeps float noise from bumping k by one


def min_calibration_size(alpha: float) -> int:
    """Fewest calibration scores for which the threshold is finite: ``ceil(1/alpha) - 1``."""
    return math.ceil(1 / alpha - 1e-12) - 1


def conformal_threshold(benign_scores, alpha: float) -> float:
    """Threshold ``t`` (flag when ``score > t``) with ``P(false alarm) <= alpha`` for exchangeable benign traffic."""
    s = np.sort(np.asarray(benign_scores, dtype=float))
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError("benign_scores must be a 1-d array of finite numbers")
    k = conformal_rank(len(s), alpha)
    return float(s[k - 1]) if k <= len(s) else float("inf")


def conformal_across_sources(scores_by_source: dict, alpha: float, rule: str = "pooled") -> tuple[float, dict]:
    """Threshold for ``{source: benign scores}``: ``pooled`` (one exchangeable pool) or ``max`` (each source's
    own conformal threshold, the strictest kept: the guarantee then holds for traffic like ANY one source)."""
    if rule not in ("pooled", "max"):
        raise ValueError(f"rule={rule!r}; use pooled or max")
    per = {name: conformal_threshold(v, alpha) for name, v in scores_by_source.items()}
    if rule == "max":
        return max(per.values()), per
    return conformal_threshold(np.concatenate([np.asarray(v, float) for v in scores_by_source.values()]), alpha), per
