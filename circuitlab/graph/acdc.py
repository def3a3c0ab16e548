"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability").

Start from the full edge graph (``graph.EdgeGraph``) and visit its readers in reverse topological
order (the logits first, then layer by layer back to layer 0; within a layer the MLP input, then
the value, key and query inputs). For each reader, try its incoming edges one at a time, latest
writer first: tentatively ablate the edge and recompute the criterion ``c`` of the current
circuit; if ``c(new) - c(current) < tau`` the edge stays removed (and ``c(current)`` becomes
``c(new)``), otherwise it is restored. A reader whose node no longer reaches the logits through
kept edges is skipped (ACDC never expands a node that is disconnected from the output; its edges
stay in ``mask`` and are pruned away). Edges are evaluated EXACTLY, with
corrupted-run (or mean) ablation of every removed edge (``faithfulness.CircuitRunner``: one
forward pass of all pairs per tried edge), not linearised.

Criteria (``criterion``):

- ``kl`` (the paper's default): mean over pairs of ``KL(p_full || p_circuit)`` of the
  last-position next-token distribution, ``p_full`` the unablated model on the clean prompt;
- ``metric``: ``|mean m(circuit) - mean m(full)|`` for a task metric ``m`` (e.g. the refusal score).

``tau`` sweep (``acdc_sweep``): the paper's ROC curves come from running ACDC at many thresholds;
each run is independent, the baselines are shared, and so are criterion values: runs at nearby
thresholds make the same decisions until the first edge whose change falls between them, so they
ask for the criterion of the same masks. ``ACDCSearch`` keeps every value it computed, keyed by a
128-bit hash of the mask (exact: same mask, same pairs, same value; ``n_cached`` counts the hits).

Warm start (``candidates``): on a graph too large to try every edge on a CPU (the embedded model
has ~10^5 edges, i.e. ~10^5 forward passes per run) ACDC may be restricted to a candidate set,
e.g. the top-N edges of EAP-IG (``warm_start``; as in the MIB shared-task winner, Mueller et al.
2025): every edge outside it is removed before the first step and never tried. This is NOT the
paper's ACDC: its result can only be a subset of the candidates, and it is labelled
``warm_start=N`` in every result.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlab.core.progress import progress_bar
from circuitlab.graph.circuits import prune, top_n
from circuitlab.graph.faithfulness import CircuitRunner
from circuitlab.graph.forward import Metric, check_pairs, last_logits, pair_batches
from circuitlab.graph.graph import EdgeGraph

__all__ = ["acdc", "acdc_sweep", "ACDCResult", "ACDCSearch", "warm_start", "CRITERIA"]

CRITERIA = ("kl", "metric")


@dataclass
class ACDCResult:
    """One ACDC run: the kept edges (raw and pruned to embedding -> logits paths) and its trace."""

    graph: EdgeGraph
    mask: torch.Tensor
    pruned: torch.Tensor
    tau: float
    criterion: str
    final: float
    n_evals: int
    wall_s: float
    warm_start: int | None = None
    n_cached: int = 0  # criterion values of this run taken from the search's cache (no forward pass)
    trace: list = field(default_factory=list)  # (writer, reader, change of the criterion, removed)

    @property
    def n_edges(self) -> int:
        return int(self.pruned.sum())

    def edges(self) -> list[tuple[str, str]]:
        return self.graph.edges_of(self.pruned)


def _kl_metric(clean_logprobs: torch.Tensor) -> Metric:
    def kl(logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits.float(), -1)
        return (clean_logprobs.exp() * (clean_logprobs - lp)).sum(-1)
    return kl


class ACDCSearch:
    """Baselines shared by every ACDC run on fixed pairs (so a tau sweep pays for them once).

    All pairs go through one batch, sorted by length, so the KL criterion can compare each row with
    its own clean distribution."""

    def __init__(self, model, pairs, *, criterion: str = "kl", metric: Metric | None = None,
                 ablation: str = "corrupt", graph: EdgeGraph | None = None):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")
        if criterion == "metric" and metric is None:
            raise ValueError("criterion='metric' needs metric= (last-position logits [B, vocab] -> [B]), "
                             "e.g. circuitlab.methods.attribution.refusal_metric(model)")
        self.graph = graph or EdgeGraph.from_model(model)
        self.criterion = criterion
        pairs = sorted(check_pairs(pairs), key=lambda p: len(p[0]))  # the runner's own (stable) order
        if criterion == "kl":
            batch = next(pair_batches(model, pairs, len(pairs)))
            with torch.no_grad():
                metric = _kl_metric(torch.log_softmax(last_logits(model, batch.clean, batch.mask), -1))
        self.runner = CircuitRunner(model, pairs, metric, ablation=ablation, batch_size=len(pairs), graph=self.graph)
        if criterion == "kl" and abs(float(self.runner.clean.mean())) > 1e-4:
            raise RuntimeError(f"KL of the full model to itself is {self.runner.clean.mean():.2e}, not 0: the "
                               "runner reordered the pairs; report this as a bug")
        self.readers_of = self._node_readers()
        self._values: dict[bytes, float] = {}
        self.n_cached = 0

    def _node_readers(self) -> dict[int, list[int]]:
        """Reader -> writers (nodes) it feeds; the logits feed none (always visited)."""
        out = {r: [] for r in range(self.graph.n_readers)}
        for w in range(self.graph.n_writers):
            for r in self.graph.writer_inputs(w):
                out[r].append(w)
        return out

    def value(self, mask: torch.Tensor) -> float:
        """The criterion of the circuit ``mask`` (computed once per distinct mask; see the module docstring)."""
        key = hashlib.blake2b(mask.cpu().numpy().tobytes(), digest_size=16).digest()
        if key in self._values:
            self.n_cached += 1
            return self._values[key]
        m = self.runner.run([mask], check=False)[0].mean()
        out = float(m) if self.criterion == "kl" else abs(float(m) - float(self.runner.clean.mean()))
        self._values[key] = out
        return out

    def run(self, tau: float, *, candidates: torch.Tensor | None = None, warm_start_n: int | None = None,
            progress: bool = False) -> ACDCResult:
        """One ACDC pass at threshold ``tau`` (see the module docstring)."""
        if not np.isfinite(tau) or tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        g, t0, n_evals, cached0 = self.graph, time.perf_counter(), 0, self.n_cached
        mask = g.valid.clone() if candidates is None else (g.check_mask(candidates) & g.valid)
        current = self.value(mask)
        n_evals += 1
        trace, last = [], g.n_readers - 1
        alive = np.zeros(g.n_writers, dtype=bool)  # the writer reaches the logits through kept edges
        for r in progress_bar(range(last, -1, -1), progress, total=g.n_readers, desc=f"acdc tau={tau:g}"):
            feeds = self.readers_of[r]
            for o in feeds:  # every reader after r has had its turn, so o's outgoing edges are final
                alive[o] = any(r2 == last or alive[self.readers_of[r2]].any()
                               for r2 in torch.nonzero(mask[o]).flatten().tolist())
            if r != last and not alive[feeds].any():
                continue  # its node reaches the logits through no kept edge: ACDC does not expand it
            for w in range(int(g.n_read[r]) - 1, -1, -1):
                if not mask[w, r]:
                    continue
                mask[w, r] = False
                new = self.value(mask)
                n_evals += 1
                removed = new - current < tau
                trace.append((g.writers[w], g.readers[r], new - current, bool(removed)))
                if removed:
                    current = new
                else:
                    mask[w, r] = True
        return ACDCResult(g, mask, torch.as_tensor(prune(g, mask)), float(tau), self.criterion, current, n_evals,
                          time.perf_counter() - t0, warm_start_n, self.n_cached - cached0, trace)


def acdc(model, pairs, tau: float, *, criterion: str = "kl", metric: Metric | None = None, ablation: str = "corrupt",
         candidates: torch.Tensor | None = None, graph: EdgeGraph | None = None, progress: bool = False) -> ACDCResult:
    """ACDC at threshold ``tau`` on ``pairs`` (clean = harmful, corrupted = harmless); see the module docstring."""
    search = ACDCSearch(model, pairs, criterion=criterion, metric=metric, ablation=ablation, graph=graph)
    return search.run(tau, candidates=candidates, progress=progress)


def acdc_sweep(model, pairs, taus, *, criterion: str = "kl", metric: Metric | None = None, ablation: str = "corrupt",
               candidates: torch.Tensor | None = None, graph: EdgeGraph | None = None,
               progress: bool = False) -> list[ACDCResult]:
    """ACDC at every threshold of ``taus`` (shared baselines), e.g. for a ROC curve (Conmy et al. Fig. 3)."""
    taus = [float(t) for t in taus]
    if not taus:
        raise ValueError("taus is empty; pass thresholds, e.g. numpy.logspace(-4, 0, 9)")
    search = ACDCSearch(model, pairs, criterion=criterion, metric=metric, ablation=ablation, graph=graph)
    return [search.run(t, candidates=candidates, progress=progress) for t in taus]


def warm_start(graph: EdgeGraph, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Candidate mask for a warm-started ACDC: the ``n`` edges of largest |score| (e.g. EAP-IG), unpruned."""
    return top_n(graph, scores, n, pruned=False)
