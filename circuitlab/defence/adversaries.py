"""Adversaries for adversarial hardening: what ``finetune.train(adversary=...)`` ablates at each step.

Call protocol: ``adversary(step, n_rows) -> (hooks, rows)``: the hooks act during that step's forward on
the hardening rows where ``rows`` (bool ``[n_rows]``) is True, never on the retain rows (``on_rows``).
``RefusalAblationAdversary`` is ReFAT's (Yu et al. 2024), ``RandomSubspaceAdversary`` DeepRefusal's
(arXiv 2509.15202); ``redundant.MechanismAdversary`` (the redundant-circuits remedy) follows the same protocol.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore
from circuitlab.methods.directions import candidate_directions, diff_in_means, unit
from circuitlab.methods.interventions import directional_ablation_hooks

__all__ = ["on_rows", "RefusalAblationAdversary", "RandomSubspaceAdversary"]


def on_rows(hooks, rows: torch.Tensor) -> list:
    """``hooks`` acting on the batch rows where ``rows`` (bool ``[batch]``) is True; other rows pass unchanged."""
    def restrict(fn):
        def restricted(act, hook):
            out = fn(act, hook)
            if out is None:
                return None
            keep = rows.to(act.device).view(-1, *([1] * (act.dim() - 1)))
            return torch.where(keep, out, act)
        return restricted
    return [(name, restrict(fn)) for name, fn in hooks]


class RefusalAblationAdversary:
    """ReFAT's simulated attack (Yu et al. 2024): refusal-feature ablation on the model being trained.

    ``keys``: ``(layer, post-instruction offset)`` pairs; for each, the difference in means of
    ``resid_pre(layer)`` at that offset over ``harmful`` vs ``harmless`` prompts, recomputed on the
    CURRENT weights at step 0 and every ``refresh_every`` steps after (ReFAT recomputes every few
    steps). Several keys are orthonormalised and the whole span is projected out. Each hardening row
    is ablated with probability ``prob`` (ReFAT ablates part of the harmful inputs). ``history``
    records ``(step, directions [k, d_model])`` of every refresh.
    """

    def __init__(self, model: HookedModel, harmful: Sequence[str], harmless: Sequence[str],
                 keys: Sequence[tuple[int, int]], *, refresh_every: int = 4, prob: float = 1.0, seed: int = 0,
                 batch_size: int = 16):
        if not keys or refresh_every < 1 or not 0 < prob <= 1:
            raise ValueError(f"need keys, refresh_every >= 1 and prob in (0, 1]; got {keys}, {refresh_every}, {prob}")
        bad = [k for k in keys if not (0 <= k[0] < model.n_layers and -model.n_post <= k[1] < 0)]
        if bad:
            raise ValueError(f"keys {bad} are not (layer in 0..{model.n_layers - 1}, offset in -{model.n_post}..-1)")
        self.model, self.keys, self.refresh_every, self.prob = model, [tuple(k) for k in keys], refresh_every, prob
        self.prompts = (list(harmful), list(harmless))
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.directions: torch.Tensor | None = None
        self.history: list[tuple[int, torch.Tensor]] = []

    def compute(self) -> torch.Tensor:
        """Orthonormal refusal directions ``[k, d_model]`` on the current weights (no gradient)."""
        names = sorted({hk.resid_pre(l) for l, _ in self.keys})
        offsets = sorted({o for _, o in self.keys})
        acts = [self.model.run_with_cache(p, names, offsets, batch_size=self.batch_size) for p in self.prompts]
        vecs = [unit(diff_in_means(acts[0][hk.resid_pre(l)][:, offsets.index(o)],
                                   acts[1][hk.resid_pre(l)][:, offsets.index(o)])) for l, o in self.keys]
        q, _ = torch.linalg.qr(torch.stack(vecs, 1))  # orthonormal basis of their span
        return q.T.contiguous()

    def __call__(self, step: int, n_rows: int) -> tuple[list, torch.Tensor]:
        """Hooks for this step and which of the ``n_rows`` hardening rows they act on."""
        if self.directions is None or step % self.refresh_every == 0:
            self.directions = self.compute()
            self.history.append((step, self.directions.clone()))
        hooks = [h for d in self.directions for h in directional_ablation_hooks(self.model, d)]
        return hooks, torch.rand(n_rows, generator=self.generator) < self.prob


class RandomSubspaceAdversary:
    """DeepRefusal-style adversary (arXiv 2509.15202): at EVERY step a random member of the refusal
    subspace is ablated — k ~ U{1..max_k} difference-in-means directions at k random (layer, post-
    instruction offset) keys, orthonormalised, projected out of the residual stream from the first drawn
    layer onward (all positions) — so refusal must be carried by more than any one direction, layer or
    token. The candidate directions (``directions.candidate_directions``, every layer × offset) are
    recomputed on the CURRENT weights every ``refresh_every`` steps; keys whose means coincide (zero
    vectors) are never drawn. ``history``: ``(step, layer, keys)`` per step; same call protocol as
    ``RefusalAblationAdversary``."""

    def __init__(self, model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *, max_k: int = 8,
                 refresh_every: int = 4, prob: float = 1.0, seed: int = 0, batch_size: int = 16):
        if not 1 <= max_k or refresh_every < 1 or not 0 < prob <= 1:
            raise ValueError(f"need max_k >= 1, refresh_every >= 1 and prob in (0, 1]; got {max_k}, "
                             f"{refresh_every}, {prob}")
        self.model, self.max_k, self.refresh_every, self.prob = model, max_k, refresh_every, prob
        self.prompts, self.batch_size = (list(harmful), list(harmless)), batch_size
        self.rng, self.generator = random.Random(seed), torch.Generator().manual_seed(seed)
        self.candidates: dict | None = None
        self.history: list[tuple[int, int, list]] = []

    def compute(self) -> dict:
        """Unit candidate directions ``{(layer, offset): vector}`` on the current weights (non-zero only)."""
        found = candidate_directions(self.model, *self.prompts, ActivationStore(disk=False), batch_size=self.batch_size)
        out = {k: unit(v) for k, v in found.items() if v.float().norm() > 1e-6}
        if not out:
            raise ValueError("harmful and harmless means coincide at every layer and offset: nothing to ablate")
        return out

    def __call__(self, step: int, n_rows: int) -> tuple[list, torch.Tensor]:
        if self.candidates is None or step % self.refresh_every == 0:
            self.candidates = self.compute()
        keys = self.rng.sample(sorted(self.candidates), min(self.rng.randint(1, self.max_k), len(self.candidates)))
        q, _ = torch.linalg.qr(torch.stack([self.candidates[k].float() for k in keys], 1))
        first = min(l for l, _ in keys)
        self.history.append((step, first, keys))
        layers = range(first, self.model.n_layers)
        hooks = [h for d in q.T for h in directional_ablation_hooks(self.model, d, layers=layers)]
        return hooks, torch.rand(n_rows, generator=self.generator) < self.prob
