"""Redundant-circuits hardening: refusal that each of several independent mechanisms carries alone.

The seed's fourth remedy ("redundant circuits: several independent paths to refusal, so no single
ablation removes it"). ``MechanismAdversary`` ablates, at every training step, every refusal
mechanism but one (the kept one drawn at random) on the hardening rows, so each mechanism must learn
to produce the refusal on its own. The mechanisms are recomputed on the CURRENT weights every
``refresh_every`` steps (as ReFAT recomputes its direction, Yu et al. 2024), so training chases the
mechanisms the model has now, not the original's:

- ``top_units``: the top ``n_units`` neurons and heads ranked together by attribution patching
  (``attacks.attribution_units``), mean-ablated to their harmless means (the unit-ablation attack);
- ``top_direction``: the difference-in-means direction at ``keys`` (``(layer, offset)``, e.g. the
  original's strongest candidate), projected out at every layer (the direction attack).

With two mechanisms "all but one" is "one of the two". The test of the result is
``attacks.redundancy``: with all but one mechanism ablated, does that one alone keep refusal?

``keep=0`` (the ``joint`` mode) ablates every mechanism at once at every step: ReFAT ablates the
direction and, on this model, refusal moves into a few units the unit attack then finds
(docs/results/robust-safety.md); with both gone together, refusal must be learnt beyond the two.

Same call protocol as ``adversaries.RefusalAblationAdversary``: ``adversary(step, n_rows) -> (hooks, rows)``.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from circuitlab.core.components import from_table
from circuitlab.defence.attacks import attribution_units
from circuitlab.defence.adversaries import RefusalAblationAdversary
from circuitlab.io.store import ActivationStore
from circuitlab.methods.interventions import ablation_hooks, directional_ablation_hooks, reference_activations

__all__ = ["MechanismAdversary", "MECHANISMS"]

MECHANISMS = ("top_units", "top_direction")


class MechanismAdversary:
    """Ablate all refusal mechanisms but ``keep`` (1: one drawn at random per step; 0: none kept, every
    mechanism ablated) on the hardening rows (each row with chance ``prob``). ``history``: ``(step, kept
    mechanism or None)`` per step; ``refreshes``: the steps at which the mechanisms were recomputed."""

    def __init__(self, model, harmful: Sequence[str], harmless: Sequence[str], keys: Sequence[tuple[int, int]], *,
                 n_units: int = 16, mechanisms: Sequence[str] = MECHANISMS, keep: int = 1, refresh_every: int = 4,
                 prob: float = 1.0, seed: int = 0, batch_size: int = 16):
        unknown = [m for m in mechanisms if m not in MECHANISMS]
        if unknown or len(set(mechanisms)) < 2:
            raise ValueError(f"mechanisms={list(mechanisms)}: give at least two distinct of {', '.join(MECHANISMS)}")
        if n_units < 1:
            raise ValueError(f"n_units={n_units} must be >= 1")
        if keep not in (0, 1):
            raise ValueError(f"keep={keep}: 1 keeps one mechanism per step (redundant), 0 ablates them all (joint)")
        # the direction mechanism is ReFAT's recomputed direction; its checks (keys, refresh, prob) are reused
        self._direction = RefusalAblationAdversary(model, harmful, harmless, keys, refresh_every=refresh_every,
                                                   prob=prob, seed=seed, batch_size=batch_size)
        self.model, self.mechanisms, self.n_units, self.keep = model, tuple(mechanisms), n_units, keep
        self.refresh_every, self.prob, self.batch_size = refresh_every, prob, batch_size
        self.prompts = (list(harmful), list(harmless))
        self.rng, self.generator = random.Random(seed), torch.Generator().manual_seed(seed)
        self.hooks: dict[str, list] | None = None
        self.history: list[tuple[int, str]] = []
        self.refreshes: list[int] = []

    def compute(self) -> dict[str, list]:
        """``{mechanism: hooks that ablate it}`` on the current weights (attribution needs its own backward pass;
        any gradient it leaves on the trained tensors is zeroed by ``train`` before the step's backward)."""
        out = {}
        if "top_units" in self.mechanisms:
            units = attribution_units(self.model, *self.prompts, batch_size=self.batch_size)
            comps = from_table(units.head(self.n_units))
            with torch.no_grad():
                reference = reference_activations(self.model, comps, self.prompts[1], ActivationStore(disk=False),
                                                  batch_size=self.batch_size)
            out["top_units"] = ablation_hooks(self.model, comps, "mean", reference=reference)
        if "top_direction" in self.mechanisms:
            with torch.no_grad():
                directions = self._direction.compute()
            out["top_direction"] = [h for d in directions for h in directional_ablation_hooks(self.model, d)]
        return out

    def __call__(self, step: int, n_rows: int) -> tuple[list, torch.Tensor]:
        if self.hooks is None or step % self.refresh_every == 0:
            self.hooks = self.compute()
            self.refreshes.append(step)
        kept = self.rng.choice(self.mechanisms) if self.keep else None
        self.history.append((step, kept))
        hooks = [h for name, hs in self.hooks.items() if name != kept for h in hs]
        return hooks, torch.rand(n_rows, generator=self.generator) < self.prob
