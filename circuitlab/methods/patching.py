"""The one patching sweep engine: component grid × patch setter × metric -> tidy rows.

A *sweep* names cells ``(layer, position, index)`` (position None = every position; index a head,
a neuron or whatever the variant needs), the hook each cell patches, and a *setter* that writes
the patch into a batch of activations. The engine runs the *target* prompt with each cell's patch
taken from the *source* prompt (TransformerLens ``generic_activation_patch`` semantics: patch the
source activation into the target run, read the metric on the last position).

Exact speed-ups (``fast=True``; ``fast=False`` is the plain computation they are tested against):

- **batching**: up to ``batch_size`` patched runs of the same hook share one forward pass;
- **no-op skip**: a cell whose setter leaves the target activation bit-identical (e.g. the shared
  chat-template prefix, where harmful and harmless runs agree exactly) is not run: its value is the
  unpatched target metric, provably;
- **prefix reuse**: a patch at block ``L`` starts from the cached target residual entering ``L``;
- **causal reuse**: a patch whose first changed position is ``p`` recomputes positions ``>= p``
  only, reusing the target run's cached keys/values of earlier positions (causal attention);
- **read-position unembedding**: only the last position goes through the final norm's read-out
  and the unembedding.

The engine calls the bridge's own blocks (``weights.hooked_layers``: TransformerLens
``BlockBridge`` modules), so every TransformerLens hook fires as in a normal forward.
``bridge(resid, start_at_layer=L)`` was measured not to help: it still runs blocks ``0..L-1`` and
discards their output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.weights import hooked_layers, rotary_embeddings
from circuitlab.core.progress import progress_bar

__all__ = ["Sweep", "PairContext", "run_sweeps", "vector_setter", "capture"]

Cell = tuple  # (layer, position | None, index | None)
Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [B, vocab] -> [B]


@dataclass
class PairContext:
    """Full-sequence activations of the target and source runs of one pair (batch dim removed)."""

    target_ids: torch.Tensor
    source_ids: torch.Tensor
    target: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor]
    kv: list  # per layer (keys, values) of the target run, [1, kv_heads, T, d_head]
    target_metric: float
    source_metric: float
    extra: dict = field(default_factory=dict)  # variant-specific precomputed tensors


def vector_setter(act: torch.Tensor, name: str, cells: Sequence[Cell], ctx: PairContext, offset: int) -> torch.Tensor:
    """Row ``i`` gets the source activation of ``cells[i]`` (at its position, or every position
    ``>= offset`` when position is None; at ``[..., index]`` on axis 2 when index is not None —
    a head of ``attn_z`` ``[b, pos, head, d_head]`` or a neuron of ``mlp_post`` ``[b, pos, d_mlp]``)."""
    src = ctx.source[name]
    for row, (_, pos, index) in enumerate(cells):
        where = slice(None) if pos is None else pos - offset
        what = slice(offset, None) if pos is None else pos
        if index is None:
            act[row, where] = src[what]
        else:
            act[row, where, index] = src[what, index]
    return act


@dataclass
class Sweep:
    """One component type to sweep: its cells, the hook of each cell, and the patch setter.

    ``setter(act, name, cells, ctx, offset)`` edits ``act`` (``[len(cells), T - offset, ...]``: the
    positions from ``offset`` on, along ``pos_dim``) in place and returns it; row ``i`` is ``cells[i]``.
    ``columns(cell)`` gives the table columns that identify a cell.
    """

    component: str
    cells: list[Cell]
    hook: Callable[[Cell], str]
    setter: Callable = vector_setter
    index_name: str | None = None
    pos_dim: int = 1
    columns: Callable[[Cell], dict] | None = None

    def describe(self, cell: Cell) -> dict:
        if self.columns is not None:
            return self.columns(cell)
        out = {"layer": int(cell[0]), "position": cell[1]}
        if self.index_name:
            out[self.index_name] = cell[2]
        return out


class _PrefixKV:
    """Minimal KV cache: keys/values of positions ``< offset`` (target run) before the new ones."""

    def __init__(self, kv, offset: int):
        self.kv, self.offset = kv, offset

    def update(self, k, v, layer_idx, *args, **kwargs):
        pk, pv = (t[:, :, : self.offset] for t in self.kv[layer_idx])
        b = k.shape[0]
        return (torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.offset


def capture(model, ids: torch.Tensor, names: Sequence[str], *, with_kv: bool = False):
    """One forward of ``ids`` ``[T]``: ``({name: act[T, ...]}, last logits [vocab], kv | None)``."""
    acts = {}

    def saver(name):
        def save(act, hook):
            acts[name] = act[0].detach().clone()
        return save

    with torch.no_grad(), model.hooks([(n, saver(n)) for n in dict.fromkeys(names)]):
        if with_kv:
            logits, cache = model.bridge(ids[None], return_type="logits_and_cache")
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            logits, kv = model.forward(ids[None]), None
    return acts, logits[0, -1], kv


def _start_layer(model, name: str) -> int | None:
    """The block a patch at ``name`` starts recomputation from (None: embedding; run everything)."""
    if name == hk.final_resid():
        return model.n_layers
    return hk.layer_of(name)


def _first_changed_position(sweep: Sweep, name: str, cell: Cell, ctx: PairContext) -> int | None:
    """Apply the setter to the target activation itself: the first position it changes, or None (no-op)."""
    tgt = ctx.target[name]
    patched = sweep.setter(tgt[None].clone(), name, [cell], ctx, 0)[0]
    changed = (patched != tgt).movedim(sweep.pos_dim - 1, 0).reshape(tgt.shape[sweep.pos_dim - 1], -1).any(1)
    hits = changed.nonzero()
    return int(hits[0]) if len(hits) else None


def _hook_fn(sweep: Sweep, name: str, cells: Sequence[Cell], ctx: PairContext, offset: int):
    def fn(act, hook):
        return sweep.setter(act.clone(), name, cells, ctx, offset)
    return fn


def _run_fast(model, name, cells, sweep, ctx, offset, metric):
    """Recompute positions ``>= offset`` from block ``L`` onwards, for ``len(cells)`` patched runs."""
    start = _start_layer(model, name)
    b, T = len(cells), ctx.target_ids.shape[0]
    h = ctx.target[hk.resid_pre(start) if start < model.n_layers else hk.final_resid()][offset:]
    h = h[None].repeat(b, 1, 1)
    pos = torch.arange(offset, T, device=h.device)[None]
    layers = hooked_layers(model)
    pe = rotary_embeddings(model, h, pos) if start < model.n_layers else None
    cache = _PrefixKV(ctx.kv, offset)
    with model.hooks([(name, _hook_fn(sweep, name, cells, ctx, offset))]):
        for layer in range(start, model.n_layers):
            out = layers[layer](h, attention_mask=None, position_embeddings=pe, position_ids=pos,
                                past_key_values=cache)
            h = out[0] if isinstance(out, tuple) else out
        normed = model.bridge.ln_final(h)  # fires ln_final hooks on every recomputed position
    return metric(model.bridge.unembed(normed[:, -1]).float())


def _run_plain(model, name, cells, sweep, ctx, metric):
    """The plain computation: full forward of the whole target prompt, full unembedding."""
    ids = ctx.target_ids[None].repeat(len(cells), 1)
    with model.hooks([(name, _hook_fn(sweep, name, cells, ctx, 0))]):
        logits = model.forward(ids)
    return metric(logits[:, -1].float())


def run_sweeps(model, target_ids: torch.Tensor, source_ids: torch.Tensor, sweeps: Sequence[Sweep],
               metric: Metric, *, fast: bool = True, batch_size: int = 32, progress: bool = False,
               prepare: Callable[[PairContext], None] | None = None,
               capture_names: Sequence[str] = ()) -> tuple[list[dict], PairContext]:
    """Patch every cell of every sweep from ``source_ids`` into ``target_ids`` (both ``[T]``).

    Returns rows ``{component, <cell columns>, metric, skipped}`` and the pair context (with the
    unpatched ``target_metric`` / ``source_metric``). ``prepare(ctx)`` may add ``ctx.extra`` tensors
    computed from the activations at the sweep hooks and ``capture_names`` (both runs).
    """
    if target_ids.shape != source_ids.shape or target_ids.dim() != 1:
        raise ValueError(f"target and source must be 1-D token tensors of equal length, got "
                         f"{tuple(target_ids.shape)} and {tuple(source_ids.shape)}; see patching.pairs")
    names = {s.hook(c) for s in sweeps for c in s.cells} | set(capture_names)
    model.check_hooks(sorted(names))
    base = [hk.resid_pre(l) for l in range(model.n_layers)] + [hk.final_resid()]
    t_acts, t_logits, kv = capture(model, target_ids, sorted(names) + base, with_kv=True)
    s_acts, s_logits, _ = capture(model, source_ids, sorted(names))
    with torch.no_grad():
        t_metric, s_metric = (float(metric(x[None].float())[0]) for x in (t_logits, s_logits))
    ctx = PairContext(target_ids, source_ids, t_acts, s_acts, kv, t_metric, s_metric)
    if prepare is not None:
        prepare(ctx)

    rows, jobs = [], []  # jobs: (sweep, name, cell, row index, first changed position)
    for sweep in sweeps:
        for cell in sweep.cells:
            name = sweep.hook(cell)
            row = {"component": sweep.component, **sweep.describe(cell), "metric": t_metric, "skipped": True}
            rows.append(row)
            first = _first_changed_position(sweep, name, cell, ctx) if fast else 0
            if first is not None:
                row["skipped"] = False
                jobs.append((sweep, name, cell, len(rows) - 1, first))
    # Group by hook (one patch site per forward) and, for causal reuse, by first changed position.
    jobs.sort(key=lambda j: (id(j[0]), j[1], j[4]))
    batches, i = [], 0
    while i < len(jobs):
        j = i
        while j < len(jobs) and j - i < batch_size and jobs[j][:2] == jobs[i][:2]:
            j += 1
        batches.append(jobs[i:j])
        i = j
    with torch.no_grad():
        for batch in progress_bar(batches, progress, total=len(batches), desc="patching"):
            sweep, name = batch[0][0], batch[0][1]
            cells = [job[2] for job in batch]
            if fast and _start_layer(model, name) is not None:
                values = _run_fast(model, name, cells, sweep, ctx, min(job[4] for job in batch), metric)
            else:
                values = _run_plain(model, name, cells, sweep, ctx, metric)
            for job, v in zip(batch, values.tolist()):
                rows[job[3]]["metric"] = v
    return rows, ctx
