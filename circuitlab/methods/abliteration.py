"""Abliteration as a parameterised family of weight edits: Heretic's per-layer kernel, top-writer
targeting, one global direction — each applied as weight orthogonalization (reversible) or as hooks.

The pieces live in their own modules, and this one re-exports their public names
(``from circuitlab.methods.abliteration import ...`` keeps working for all of them):

- ``abliteration_edits``: an ``Edit`` removes a fraction ``weight`` of a unit direction r̂ (or of a
  ``[k, d_model]`` subspace) from what one writer — a layer's attention or MLP output, one head, one
  neuron — puts into the residual stream, ``W ← W − w · r̂ r̂ᵀ W``; ``abliterated`` applies a list of
  edits to the weights and restores them on exit (``norm_preserved``: Heretic's norm-preserving
  variant); ``export_abliterated`` writes the edited model as an HF folder.
- ``abliteration_hooks``: ``edit_hooks``, the same map as forward hooks on the unedited model (tested
  equal).
- ``abliteration_scoring``: ``score_model``, one row of measures for the model as it is now.

This module holds Heretic's parameters and the families that choose the edits (Arditi et al. 2024
§4.1 orthogonalization; Heretic, p-e-w/heretic, for the kernel — its parameter semantics are
reproduced from its documentation and behaviour, no Heretic code is used):

- ``heretic_edits``: per component (attention, MLP) a weight kernel over layers (``Kernel``: peak
  ``max_weight`` at ``max_weight_position``, falling linearly to ``min_weight`` at distance
  ``min_weight_distance``, zero beyond), with each layer's own direction or one global direction
  interpolated at a fractional ``direction_index`` (``AbliterationParams``). Heretic does not edit the
  embedding; neither does this family.
- ``targeted_edits``: the direction removed only from the ``top_n`` writers (heads, MLP layers, or
  neurons) that write it most (``direction_eval.direction_components``, ranked by harmful − harmless).
- ``global_edits``: one direction, one weight, every layer's attention and MLP output.

``residual_directions`` gives the per-layer unit difference-in-means directions these index into.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore
from circuitlab.methods.abliteration_edits import (EDIT_KINDS, WRITERS, Edit, abliterated, describe_edits,
                                                   export_abliterated, norm_preserved)
from circuitlab.methods.abliteration_hooks import edit_hooks
from circuitlab.methods.abliteration_scoring import score_model
from circuitlab.methods.direction_eval import direction_components
from circuitlab.methods.directions import mean_differences, project_out

__all__ = ["Kernel", "AbliterationParams", "Edit", "EDIT_KINDS", "WRITERS", "layer_weights", "residual_directions",
           "direction_at", "heretic_edits", "targeted_edits", "global_edits", "top_writers", "abliterated",
           "edit_hooks", "export_abliterated", "describe_edits", "score_model", "norm_preserved"]


# ---- parameters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """Heretic's ablation-weight kernel of one component over layers (weights usually in [0, 1.5])."""

    max_weight: float  # weight at the peak layer position
    max_weight_position: float  # fractional layer index of the peak
    min_weight: float  # weight at distance min_weight_distance from the peak
    min_weight_distance: float  # layers further than this from the peak are not edited

    def __post_init__(self):
        if not all(math.isfinite(float(v)) for v in asdict(self).values()):
            raise ValueError(f"kernel values must be finite numbers, got {self}")
        if self.min_weight_distance <= 0:
            raise ValueError(f"min_weight_distance={self.min_weight_distance} must be > 0 (Heretic samples 1 or more)")

    def at(self, layer: int) -> float:
        """The weight at ``layer``: linear from max_weight (peak) to min_weight (edge), 0 outside."""
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        return self.max_weight + distance / self.min_weight_distance * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class AbliterationParams:
    """One point of Heretic's family: a kernel per writer and the direction (per layer, or one global).

    ``direction_index`` None: every layer ablates its own direction (Heretic's "per layer" scope); a
    float d: one global direction, ``direction_at(directions, d)`` (Heretic's "global" scope).
    """

    attn: Kernel
    mlp: Kernel
    direction_index: float | None = None

    @property
    def scope(self) -> str:
        """``"per layer"`` or ``"global"`` (Heretic's direction_scope)."""
        return "per layer" if self.direction_index is None else "global"

    def flat(self) -> dict:
        """``{direction_scope, direction_index, attn.max_weight, ...}``: one table row's parameters."""
        out = {"direction_scope": self.scope, "direction_index": self.direction_index}
        for writer in WRITERS:
            out.update({f"{writer}.{k}": v for k, v in asdict(getattr(self, writer)).items()})
        return out

    @classmethod
    def from_flat(cls, row: dict) -> "AbliterationParams":
        """The inverse of ``flat`` (extra keys are ignored; a NaN direction_index means per layer)."""
        kernels = {w: Kernel(**{k: float(row[f"{w}.{k}"]) for k in Kernel.__dataclass_fields__}) for w in WRITERS}
        index = row.get("direction_index")
        per_layer = index is None or row.get("direction_scope") == "per layer" or pd.isna(index)
        return cls(direction_index=None if per_layer else float(index), **kernels)



def layer_weights(params: AbliterationParams, n_layers: int) -> dict[str, list[float]]:
    """``{writer: [weight of layer 0, ..., layer n-1]}`` of Heretic's kernels (0 = layer not edited)."""
    return {w: [getattr(params, w).at(l) for l in range(n_layers)] for w in WRITERS}



# ---- directions ----------------------------------------------------------------------------------

def _unit_or_zero(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` normalised, or zeros when it is (numerically) zero: no direction, so no edit."""
    vector = vector.detach().float().flatten()
    norm = vector.norm()
    # the same cut-off as direction_eval.score_candidates: below it there is nothing to ablate
    return vector / norm if norm > 1e-6 else torch.zeros_like(vector)


def residual_directions(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], *,
                        store: ActivationStore | None = None, batch_size: int = 16,
                        orthogonalize: bool = False) -> torch.Tensor:
    """Unit difference in means of the residual stream leaving each layer, last prompt token,
    ``[n_layers, d_model]`` (row l: ``resid_post(l)``, Heretic's refusal direction of layer l; Heretic
    also uses the final norm's output for the last layer, circuitlab the raw residual). A layer where
    both means coincide (nothing told the sets apart yet) gets a zero row, which edits nothing.

    ``orthogonalize``: Heretic's ``orthogonalize_direction`` (its default; "projected abliteration"):
    each row r̂ minus its component along the unit harmless mean ĝ of that layer, renormalised,
    ``unit(r̂ − (r̂·ĝ) ĝ)``, so only the part of the refusal direction orthogonal to the harmless
    activations is removed."""
    store = store if store is not None else ActivationStore()
    names = [hk.resid_post(l) for l in range(model.n_layers)]
    diffs = mean_differences(model, harmful, harmless, names, "last", store=store, batch_size=batch_size)
    rows = torch.stack([_unit_or_zero(diffs[n][0]) for n in names])
    if not orthogonalize:
        return rows
    # the same store read mean_differences made (cached): the harmless mean of each layer
    good = store.get(model, list(getattr(harmless, "prompts", harmless)), names, "last", batch_size=batch_size)
    goods = torch.stack([_unit_or_zero(good[n][:, 0].float().mean(0)) for n in names])
    return torch.stack([_unit_or_zero(project_out(r, g)) if r.any() else r for r, g in zip(rows, goods)])


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer ``index``: directions[⌊i⌋] interpolated linearly
    towards directions[⌊i⌋+1] by the fraction, then normalised (Heretic's global direction); zeros
    when both are zero rows."""
    n = len(directions)
    if not 0 <= index <= n - 1:
        raise ValueError(f"direction_index={index} must lie in [0, {n - 1}] (one direction per layer)")
    low = int(math.floor(index))
    high, frac = min(low + 1, n - 1), index - low
    return _unit_or_zero(torch.lerp(directions[low].float(), directions[high].float(), frac))


# ---- families --------------------------------------------------------------------------------------

def heretic_edits(model: HookedModel, directions: torch.Tensor, params: AbliterationParams, *,
                  norm_preserving: bool = False) -> list[Edit]:
    """Heretic's family: per layer and writer, the kernel's weight (layers it skips, or whose direction
    is a zero row, are not edited). ``norm_preserving``: Heretic's default ``row_normalization="full"``
    (``norm_preserved``); with ``residual_directions(..., orthogonalize=True)`` this is Heretic 1.4.0's
    default family."""
    weights = layer_weights(params, model.n_layers)
    shared = None if params.direction_index is None else direction_at(directions, params.direction_index)
    edits = []
    for l in range(model.n_layers):
        r = directions[l] if shared is None else shared
        if not r.any():
            continue
        for writer, kind in (("attn", "attn_out"), ("mlp", "mlp_out")):
            if weights[writer][l] != 0:  # a zero weight is no edit at all (the model stays bit-identical)
                edits.append(Edit(l, kind, None, weights[writer][l], r, norm_preserving))
    return edits


def global_edits(model: HookedModel, direction: torch.Tensor, weight: float = 1.0) -> list[Edit]:
    """One direction and weight on every layer's attention and MLP output (embedding untouched)."""
    if weight == 0:
        return []
    return [Edit(l, kind, None, weight, direction) for l in range(model.n_layers) for kind in ("attn_out", "mlp_out")]


def targeted_edits(components: pd.DataFrame, direction: torch.Tensor, top_n: int, weight: float = 1.0,
                   kinds: Sequence[str] = ("head", "mlp_out")) -> list[Edit]:
    """The direction removed from the ``top_n`` writers of ``kinds`` with the largest ``attribution_diff``
    (a ``direction_eval.direction_components`` table: harmful − harmless write onto the direction).

    Walking the ranking, a unit that overlaps one already chosen (a neuron of a chosen MLP output, or
    an MLP output with a chosen neuron) is passed over, so every column is edited once."""
    unknown = set(kinds) - {"head", "mlp_out", "neuron"}
    if unknown:
        raise ValueError(f"kinds {sorted(unknown)} cannot be targeted; choose from head, mlp_out, neuron")
    if top_n < 0:
        raise ValueError(f"top_n={top_n} must be >= 0")
    rows = components[components.component.isin(list(kinds))].sort_values("attribution_diff", ascending=False)
    if weight == 0:
        return []
    edits: list[Edit] = []
    for r in rows.itertuples():
        if len(edits) == top_n:
            break
        index = None if r.component == "mlp_out" else int(r.head if r.component == "head" else r.neuron)
        writer = (int(r.layer), EDIT_KINDS[r.component])
        # a neuron inside an MLP output already chosen (or the reverse) would edit its column twice
        if any((e.layer, e.writer) == writer and (e.index is None or index is None) for e in edits):
            continue
        edits.append(Edit(int(r.layer), r.component, index, weight, direction))
    return edits


def top_writers(model: HookedModel, direction: torch.Tensor, harmful: Sequence[str], harmless: Sequence[str], *,
                store: ActivationStore | None = None, kinds: Sequence[str] = ("head", "mlp_out"), top_n: int = 8,
                batch_size: int = 16) -> pd.DataFrame:
    """``direction_components`` rows of ``kinds`` (neurons: the ``top_n`` per layer), best writer first."""
    table = direction_components(model, direction, list(harmful), list(harmless), store,
                                 top_neurons=top_n if "neuron" in kinds else 0, batch_size=batch_size)
    table = table[table.component.isin(list(kinds))]
    return table.sort_values("attribution_diff", ascending=False).reset_index(drop=True)
