"""Exact circuit evaluation: run the model with every edge outside a circuit ablated.

Each reader ``v``'s input is rebuilt, in the running forward pass on the clean prompt, as

    input_v = (its live input) - sum over writers u -> v NOT in the circuit of (a_u^live - a_u^ablated)

so the reader sees the circuit's writers as they are in this (partly ablated) run and every other
writer at its ablated value (Hanna et al. 2024's circuit evaluation; TransformerLens
``faithfulness``; the residual stream is a plain sum of writes, so this is exact, not a
linearisation). ``a^ablated`` is

- ``corrupt`` (patching, default): the same writer in the corrupted run of the same pair;
- ``mean``: the writer's mean over the reference prompts' corrupted runs, per position counted
  from the end (prompts are aligned at their last token).

Identities (tested): ablating no edge reproduces the clean run; with ``corrupt``, ablating every
edge reproduces the corrupted run. Faithfulness (Mueller et al. 2025, MIB, §4.1)::

    f(C) = (m(C) - m(empty)) / (m(N) - m(empty))

with ``m`` averaged over pairs before the ratio (stable when one pair's gap is small), ``N`` the
full model (clean run), ``empty`` every edge ablated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from circuitlab.core import hooks as hk
from circuitlab.core.progress import progress_bar
from circuitlab.graph.forward import (Metric, capture_writers, check_metric, check_pairs, head_outputs,
    layer_reader_hooks, last_logits, pair_batches, split_inputs, unstack_readers)
from circuitlab.graph.graph import EdgeGraph

__all__ = ["evaluate_circuits", "CircuitRunner", "CircuitEval", "faithfulness", "mean_writers", "ABLATIONS"]

ABLATIONS = ("corrupt", "mean")


@dataclass
class CircuitEval:
    """Per-pair metrics: clean run ``[n]``, every edge ablated ``[n]``, each circuit ``[c, n]``."""

    clean: np.ndarray
    empty: np.ndarray
    circuits: np.ndarray
    ablation: str

    def faithfulness(self) -> np.ndarray:
        """``(mean m(C) - mean m(empty)) / (mean m(N) - mean m(empty))`` per circuit."""
        gap = self.clean.mean() - self.empty.mean()
        if abs(gap) < 1e-9:
            raise ValueError("the full model and the fully ablated model give the same mean metric, so "
                             "faithfulness is undefined; use pairs the metric separates")
        return (self.circuits.mean(1) - self.empty.mean()) / gap


def mean_writers(model, pairs, *, batch_size: int = 8) -> dict:
    """Mean writer outputs over the corrupted prompts of ``pairs``, per position from the end.

    Returns ``{'embed': [1,T,d], 'z': [[1,T,H,dh]] per layer, 'mlp': [...], 'T': T}`` (T = longest prompt).
    """
    pairs = check_pairs(pairs)
    sums, counts, T_max = None, None, max(len(clean) for clean, _ in pairs)
    for batch in pair_batches(model, pairs, batch_size):
        acts, _ = capture_writers(model, batch.corrupt, batch.mask)
        T = batch.mask.shape[1]
        w = batch.mask.to(acts["embed"].dtype)

        def add(total, x):
            weight = w.view(*w.shape, *([1] * (x.dim() - 2)))
            part = (x * weight).sum(0, keepdim=True)
            if total is None:
                total = torch.zeros((1, T_max, *x.shape[2:]), dtype=x.dtype, device=x.device)
            total[:, T_max - T:] += part
            return total

        if sums is None:
            sums = {"embed": None, "z": [None] * model.n_layers, "mlp": [None] * model.n_layers}
            counts = torch.zeros(T_max, device=w.device, dtype=w.dtype)
        counts[T_max - T:] += w.sum(0)
        sums["embed"] = add(sums["embed"], acts["embed"])
        for l in range(model.n_layers):
            sums["z"][l] = add(sums["z"][l], acts["z"][l])
            sums["mlp"][l] = add(sums["mlp"][l], acts["mlp"][l])

    def div(x):
        return x / counts.clamp_min(1).view(1, T_max, *([1] * (x.dim() - 2)))

    return {"embed": div(sums["embed"]), "z": [div(z) for z in sums["z"]], "mlp": [div(m) for m in sums["mlp"]],
            "T": T_max}


def _slice_mean(means: dict, T: int) -> dict:
    if T > means["T"]:
        raise ValueError(f"mean ablation: evaluated prompts have {T} tokens but the reference prompts at most "
                         f"{means['T']}; pass reference pairs at least as long (mean_pairs=...)")
    return {"embed": means["embed"][:, -T:], "z": [z[:, -T:] for z in means["z"]],
            "mlp": [m[:, -T:] for m in means["mlp"]]}


def _ablated_logits(model, graph: EdgeGraph, ids, mask, ablate: torch.Tensor, repl: dict) -> torch.Tensor:
    """Last-position logits of the clean run with the edges in ``ablate`` ([W, R] bool) ablated.

    Writers fire in forward order, so when a reader's hook fires the running sum ``total`` of every
    delta written so far is exactly the sum over the writers it reads. A reader's correction is then
    the sum over its ablated writers, or ``total`` minus the sum over its kept ones, whichever names
    fewer writers: sparse and near-full circuits both cost little more than a plain forward.
    """
    B, T = ids.shape
    H = graph.n_heads
    dtype = repl["embed"].dtype
    delta = torch.empty((graph.n_writers, B, T, model.d_model), dtype=dtype, device=ids.device)
    total = {}

    def on_embed(act, hook):
        delta[0] = act - repl["embed"]
        total["sum"] = delta[0].clone()

    def on_z(layer):
        w = graph.head_writer(layer, 0)

        def fn(act, hook):
            delta[w:w + H] = head_outputs(model, layer, act - repl["z"][layer]).permute(2, 0, 1, 3)
            total["sum"] += delta[w:w + H].sum(0)
        return fn

    def on_mlp(layer):
        def fn(act, hook):
            delta[graph.mlp_writer(layer)] = act - repl["mlp"][layer]
            total["sum"] += delta[graph.mlp_writer(layer)]
        return fn

    def correction(cols):
        """``() -> [len(cols), B, T, d]``: each reader's sum of ablated writers' deltas, or None."""
        n = int(graph.n_read[cols[0]])
        a = ablate[:n, cols]
        if not a.any():
            return None
        use_kept = int(a.sum()) > int((~a).sum())
        pick = ~a if use_kept else a
        rows = torch.nonzero(pick.any(1)).flatten().to(ids.device)
        weights = pick[pick.any(1)].to(dtype=dtype, device=ids.device).T  # [len(cols), len(rows)]

        def compute():
            part = (weights @ delta[rows].reshape(len(rows), -1)).reshape(len(cols), B, T, -1) if len(rows) else 0
            return total["sum"][None] - part if use_kept else part
        return compute

    def make(kind, cols, layer):
        corr = correction(cols)
        if corr is None:
            return None

        def fn(act, hook):
            return act - unstack_readers(kind, corr().expand(len(cols), B, T, -1)).to(act.dtype)
        return fn

    hooks = [(hk.embed(), on_embed)]
    for l in range(graph.n_layers):
        hooks += [(hk.attn_z(l), on_z(l)), (hk.mlp_out(l), on_mlp(l))]
    hooks += [(name, fn) for name, fn in layer_reader_hooks(graph, make) if fn is not None]
    final = correction([graph.n_readers - 1])
    on_final = None if final is None else (lambda resid: resid - final()[0].to(resid.dtype))
    return last_logits(model, ids, mask, hooks, on_final)


class CircuitRunner:
    """Runs circuits on fixed pairs. The clean metric, the replacement activations and the fully
    ablated metric of every batch are computed once, then each circuit costs one forward per batch.
    ``mean_pairs``: reference pairs for ``ablation='mean'`` (default: ``pairs``)."""

    def __init__(self, model, pairs, metric: Metric, *, ablation: str = "corrupt", batch_size: int = 8,
                 graph: EdgeGraph | None = None, mean_pairs=None, progress: bool = False):
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation={ablation!r} is not one of {ABLATIONS}")
        self.model, self.metric, self.ablation, self.progress = model, metric, ablation, progress
        self.graph = graph or EdgeGraph.from_model(model)
        self.pairs = check_pairs(pairs)
        self.batches = list(pair_batches(model, self.pairs, batch_size))
        means = mean_writers(model, mean_pairs or self.pairs, batch_size=batch_size) if ablation == "mean" else None
        self.clean, self.empty = np.zeros(len(self.pairs)), np.zeros(len(self.pairs))
        self._repl = []
        with split_inputs(model), torch.no_grad():
            for batch in progress_bar(self.batches, progress, total=len(self.batches), desc="baselines"):
                clean_logits = last_logits(model, batch.clean, batch.mask)
                self.clean[batch.index] = self._metric(clean_logits, len(batch.index))
                if ablation == "corrupt":
                    self._repl.append(capture_writers(model, batch.corrupt, batch.mask)[0])
                else:
                    self._repl.append(_slice_mean(means, batch.mask.shape[1]))
        self.empty = self.run([torch.zeros_like(self.graph.valid)], check=False)[0]

    def _metric(self, logits, n):
        return check_metric(self.metric(logits), n, need_grad=False).cpu().numpy()

    def run(self, circuits: Sequence[torch.Tensor], *, check: bool = True) -> np.ndarray:
        """Per-pair metrics ``[n_circuits, n_pairs]`` with every edge outside each circuit ablated."""
        kept = [self.graph.check_mask(c) for c in circuits] if check else list(circuits)
        out = np.zeros((len(kept), len(self.pairs)))
        valid = self.graph.valid
        with split_inputs(self.model), torch.no_grad():
            for batch, repl in progress_bar(list(zip(self.batches, self._repl)), self.progress and len(kept) > 1,
                                            total=len(self.batches), desc="circuits"):
                for c, keep in enumerate(kept):
                    logits = _ablated_logits(self.model, self.graph, batch.clean, batch.mask, valid & ~keep, repl)
                    out[c, batch.index] = self._metric(logits, len(batch.index))
        return out

    def evaluate(self, circuits: Sequence[torch.Tensor]) -> CircuitEval:
        return CircuitEval(self.clean, self.empty, self.run(circuits), self.ablation)


def evaluate_circuits(model, pairs, metric: Metric, circuits: Sequence[torch.Tensor], *, ablation: str = "corrupt",
                      batch_size: int = 8, graph: EdgeGraph | None = None, mean_pairs=None,
                      progress: bool = False) -> CircuitEval:
    """Metrics of the clean run, the fully ablated run and each circuit's run, per pair.

    ``circuits``: bool masks ``[n_writers, n_readers]`` of edges KEPT (``EdgeGraph.mask``); each must
    be a non-empty set of graph edges (checked before any forward pass).
    """
    graph = graph or EdgeGraph.from_model(model)
    kept = [graph.check_mask(c) for c in circuits]
    runner = CircuitRunner(model, pairs, metric, ablation=ablation, batch_size=batch_size, graph=graph,
                           mean_pairs=mean_pairs, progress=progress)
    return runner.evaluate(kept)


def faithfulness(model, pairs, metric: Metric, circuit, *, ablation: str = "corrupt", batch_size: int = 8,
                 graph: EdgeGraph | None = None, mean_pairs=None) -> float:
    """Faithfulness of one circuit (a mask, or a list of ``(writer, reader)`` names) over ``pairs``."""
    graph = graph or EdgeGraph.from_model(model)
    mask = circuit if isinstance(circuit, torch.Tensor) else graph.mask(circuit)
    result = evaluate_circuits(model, pairs, metric, [mask], ablation=ablation, batch_size=batch_size,
                               graph=graph, mean_pairs=mean_pairs)
    return float(result.faithfulness()[0])
