"""The refusal cone as an abliteration family: Heretic's per-layer kernels removing a rank-k subspace
(k ≤ 4) instead of one direction.

Wollschläger et al. 2025, "The Geometry of Refusal in Large Language Models: Concept Cones and
Representational Independence" (ICML 2025): refusal is mediated by several directions spanning a
cone, and a rank-k attack that ablates a k-dimensional subspace removes refusal that ablating the
single difference-in-means direction leaves.

Design:

- **The cone at a layer** (``cone_bases``) comes from the model's own activations: the harmful and
  harmless ``resid_post(l)`` at the last prompt token (what ``abliteration.residual_directions`` reads,
  through the same store) go to ``directions.subspace_basis``, the one rank-k basis circuitlab has
  (also behind ``defence.attacks``' ``rank_k_ablation``). Vector 1 is the unit difference in means —
  the layer's rank-1 direction (equal to rounding) —; vectors 2..k are, with vector 1 projected out,
  the top generalized eigenvectors of the harmful second moment against the harmless covariance: the
  directions along which harmful prompts carry refusal differently (the cone's other edges).
  Orthonormal; a layer gets fewer than ``max_k`` vectors (zero rows) where the data support fewer,
  and none where both means coincide.
- **Parameters** (``ConeParams``): Heretic's ``AbliterationParams`` (a kernel of strengths over layers
  per writer, the direction scope and fractional index) and the rank ``k``.
- **The edit** (``cone_edits``): per layer and writer Heretic's kernel weight w, one
  ``abliteration.Edit`` whose direction is the layer's first k cone vectors, so the writer loses the
  whole subspace, ``W ← W − w Q Qᵀ W``, through abliteration's one orthogonalization (weights and
  hooks alike). Global scope, a fractional ``direction_index`` i: vector 1 is Heretic's interpolated
  direction (``abliteration.direction_at`` of the layers' first vectors), vectors 2..k are those of the
  nearest layer (eigenvectors have no sign or order to interpolate), orthonormalised against it by
  ``Edit``.
- At k = 1 the family is the ``heretic`` family on the cone's first vectors (tests/test_cone.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore
from circuitlab.methods.abliteration import AbliterationParams, Edit, direction_at, layer_weights
from circuitlab.methods.directions import subspace_basis

__all__ = ["MAX_K", "ConeParams", "cone_bases", "cone_at", "cone_edits"]

MAX_K = 4  # the family: ranks 1..4


@dataclass(frozen=True)
class ConeParams:
    """One point of the cone family: Heretic's kernels and direction scope, and the rank ``k``."""

    kernels: AbliterationParams
    k: int = 1

    def __post_init__(self):
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k={self.k} must be an integer >= 1")

    def flat(self) -> dict:
        """``AbliterationParams.flat()`` plus ``k``: one table row's parameters."""
        return {**self.kernels.flat(), "k": int(self.k)}

    @classmethod
    def from_flat(cls, row: dict) -> "ConeParams":
        """The inverse of ``flat``."""
        return cls(AbliterationParams.from_flat(row), int(row["k"]))


def cone_bases(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *, max_k: int = MAX_K,
               store: ActivationStore | None = None, batch_size: int = 16) -> torch.Tensor:
    """``[n_layers, max_k, d_model]``: per layer the orthonormal refusal cone (``subspace_basis`` of the
    last-token ``resid_post`` activations), zero rows beyond what the layer's data support."""
    if max_k < 1:
        raise ValueError(f"max_k={max_k} must be >= 1")
    store = store if store is not None else ActivationStore()
    names = [hk.resid_post(l) for l in range(model.n_layers)]
    acts = [store.get(model, list(getattr(p, "prompts", p)), names, "last", batch_size=batch_size)
            for p in (harmful, harmless)]
    out = torch.zeros(model.n_layers, max_k, model.d_model)
    for l, n in enumerate(names):
        try:
            basis = subspace_basis([acts[0][n][:, 0]], [acts[1][n][:, 0]], max_k)
        except ValueError:  # both means coincide: no refusal direction at this layer, so no edit
            continue
        out[l, : len(basis)] = basis
    return out


def cone_at(cones: torch.Tensor, index: float, k: int) -> torch.Tensor:
    """The global cone at a fractional layer ``index`` (``[k', d_model]``, k' ≤ k, unnormalised rows):
    Heretic's interpolated first vector, then the nearest layer's vectors 2..k; empty when the first
    vector is zero."""
    first = direction_at(cones[:, 0], index)
    if not first.any():
        return cones.new_zeros(0, cones.shape[-1])
    rest = cones[int(round(index)), 1:k]
    return torch.cat([first[None], rest[rest.any(dim=1)]])


def cone_edits(model: HookedModel, cones: torch.Tensor, params: ConeParams, *,
               norm_preserving: bool = False) -> list[Edit]:
    """Heretic's kernels over layers and writers, each edit removing the first ``k`` cone vectors of its
    layer (per-layer scope) or the global cone (``cone_at``); layers with no cone are not edited."""
    kernels, k = params.kernels, params.k
    weights = layer_weights(kernels, model.n_layers)
    shared = None if kernels.direction_index is None else cone_at(cones, kernels.direction_index, k)
    edits = []
    for l in range(model.n_layers):
        basis = cones[l, :k][cones[l, :k].any(dim=1)] if shared is None else shared
        if not len(basis) or not basis[0].any():
            continue
        direction = basis[0] if len(basis) == 1 else basis  # rank 1: the very edit of the rank-1 family
        for writer, kind in (("attn", "attn_out"), ("mlp", "mlp_out")):
            if weights[writer][l] != 0:  # a zero weight is no edit at all
                edits.append(Edit(l, kind, None, weights[writer][l], direction, norm_preserving))
    return edits
