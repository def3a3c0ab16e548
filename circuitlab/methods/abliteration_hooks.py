"""Abliteration's edits as forward hooks: ``edit_hooks`` gives the map of
``abliteration_edits.abliterated(model, edits)`` as hooks on the unedited model (tested equal to the
weight edits, tests/test_abliteration_search.py), for runs that must leave the weights alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.model import HookedModel
from circuitlab.core.weights import writer_weight
from circuitlab.methods.abliteration_edits import Edit, check_edits, edited_columns, project_out_subspace, writer_params

__all__ = ["edit_hooks"]


def edit_hooks(model: HookedModel, edits: Sequence[Edit]) -> list:
    """Forward hooks equal to ``abliterated(model, edits)`` on the unedited model (read its weights now).

    A whole-output edit projects ``attn_out`` / ``mlp_out``; unit edits read the writer's input
    (``attn_z`` heads or ``mlp_post`` neurons) and subtract ``w Q Qᵀ W[:, cols] a[cols]`` from its output
    (Q: the edit's basis, ``r̂`` for one direction).
    """
    edits = [e for e in edits if e.weight != 0]
    check_edits(model, edits)
    groups: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        groups.setdefault((e.layer, e.writer), []).append(e)
    hooks = []
    for (layer, writer), group in groups.items():
        out_name = hk.attn_out(layer) if writer == "attn" else hk.mlp_out(layer)
        if group[0].index is None and not group[0].norm_preserving:
            e = group[0]
            hooks.append((out_name, lambda act, hook, q=e.basis, w=e.weight: project_out_subspace(act, q, w)))
        else:
            hooks += _unit_hooks(model, layer, writer, group, out_name)
    return hooks


def _unit_hooks(model: HookedModel, layer: int, writer: str, group: list[Edit], out_name: str) -> list:
    """A hook keeping the writer's input and one subtracting the edited units' write onto each basis."""
    weight = writer_weight(model, group[0].kind, layer)
    terms, deltas = [], []
    for e in group:
        cols = e.columns(model)
        if e.norm_preserving:  # not a rank-1 map: add (W' − W)[:, cols] a[cols]
            block = weight.detach()[:, cols].float()
            deltas.append((cols, (edited_columns(block, e) - block).T.contiguous()))
            continue
        read = e.basis.to(weight.device) @ weight.detach()[:, cols].float()  # Qᵀ W[:, cols], [k, cols]
        terms.append((cols, read, e.basis, e.weight))
    bias = [e for e in group if e.norm_preserving and e.index is None]  # a whole writer's bias: plain projection
    kept = {}

    def keep(act, hook):
        kept["a"] = act
        return act

    def write(act, hook):
        a = kept.pop("a")
        a = a.flatten(start_dim=2) if a.dim() == 4 else a  # heads: [b, pos, heads, d_head] -> o_proj input
        out = act
        for cols, read, q, w in terms:
            coef = a[..., cols].float() @ read.T.to(a.device)  # [..., k]
            out = out - (w * coef @ q.to(act.device)).to(act.dtype)
        for cols, delta in deltas:
            out = out + (a[..., cols].float() @ delta.to(a.device)).to(act.dtype)
        for e in bias:
            b = _bias(model, layer, writer)
            if b is not None:
                q = e.basis.to(b.device)
                out = out - (e.weight * (b.float() @ q.T) @ q).to(act.device, act.dtype)
        return out

    in_name = hk.attn_z(layer) if writer == "attn" else hk.mlp_post(layer)
    return [(in_name, keep), (out_name, write)]


def _bias(model: HookedModel, layer: int, writer: str) -> torch.Tensor | None:
    """The bias of one writer (o_proj / down_proj), or None when it has none."""
    found = [p for _, p in writer_params(model).get((layer, writer), []) if p.dim() == 1]
    return found[0].detach() if found else None

