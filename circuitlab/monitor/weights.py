"""The weight slices that belong to a component, by canonical Hugging Face parameter name.

- neuron ``(l, i)``: row ``i`` of ``mlp.gate_proj`` and ``mlp.up_proj``, column ``i`` of ``mlp.down_proj``.
- head ``(l, h)``: rows ``h·d_head:(h+1)·d_head`` of ``q_proj`` (+ bias), the same rows of its key/value
  group in ``k_proj``/``v_proj`` (+ biases; shared by the heads of a grouped-query group) and those
  columns of ``o_proj``.
- whole-layer kinds: every parameter of block ``l`` (``attn_out``: attention + its norm; ``mlp_out``:
  MLP + its norm; ``resid_*``: the whole block).

Shared by the integrity monitor (fingerprints) and targeted fine-tuning (gradient masks).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from ..components import Component
from ..model import HookedModel

__all__ = ["canonical_parameters", "component_slices", "slice_masks", "slice_digest", "Slice"]

Slice = tuple[str, tuple]  # (canonical parameter name, index usable as tensor[index])


def canonical_parameters(model: HookedModel) -> dict[str, torch.nn.Parameter]:
    """``hf_model`` parameters by their plain HF names (bridge wrappers' ``._original_component`` dropped)."""
    return {name.replace("._original_component", ""): p for name, p in model.hf_model.named_parameters()}


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def component_slices(model: HookedModel, components: Iterable[Component]) -> list[Slice]:
    """Every ``(parameter name, index)`` slice the components own (order kept, duplicates dropped)."""
    params = canonical_parameters(model)
    n_kv = getattr(model.hf_model.config, "num_key_value_heads", model.n_heads) or model.n_heads
    group = model.n_heads // n_kv
    out: list[Slice] = []
    for c in components:
        if not isinstance(c, Component):
            raise TypeError(f"components must be circuitlab.components.Component, got {type(c).__name__}")
        if not 0 <= c.layer < model.n_layers:
            raise ValueError(f"component {c} is outside layers 0..{model.n_layers - 1}")
        pre = _layer_prefix(c.layer)
        if c.kind == "neuron":
            if not 0 <= c.index < model.d_mlp:
                raise ValueError(f"neuron index {c.index} is outside 0..{model.d_mlp - 1}")
            i = c.index
            new = [(pre + "mlp.gate_proj.weight", (slice(i, i + 1),)), (pre + "mlp.up_proj.weight", (slice(i, i + 1),)),
                   (pre + "mlp.down_proj.weight", (slice(None), slice(i, i + 1)))]
        elif c.kind == "head":
            if not 0 <= c.index < model.n_heads:
                raise ValueError(f"head index {c.index} is outside 0..{model.n_heads - 1}")
            q = slice(c.index * model.d_head, (c.index + 1) * model.d_head)
            kv = slice((c.index // group) * model.d_head, (c.index // group + 1) * model.d_head)
            new = [(pre + "self_attn.o_proj.weight", (slice(None), q))]
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                new += [(pre + f"self_attn.{proj}.{kind}", (rows,)) for kind in ("weight", "bias")
                        if pre + f"self_attn.{proj}.{kind}" in params]
        else:
            parts = {"attn_out": ("self_attn.", "input_layernorm."), "mlp_out": ("mlp.", "post_attention_layernorm.")}
            keep = parts.get(c.kind, ("",))
            new = [(n, (slice(None),)) for n in params if n.startswith(pre) and n[len(pre):].startswith(keep)]
        missing = [n for n, _ in new if n not in params]
        if missing:
            raise ValueError(f"{model.name} has no parameter {missing[0]}; component slices support Qwen2/Llama-style "
                             "decoders (model.layers.N.mlp.gate_proj, self_attn.q_proj, ...)")
        out += [s for s in new if s not in out]
    return out


def slice_masks(model: HookedModel, slices: Iterable[Slice]) -> dict[str, torch.Tensor]:
    """Boolean masks ``{parameter name: mask}`` that are True exactly on the given slices."""
    params = canonical_parameters(model)
    masks: dict[str, torch.Tensor] = {}
    for name, index in slices:
        if name not in masks:
            masks[name] = torch.zeros_like(params[name], dtype=torch.bool)
        masks[name][index] = True
    return masks


def slice_digest(model: HookedModel, slices: Iterable[Slice]) -> str:
    """sha256 over the exact bytes of the slices (any bit change shows)."""
    params = canonical_parameters(model)
    digest = hashlib.sha256()
    for name, index in slices:
        t = params[name].detach()[index].contiguous().cpu()
        digest.update(f"{name}{index}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]
