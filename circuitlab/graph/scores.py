"""Edge scores: EAP and EAP-IG (inputs), batched over many clean/corrupted pairs.

EAP (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery"): the
effect of patching edge ``u -> v`` is estimated to first order, one forward + one backward for
every edge at once::

    score(u -> v) = sum over positions of (a_u^target - a_u^base) . dm/d(input of v) |_base

``a_u`` is writer ``u``'s residual write, the gradient is taken at reader ``v``'s own copy of the
residual stream (before its layer norm, which belongs to the reader), ``m`` is the metric.

- ``mode="denoise"``: base = corrupted run, target = clean (TransformerLens
  ``attribution_patch`` convention: ``(a_clean - a_corrupt) . g_corrupt``).
- ``mode="noise"``: base = clean run, target = corrupted (Syed et al.'s form:
  ``(a_corrupt - a_clean) . g_clean``).

EAP-IG over inputs (Hanna et al. 2024, "Have Faith in Faithfulness", §3): the gradient is averaged
over ``steps`` points on the straight line between the base and target input embeddings,
``e_base + (k / steps)(e_target - e_base)``, ``k = 0 .. steps-1`` (a left Riemann sum from the base,
as in their code; so ``steps=1`` is exactly EAP). Hanna et al.'s code always starts the path at
the corrupted input; here it starts at the base run, which is the same for ``denoise``.

One backward gives every reader's gradient: each reader has its own residual copy (see
``forward``), and a zero "probe" tensor added there is the leaf the gradient is read from.
Clean = harmful, corrupted = harmless (refusal experiments), metric = refusal score from the
last-position logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from circuitlab.core import hooks as hk
from circuitlab.core.progress import progress_bar
from circuitlab.graph.forward import (Metric, capture_writers, check_metric, layer_reader_hooks, last_logits,
    pair_batches, split_inputs, stack_readers, writer_deltas)
from circuitlab.graph.graph import EdgeGraph

__all__ = ["edge_scores", "EdgeScores", "scores_table", "METHODS", "MODES"]

METHODS = ("eap", "eap-ig")
MODES = ("denoise", "noise")


@dataclass
class EdgeScores:
    """Per-pair edge scores ``[n_pairs, n_writers, n_readers]`` (NaN off the graph) and run metrics."""

    graph: EdgeGraph
    per_pair: torch.Tensor
    method: str
    mode: str
    steps: int
    clean_metric: np.ndarray
    corrupt_metric: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        """Scores averaged over pairs, ``[n_writers, n_readers]``."""
        return self.per_pair.mean(0)

    def table(self) -> pd.DataFrame:
        return scores_table(self.graph, self.mean, method=self.method, mode=self.mode)


def _reader_gradients(model, graph: EdgeGraph, ids, mask, metric: Metric, embed=None):
    """Gradient of ``sum(metric)`` at every reader's input copy: ``([R, B, T, d], metric [B])``."""
    probes = []

    def make(kind, cols, layer):
        def fn(act, hook):
            probe = torch.zeros_like(act, requires_grad=True)
            probes.append((kind, cols, probe))
            return act + probe
        return fn

    hooks = layer_reader_hooks(graph, make)
    if embed is not None:  # EAP-IG: run on an interpolated input embedding
        hooks.insert(0, (hk.embed(), lambda act, hook: embed.to(act.dtype)))
    final = {}

    def on_final(resid):
        final["probe"] = torch.zeros_like(resid, requires_grad=True)
        return resid + final["probe"]

    with torch.enable_grad():
        values = check_metric(metric(last_logits(model, ids, mask, hooks, on_final)), len(ids), need_grad=True)
        leaves = [p for _, _, p in probes] + [final["probe"]]
        grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    B, T = ids.shape
    out = torch.zeros((graph.n_readers, B, T, model.d_model), dtype=leaves[-1].dtype, device=ids.device)
    for (kind, cols, _), g in zip(probes, grads):
        if g is not None:
            out[cols] = stack_readers(kind, g)
    if grads[-1] is not None:
        out[-1] = grads[-1]
    return out, values.detach()


def edge_scores(model, pairs, metric: Metric, *, method: str = "eap", steps: int = 5, mode: str = "denoise",
                batch_size: int = 8, graph: EdgeGraph | None = None, progress: bool = False) -> EdgeScores:
    """EAP / EAP-IG scores of every edge, per pair (see the module docstring).

    ``pairs``: ``[(clean_ids, corrupt_ids)]`` 1-D equal-length token tensors, or ``Pair`` objects from
    ``patching.pairs.make_pairs`` (clean = harmful). ``metric``: last-position logits ``[B, vocab]``
    -> ``[B]``. Several pairs share one forward (``batch_size``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (EAP-IG interpolation points), got {steps!r}")
    n_steps = steps if method == "eap-ig" else 1
    graph = graph or EdgeGraph.from_model(model)
    pairs = list(pairs)
    batches = list(pair_batches(model, pairs, batch_size))
    per_pair = torch.full((len(pairs), graph.n_writers, graph.n_readers), float("nan"))
    clean_m, corrupt_m = np.zeros(len(pairs)), np.zeros(len(pairs))
    base_name, target_name = ("corrupt", "clean") if mode == "denoise" else ("clean", "corrupt")
    valid = graph.valid
    with split_inputs(model):
        for batch in progress_bar(batches, progress, total=len(batches), desc=f"{method} scores"):
            runs = {name: capture_writers(model, batch.ids(name), batch.mask, metric)
                    for name in ("clean", "corrupt")}
            clean_m[batch.index] = runs["clean"][1].cpu().numpy()
            corrupt_m[batch.index] = runs["corrupt"][1].cpu().numpy()
            base, target = runs[base_name][0], runs[target_name][0]
            delta = writer_deltas(model, graph, target, base)  # [W, B, T, d]
            grads = None
            for k in range(n_steps):
                embed = None if method == "eap" else base["embed"] + (k / n_steps) * (target["embed"] - base["embed"])
                g, _ = _reader_gradients(model, graph, batch.ids(base_name), batch.mask, metric, embed)
                grads = g if grads is None else grads + g
            grads /= n_steps
            if not grads.any():
                raise ValueError("the metric's gradient is zero at every reader: it does not depend on the "
                                 "logits (or on anything the model computes); use e.g. the refusal score")
            for row, i in enumerate(batch.index):
                s = delta[:, row].reshape(graph.n_writers, -1) @ grads[:, row].reshape(graph.n_readers, -1).T
                per_pair[i] = torch.where(valid, s.float().cpu(), torch.nan)
    return EdgeScores(graph, per_pair, method, mode, n_steps, clean_m, corrupt_m,
                      meta={"batch_size": batch_size, "n_pairs": len(pairs)})


def scores_table(graph: EdgeGraph, scores: torch.Tensor, **columns) -> pd.DataFrame:
    """Tidy table, one row per edge: writer, reader, layer (writer's; -1 = embedding), reader_layer
    (``n_layers`` = logits), component (writer kind), head, reader_kind, score, abs_rank (1 = largest |score|)."""
    w, r = torch.nonzero(graph.valid, as_tuple=True)
    w, r = w.numpy(), r.numpy()
    s = scores[w, r].double().numpy()
    order = np.argsort(-np.abs(s), kind="stable")
    rank = np.empty(len(s), dtype=np.int64)
    rank[order] = np.arange(1, len(s) + 1)
    heads = [graph.writer_head(i) for i in w]
    df = pd.DataFrame({
        "writer": [graph.writers[i] for i in w],
        "reader": [graph.readers[i] for i in r],
        "layer": np.array([graph.writer_layer(i) for i in w], dtype=np.int64),
        "reader_layer": np.array([graph.reader_layer(i) for i in r], dtype=np.int64),
        "component": [graph.writer_kind(i) for i in w],
        "head": pd.array(heads, dtype="Int64"),
        "reader_kind": [graph.reader_kind(i) for i in r],
        "score": s,
        "abs_rank": rank,
    })
    for name, value in columns.items():
        df[name] = value
    return df.sort_values("abs_rank", kind="stable").reset_index(drop=True)
