"""An "any member fires" ensemble of request monitors, with a documented rule and its false-alarm bound.

Rule (``UnionMonitor``): each of the ``m`` members is calibrated (split-conformal) to ``alpha / m``; the
ensemble flags a prompt when any member flags it. By the union bound (Bonferroni) the ensemble's false-alarm
rate on exchangeable benign traffic is at most ``alpha``. Its score is ``max_i (s_i - t_i) / sigma_i``
(member score minus member threshold, in units of the member's benign calibration spread), so
``score > 0`` is exactly "some member fires", and the score ranks prompts for ROC curves.
Used with a content probe (reads the topic, cheap, survives an ablated refusal direction) and a decision
monitor (reads the decision, fewer false alarms on sensitive-but-benign questions): an attacker must
defeat both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from circuitlab.core.model import HookedModel
from circuitlab.monitor.decision import check_by_features
from circuitlab.monitor.request import RequestCheck, RequestMonitor

__all__ = ["UnionMonitor", "union_of"]


@dataclass
class UnionMonitor(RequestMonitor):
    """Flags when any member flags; members hold their own (``alpha / m``) thresholds. ``threshold`` is 0."""

    members: list = field(default_factory=list)
    scales: list = field(default_factory=list)  # benign calibration std per member

    def reads(self) -> tuple[list[int], bool]:
        layers, logodds = set(), False
        for m in self.members:
            l, lo = m.reads()
            layers.update(l)
            logodds = logodds or lo
        return sorted(layers), logodds

    def reads_units(self) -> tuple:
        return tuple(dict.fromkeys(u for m in self.members for u in m.reads_units()))

    @property
    def depth(self) -> int:
        return max(m.depth for m in self.members)

    def score_features(self, feats: dict) -> torch.Tensor:
        parts = [(m.score_features(feats) - m.threshold) / s for m, s in zip(self.members, self.scales)]
        # a member with an infinite threshold (too few calibration prompts) never fires: finite, lowest score
        return torch.nan_to_num(torch.stack(parts).max(0).values, neginf=-1e30)

    def check(self, model: HookedModel, prompts: Sequence[str], *, batch_size: int = 16,
              fwd_hooks=()) -> RequestCheck:
        """One forward up to the deepest member's layer, then every member's score."""
        return check_by_features(self, model, prompts, batch_size=batch_size, fwd_hooks=fwd_hooks)


def union_of(members: Sequence[RequestMonitor], benign_val: dict | list, alpha: float, *,
             fit_member) -> UnionMonitor:
    """Build the union ensemble: ``fit_member(i, alpha_i)`` refits member ``i`` calibrated to ``alpha / m``
    (the caller's own fit, so the members' calibration data stay the caller's); ``benign_val`` (a feature
    dict, or a list of them) gives each member's spread."""
    m = len(members)
    if m < 2:
        raise ValueError(f"a union needs at least 2 members, got {m}")
    refit = [fit_member(i, alpha / m) for i in range(m)]
    feats = benign_val if isinstance(benign_val, list) else [benign_val]
    scales = []
    for mon in refit:
        s = np.concatenate([mon.score_features(f).numpy() for f in feats])
        scales.append(float(s.std()) or 1.0)
    return UnionMonitor(layer=max(x.layer for x in refit), method="union(" + "+".join(x.method for x in refit) + ")",
                        weight=torch.zeros(0), bias=0.0, threshold=0.0, target_fpr=alpha,
                        val_auroc=float("nan"), calibration="bonferroni", members=refit, scales=scales)
