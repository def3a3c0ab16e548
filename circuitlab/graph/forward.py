"""Forward-pass plumbing shared by edge scoring and circuit evaluation.

Every reader gets its own copy of the residual stream: the bridge's split-QKV fork
(``set_use_split_qkv_input``) gives each query head, and each *key/value head* (GQA), its own
pre-``ln1`` copy (``blocks.{l}.attn.hook_{q,k,v}_input``, ``[batch, pos, heads or kv heads,
d_model]``); the MLP reads its own copy at ``blocks.{l}.ln2.hook_in`` and the logits at
``ln_final.hook_in``. Editing one copy edits one reader only, and a gradient taken at one copy is
the gradient of that reader alone.

Batches: pairs of different lengths are left-padded to a common length with an attention mask; a
pair's two prompts share one length, so their padding is identical and writer differences are 0 at
pad positions. Only the last position is unembedded (the metric reads it).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.split_qkv import split_qkv_input
from circuitlab.graph.graph import EdgeGraph

__all__ = ["split_inputs", "check_pairs", "pair_batches", "reader_hook_names", "capture_writers",
           "writer_deltas", "head_outputs", "last_logits", "check_metric", "layer_reader_hooks",
           "stack_readers", "unstack_readers", "Batch"]

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [B, vocab] -> [B]


def reader_hook_names(layer: int) -> dict[str, str]:
    """Reader hooks of one layer (the split-QKV ones exist only while the fork is on)."""
    return {"q": hk.attn_q_input(layer), "k": hk.attn_k_input(layer), "v": hk.attn_v_input(layer),
            "mlp": hk.mlp_in(layer)}


def split_inputs(model):
    """Turn on the per-head (per-kv-head) Q/K/V input fork for the block (``core.split_qkv``)."""
    return split_qkv_input(model)


def check_pairs(pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(clean_ids, corrupt_ids)]`` of 1-D, equal-length token tensors; ValueError naming the fix."""
    out = []
    for i, item in enumerate(pairs):
        if hasattr(item, "harmful_ids"):  # a patching.pairs.Pair: clean = harmful, corrupted = harmless
            item = (item.harmful_ids, item.harmless_ids)
        clean, corrupt = (torch.as_tensor(t) for t in item)
        if clean.dim() != 1 or corrupt.dim() != 1:
            raise ValueError(f"pair {i}: expected 1-D token tensors, got {tuple(clean.shape)} and {tuple(corrupt.shape)}")
        if clean.shape != corrupt.shape:
            raise ValueError(f"pair {i}: clean and corrupted prompts have {len(clean)} and {len(corrupt)} tokens; "
                             "edge attribution compares them position by position, so build equal-length pairs "
                             "with circuitlab.methods.pairs.make_pairs (pairing='length' or 'pad')")
        out.append((clean, corrupt))
    if not out:
        raise ValueError("no pairs given; build equal-length pairs with patching.pairs.make_pairs")
    return out


class Batch:
    """Left-padded clean and corrupted ids ``[B, T]`` of several pairs, their mask and pair indices."""

    def __init__(self, index: list[int], clean: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor):
        self.index, self.clean, self.corrupt, self.mask = index, clean, corrupt, mask

    def ids(self, which: str) -> torch.Tensor:
        return self.clean if which == "clean" else self.corrupt


def pair_batches(model, pairs, batch_size: int) -> Iterator[Batch]:
    """Batches of up to ``batch_size`` pairs, sorted by length so padding stays small."""
    pairs = check_pairs(pairs)
    pad = model.tokenizer.pad_token_id
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(pairs[i][0]) for i in idx)
        clean = torch.full((len(idx), T), pad, dtype=torch.long)
        corrupt, mask = clean.clone(), torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(pairs[i][0])
            clean[row, T - n:], corrupt[row, T - n:], mask[row, T - n:] = pairs[i][0], pairs[i][1], 1
        dev = model.device
        yield Batch(idx, clean.to(dev), corrupt.to(dev), mask.to(dev))


def last_logits(model, ids: torch.Tensor, mask: torch.Tensor, fwd_hooks=(),
                on_final: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Last-position logits ``[B, vocab]`` of one forward with ``fwd_hooks``; only position -1 is
    unembedded. ``on_final(resid)`` may replace the final residual (the logits reader's hook)."""
    with model.hooks(list(fwd_hooks)):
        resid = model.final_residual(ids, mask, on_final=on_final)
    # outside the hooks context, so ln_final.hook_in does not fire a second time
    return model.final_logits(resid[:, -1]).float()


def check_metric(values: torch.Tensor, n: int, *, need_grad: bool) -> torch.Tensor:
    """The metric must map ``[n, vocab]`` logits to ``[n]`` values that depend on those logits."""
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"the metric must map last-position logits [batch, vocab] to one value per prompt "
                         f"[batch]; got {shape} for batch {n}")
    if need_grad and values.grad_fn is None:
        raise ValueError("the metric does not depend on the logits it is given (its output has no gradient "
                         "path to them); compute it from the logits, e.g. "
                         "circuitlab.methods.metrics.refusal_score_from_logits(logits, refusal_tokens(model))")
    return values


def capture_writers(model, ids: torch.Tensor, mask: torch.Tensor, metric: Metric | None = None):
    """One no-grad forward: ``({'embed': [B,T,d], 'z': [per layer [B,T,H,dh]], 'mlp': [...]}, metric)``."""
    acts = {"z": [None] * model.n_layers, "mlp": [None] * model.n_layers}

    def save(kind, layer=None):
        def fn(act, hook):
            if kind == "embed":
                acts["embed"] = act.detach()
            else:
                acts[kind][layer] = act.detach()
        return fn

    hooks = [(hk.embed(), save("embed"))]
    for l in range(model.n_layers):
        hooks += [(hk.attn_z(l), save("z", l)), (hk.mlp_out(l), save("mlp", l))]
    with torch.no_grad():
        logits = last_logits(model, ids, mask, hooks)
        value = None if metric is None else check_metric(metric(logits), len(ids), need_grad=False).detach()
    return acts, value


def head_outputs(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Per-head residual writes ``z_h W_O^h``: ``[B, T, H, dh] -> [B, T, H, d_model]``."""
    w_o = model.bridge.blocks[layer].attn.W_O  # [H, dh, d_model]
    return torch.einsum("bthe,hed->bthd", z, w_o.to(z.dtype))


def writer_deltas(model, graph: EdgeGraph, target: dict, base: dict) -> torch.Tensor:
    """``a_target - a_base`` of every writer, ``[n_writers, B, T, d_model]`` (forward order)."""
    emb = base["embed"]
    out = torch.empty((graph.n_writers, *emb.shape), dtype=emb.dtype, device=emb.device)
    out[0] = target["embed"] - emb
    H = graph.n_heads
    for l in range(graph.n_layers):
        w = graph.head_writer(l, 0)
        out[w:w + H] = head_outputs(model, l, target["z"][l] - base["z"][l]).permute(2, 0, 1, 3)
        out[w + H] = target["mlp"][l] - base["mlp"][l]
    return out


def layer_reader_hooks(graph: EdgeGraph, make: Callable[[str, list[int], int], Callable]) -> list[tuple[str, Callable]]:
    """``(hook name, make(kind, reader columns, layer))`` for every reader hook except the logits."""
    hooks = []
    for l in range(graph.n_layers):
        for kind, name in reader_hook_names(l).items():
            hooks.append((name, make(kind, graph.reader_columns(kind, l), l)))
    return hooks


def stack_readers(kind: str, act: torch.Tensor) -> torch.Tensor:
    """A reader hook's activation as ``[n_readers_here, B, T, d]`` (per-head axis first)."""
    return act.permute(2, 0, 1, 3) if kind in ("q", "k", "v") else act[None]


def unstack_readers(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``stack_readers``."""
    return x.permute(1, 2, 0, 3) if kind in ("q", "k", "v") else x[0]

