"""The model's weights by Hugging Face name: wrapped modules, component slices, residual writers.

TransformerLens's bridge wraps every Hugging Face module (``._original_component``); this module is the
one place that unwraps them. Parameters are addressed by their plain HF names
(``model.layers.3.mlp.down_proj.weight``), which is how slices, masks and digests name them.

Component slices, by canonical parameter name:

- neuron ``(l, i)``: row ``i`` of ``mlp.gate_proj`` and ``mlp.up_proj``, column ``i`` of ``mlp.down_proj``.
- head ``(l, h)``: rows ``h·d_head:(h+1)·d_head`` of ``q_proj`` (+ bias), the same rows of its key/value
  group in ``k_proj``/``v_proj`` (+ biases; shared by the heads of a grouped-query group) and those
  columns of ``o_proj``.
- whole-layer kinds: every parameter of block ``l`` (``attn_out``: attention + its norm; ``mlp_out``:
  MLP + its norm; ``resid_*``: the whole block).

Shared by the integrity monitor (fingerprints), targeted fine-tuning (gradient masks), weight
orthogonalization and direct attribution (what a unit writes into the residual stream).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterable, Iterator

import torch

from circuitlab.core.components import Component

__all__ = ["original", "decoder_layers", "hooked_layers", "rotary_embeddings", "canonical_name", "canonical_parameters", "kv_group_size", "component_slices",
           "slice_masks", "slice_digest", "Slice", "residual_writers", "writer_weight", "write_vector",
           "final_norm_weight", "unembedding_weight", "weights_restored"]

Slice = tuple[str, tuple]  # (canonical parameter name, index usable as tensor[index])


def original(module):
    """The wrapped Hugging Face module under a TransformerBridge component (the module itself if unwrapped)."""
    return getattr(module, "_original_component", module)


def decoder_layers(model) -> list:
    """The Hugging Face decoder layers (Llama/Qwen/Mistral style ``model.layers``), unwrapped."""
    layers = getattr(getattr(model.hf_model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"circuitlab's weight edits support decoders with model.layers (Llama/Qwen/Mistral "
                         f"style); {type(model.hf_model).__name__} has none")
    return [original(l) for l in layers]


def hooked_layers(model) -> list:
    """The decoder layers as the bridge wraps them (calling one fires its TransformerLens hooks)."""
    inner = getattr(model.hf_model, "model", None)
    if getattr(inner, "layers", None) is None:
        raise ValueError(f"the fast patching engine supports decoders with model.layers (Llama/Qwen/Mistral "
                         f"style); {type(model.hf_model).__name__} has none: pass fast=False")
    return list(inner.layers)


def rotary_embeddings(model, hidden, position_ids):
    """The ``(cos, sin)`` position embeddings the decoder layers take for ``position_ids``."""
    return model.hf_model.model.rotary_emb(hidden, position_ids)


def canonical_name(name: str) -> str:
    """A parameter or state-dict name without the bridge wrappers' ``._original_component``."""
    return name.replace("._original_component", "")


def canonical_parameters(model) -> dict[str, torch.nn.Parameter]:
    """``hf_model`` parameters by their plain HF names."""
    return {canonical_name(name): p for name, p in model.hf_model.named_parameters()}


def kv_group_size(model) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    n_kv = getattr(model.hf_model.config, "num_key_value_heads", model.n_heads) or model.n_heads
    return model.n_heads // n_kv


def _check_unit(model, c: Component) -> None:
    if not isinstance(c, Component):
        raise TypeError(f"components must be circuitlab.core.components.Component, got {type(c).__name__}")
    if not 0 <= c.layer < model.n_layers:
        raise ValueError(f"component {c} is outside layers 0..{model.n_layers - 1}")
    limit = {"neuron": model.d_mlp, "head": model.n_heads}.get(c.kind)
    if limit is not None and not 0 <= c.index < limit:
        raise ValueError(f"{c.kind} index {c.index} is outside 0..{limit - 1}")


def component_slices(model, components: Iterable[Component]) -> list[Slice]:
    """Every ``(parameter name, index)`` slice the components own (order kept, duplicates dropped)."""
    params = canonical_parameters(model)
    group = kv_group_size(model)
    out: list[Slice] = []
    for c in components:
        _check_unit(model, c)
        pre = f"model.layers.{c.layer}."
        if c.kind == "neuron":
            i = c.index
            new = [(pre + "mlp.gate_proj.weight", (slice(i, i + 1),)), (pre + "mlp.up_proj.weight", (slice(i, i + 1),)),
                   (pre + "mlp.down_proj.weight", (slice(None), slice(i, i + 1)))]
        elif c.kind == "head":
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


def slice_masks(model, slices: Iterable[Slice]) -> dict[str, torch.Tensor]:
    """Boolean masks ``{parameter name: mask}`` that are True exactly on the given slices."""
    params = canonical_parameters(model)
    masks: dict[str, torch.Tensor] = {}
    for name, index in slices:
        if name not in masks:
            masks[name] = torch.zeros_like(params[name], dtype=torch.bool)
        masks[name][index] = True
    return masks


def slice_digest(model, slices: Iterable[Slice]) -> str:
    """sha256 over the exact bytes of the slices (any bit change shows)."""
    params = canonical_parameters(model)
    digest = hashlib.sha256()
    for name, index in slices:
        t = params[name].detach()[index].contiguous().cpu()
        digest.update(f"{name}{index}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def residual_writers(model) -> list[tuple[str, torch.nn.Parameter, int]]:
    """``(name, parameter, d_model axis)`` of everything that writes the residual stream: the token
    embedding ``[vocab, d_model]`` (axis 1), every ``o_proj`` and ``down_proj`` weight ``[d_model, d_in]``
    (axis 0) and their biases ``[d_model]`` (axis 0) if any."""
    out = [("model.embed_tokens.weight", original(model.hf_model.get_input_embeddings()).weight, 1)]
    for l, layer in enumerate(decoder_layers(model)):
        for part, proj in (("self_attn.o_proj", original(original(layer.self_attn).o_proj)),
                           ("mlp.down_proj", original(original(layer.mlp).down_proj))):
            out.append((f"model.layers.{l}.{part}.weight", proj.weight, 0))
            if getattr(proj, "bias", None) is not None:
                out.append((f"model.layers.{l}.{part}.bias", proj.bias, 0))
    return out


def writer_weight(model, kind: str, layer: int) -> torch.nn.Parameter:
    """The matrix through which ``kind`` writes the residual stream at ``layer``, ``[d_model, d_in]``:
    ``o_proj`` for ``head`` / ``attn_out``, ``down_proj`` for ``neuron`` / ``mlp_out``."""
    block = decoder_layers(model)[layer]
    if kind in ("head", "attn_out"):
        return original(original(block.self_attn).o_proj).weight
    if kind in ("neuron", "mlp_out"):
        return original(original(block.mlp).down_proj).weight
    raise ValueError(f"kind={kind!r} writes through no single matrix; use head, attn_out, neuron or mlp_out")


def write_vector(model, c: Component) -> torch.Tensor:
    """What one unit of ``c`` writes into the residual stream (float32, CPU): ``[d_model]`` for a neuron
    (its W_down column), ``[d_head, d_model]`` for a head (its W_O slice)."""
    _check_unit(model, c)
    w = writer_weight(model, c.kind, c.layer).detach().float().cpu()
    if c.kind == "neuron":
        return w[:, c.index]
    if c.kind == "head":
        return w[:, c.index * model.d_head:(c.index + 1) * model.d_head].T
    raise ValueError(f"write_vector takes a neuron or a head, got {c}")


def final_norm_weight(model) -> torch.nn.Parameter:
    """The final norm's scale ``[d_model]``."""
    return original(model.hf_model.model.norm).weight


def unembedding_weight(model) -> torch.nn.Parameter:
    """The unembedding ``[vocab, d_model]`` (the embedding itself when they are tied)."""
    head = model.hf_model.get_output_embeddings()
    return original(head if head is not None else model.hf_model.get_input_embeddings()).weight


@contextlib.contextmanager
def weights_restored(model, names: Iterable[str] | None = None) -> Iterator[None]:
    """Put every parameter back on exit: the module→parameter bindings (so an untied unembedding is
    tied again), the tying flag, and the values of ``names`` (canonical names; None: all parameters).

    Values are restored in place on the original tensors, which bumps their version counter, so
    ``model.fingerprint`` sees the restore.
    """
    hf = model.hf_model
    tied = getattr(hf.config, "tie_word_embeddings", None)
    keep = None if names is None else {id(canonical_parameters(model)[n]) for n in names}
    clones: dict[int, torch.Tensor] = {}
    records = []
    for module in hf.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if keep is None or id(p) in keep:
                    clones.setdefault(id(p), p.detach().clone())
                records.append((module, name, p))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in records:
                module._parameters[name] = p
                if id(p) in clones:
                    p.copy_(clones[id(p)])
        if tied is not None:
            hf.config.tie_word_embeddings = tied
