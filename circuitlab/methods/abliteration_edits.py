"""Abliteration's edits and the one weight orthogonalization that applies them.

An ``Edit`` removes a fraction ``weight`` of a unit direction r̂ from what one writer puts into the
residual stream: ``W ← W − w · r̂ r̂ᵀ W`` on a layer's whole attention output (``o_proj``, kind
``attn_out``) or MLP output (``down_proj``, ``mlp_out``) with its bias, or on one head's ``o_proj``
columns (``head``) or one neuron's ``down_proj`` column (``neuron``). Its ``direction`` may instead be
a ``[k, d_model]`` basis (orthonormalised): then the whole subspace goes, ``W ← W − w · Q Qᵀ W``, by
the same projection applied once per basis vector (``project_out_subspace``; the cone family, ``cone``).
``abliterated`` applies a list of edits to the weights and restores them on exit; ``norm_preserved``
is Heretic's norm-preserving variant of one edit; ``export_abliterated`` writes the edited model as an
HF folder. The same map as forward hooks is ``abliteration_hooks.edit_hooks``; the families that
choose the edits are in ``abliteration`` (which re-exports this module's public names).

Weight edits reuse ``directions.project_out`` (the one projection) on the o_proj / down_proj matrices
(``weights.residual_writers``) inside ``weights.weights_restored``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from circuitlab.core.model import HookedModel
from circuitlab.core.weights import residual_writers, weights_restored
from circuitlab.methods.directions import project_out, unit
from circuitlab.methods.interventions import export_hf

__all__ = ["Edit", "EDIT_KINDS", "WRITERS", "project_out_subspace", "describe_edits", "writer_params", "check_edits",
           "norm_preserved", "edited_columns", "abliterated", "export_abliterated"]

WRITERS = ("attn", "mlp")  # Heretic's components: attention o_proj, MLP down_proj
EDIT_KINDS = {"attn_out": "attn", "head": "attn", "mlp_out": "mlp", "neuron": "mlp"}  # edit kind -> its writer
_PARTS = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # writer -> HF module path in a decoder layer


# ---- edits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    """Remove ``weight`` × the unit ``direction`` from one writer: a layer's ``attn_out`` / ``mlp_out``
    (``index`` None, bias included) or one ``head`` / ``neuron`` (its o_proj / down_proj columns).
    ``direction`` ``[k, d_model]``: a subspace, its rows orthonormalised here (``basis``, rank k)."""

    layer: int
    kind: str
    index: int | None
    weight: float
    direction: torch.Tensor = field(repr=False, compare=False)
    norm_preserving: bool = False  # Heretic's row_normalization="full": each row keeps its norm (see norm_preserved)

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {self.kind!r} is not one of {', '.join(EDIT_KINDS)}")
        if (self.index is None) != (self.kind in ("attn_out", "mlp_out")):
            raise ValueError(f"a {self.kind} edit needs index={'None' if self.index is not None else 'an int'}")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"edit weight must be finite, got {self.weight}")
        object.__setattr__(self, "direction", _orthonormal(self.direction))

    @property
    def writer(self) -> str:
        return EDIT_KINDS[self.kind]

    @property
    def basis(self) -> torch.Tensor:
        """The removed subspace as orthonormal rows ``[k, d_model]`` (k = 1 for one direction)."""
        return self.direction.reshape(-1, self.direction.shape[-1])

    def columns(self, model: HookedModel) -> slice:
        """The columns of the writer matrix this edit acts on."""
        if self.kind == "head":
            return slice(self.index * model.d_head, (self.index + 1) * model.d_head)
        if self.kind == "neuron":
            return slice(self.index, self.index + 1)
        return slice(None)

    def label(self) -> str:
        """``L3H5``, ``L3N17``, ``L3attn`` or ``L3mlp``, with ``@weight``."""
        unit_part = {"head": f"H{self.index}", "neuron": f"N{self.index}", "attn_out": "attn", "mlp_out": "mlp"}
        rank = f"/k{len(self.basis)}" if len(self.basis) > 1 else ""
        return f"L{self.layer}{unit_part[self.kind]}@{self.weight:.3g}{rank}"


def _orthonormal(direction: torch.Tensor) -> torch.Tensor:
    """A unit vector (``unit``), or an orthonormal basis of the span of a ``[k, d]`` tensor's rows
    (Gram-Schmidt in row order; a row already in the span of those before it adds nothing)."""
    direction = torch.as_tensor(direction)
    if direction.dim() != 2:
        return unit(direction)
    rows = [unit(direction[0])]
    for v in direction[1:].detach().float():
        v = v - sum((v @ b) * b for b in rows)
        if v.norm() > 1e-6 * max(1.0, float(direction.float().norm())):  # a dependent row: nothing new to remove
            rows.append(unit(v))
    return torch.stack(rows)


def project_out_subspace(x: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """``x − s · Q Qᵀ x`` over the last dimension for orthonormal rows Q: ``project_out`` once per row,
    which is exact because the cross terms ``s² q_i (q_iᵀ q_j) q_jᵀ`` vanish for orthonormal rows."""
    for b in basis.reshape(-1, basis.shape[-1]):
        x = project_out(x, b, strength)
    return x


def describe_edits(edits: Iterable[Edit]) -> str:
    """A short text of the edits, e.g. ``L1H2@1.2 L0mlp@1.2`` (table column)."""
    return " ".join(e.label() for e in edits)


# ---- application ---------------------------------------------------------------------------------

def writer_params(model: HookedModel) -> dict[tuple[int, str], list[tuple[str, torch.nn.Parameter]]]:
    """``{(layer, writer): [(canonical name, parameter)]}``: each o_proj / down_proj weight (+ bias)."""
    out: dict[tuple[int, str], list] = {}
    for name, p, _ in residual_writers(model):
        for writer, part in _PARTS.items():
            if f".{part}." in name:
                out.setdefault((int(name.split(".")[2]), writer), []).append((name, p))
    return out


def check_edits(model: HookedModel, edits: list[Edit]) -> None:
    """Layers and units in range; per writer either one whole-output edit or edits on distinct units."""
    seen: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        if not 0 <= e.layer < model.n_layers:
            raise ValueError(f"edit {e.label()} is outside layers 0..{model.n_layers - 1}")
        limit = {"head": model.n_heads, "neuron": model.d_mlp}.get(e.kind)
        if limit is not None and not 0 <= e.index < limit:
            raise ValueError(f"edit {e.label()}: {e.kind} index outside 0..{limit - 1}")
        if e.basis.shape[1] != model.d_model:
            raise ValueError(f"edit {e.label()}: direction has {e.basis.shape[1]} entries, "
                             f"d_model is {model.d_model}")
        seen.setdefault((e.layer, e.writer), []).append(e)
    for (layer, writer), group in seen.items():
        keys = [(e.kind, e.index) for e in group]
        whole = any(e.index is None for e in group)
        if len(set(keys)) != len(keys) or (whole and len(group) > 1):
            raise ValueError(f"overlapping edits on layer {layer}'s {writer} writer ({describe_edits(group)}); "
                             "merge them into one edit per unit")


def norm_preserved(weight: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """Heretic's norm-preserving edit (``row_normalization="full"``) of a writer matrix ``[d_model, d_in]``.

    Each row ``W[i, :]`` (the weights into residual coordinate i) is divided by its norm, the direction
    is projected out of the normalised matrix's columns with ``strength`` (the one projection,
    ``W_n − w r̂ r̂ᵀ W_n``; a ``[k, d_model]`` basis: its whole subspace, ``project_out_subspace``), every row is
    normalised again and multiplied back by its original norm: the edit turns rows but leaves every
    row norm as it was. Heretic stores the difference to the original as a
    rank-``full_normalization_lora_rank`` (3) LoRA from a randomised SVD, so its exported model is an
    approximation of this exact map. A zero row stays zero. float32 in, float32 out."""
    w = weight.float()
    norms = w.norm(dim=1, keepdim=True)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    edited = project_out_subspace((w / safe).T, direction, strength).T
    new_norms = edited.norm(dim=1, keepdim=True)
    return torch.where(new_norms > 0, edited / torch.where(new_norms > 0, new_norms, torch.ones_like(new_norms)),
                       edited) * norms


def edited_columns(weight: torch.Tensor, e: Edit) -> torch.Tensor:
    """The edited columns ``weight`` (``[d_model, cols]``) of one edit, float32."""
    if e.norm_preserving:
        return norm_preserved(weight, e.direction, e.weight)
    # columns of W are residual vectors: project them (rows of Wᵀ) with the one projection
    return project_out_subspace(weight.T.float(), e.basis, e.weight).T


def _apply(model: HookedModel, edits: list[Edit], params) -> None:
    """``W[:, cols] ← W[:, cols] − w r̂ r̂ᵀ W[:, cols]`` per edit (``norm_preserved`` for a norm-preserving
    edit; the bias of a whole writer is always projected plainly), float32."""
    with torch.no_grad():
        for e in edits:
            if e.weight == 0:
                continue
            for _, p in params[(e.layer, e.writer)]:
                if p.dim() == 1:
                    if e.index is None:  # the bias is written by the whole output, never by one unit
                        p.copy_(project_out_subspace(p.float(), e.basis, e.weight).to(p.dtype))
                    continue
                cols = e.columns(model)
                p[:, cols] = edited_columns(p[:, cols], e).to(p.dtype)


@contextlib.contextmanager
def abliterated(model: HookedModel, edits: Sequence[Edit]):
    """Temporarily apply ``edits`` to the weights (orthogonalization per writer); restored on exit."""
    edits = list(edits)
    check_edits(model, edits)
    params = writer_params(model)
    names = sorted({name for e in edits if e.weight != 0 for name, _ in params[(e.layer, e.writer)]})
    with weights_restored(model, names):
        _apply(model, edits, params)
        yield model


def export_abliterated(model: HookedModel, edits: Sequence[Edit], path) -> Path:
    """Write the model with ``edits`` applied as an HF folder (``interventions.export_hf``); the live
    model is restored afterwards. Loads with ``transformers.AutoModelForCausalLM.from_pretrained``."""
    with abliterated(model, edits):
        return export_hf(model, path)
