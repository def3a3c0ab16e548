"""Circuit selection from edge scores: top-n, greedy connected growth, pruning, random baselines,
and the stability of a selection across bootstrap resamples of the pairs.

- ``top_n``: the ``n`` edges with the largest |score| (Syed et al. 2023; MIB's default).
- ``greedy``: Hanna et al. 2024's greedy search (also in MIB): start from the logits and repeatedly
  add the best-scoring edge whose reader belongs to a node already in the circuit, so the circuit
  stays connected to the logits as it grows.
- ``prune``: drop dangling edges: an edge is kept only if its writer is reachable from the
  embedding through kept edges and its reader's node reaches the logits through kept edges. With
  corrupted-run ablation pruning never changes a circuit's output: a writer none of whose inputs is
  kept computes exactly its corrupted-run value, so an edge out of it ablates nothing.
- ``random_circuit``: ``n`` edges drawn uniformly from the graph (a size-matched baseline).
- ``bootstrap_stability``: Jaccard overlap of the top-n edge sets of bootstrap resamples of the
  pairs with that of all pairs.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from circuitlab.graph.graph import EdgeGraph

__all__ = ["top_n", "greedy", "prune", "random_circuit", "select", "n_for_fraction", "jaccard",
           "bootstrap_stability", "SELECTIONS"]

SELECTIONS = ("topn", "greedy")


def _check_n(graph: EdgeGraph, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= graph.n_edges:
        raise ValueError(f"a circuit needs between 1 and {graph.n_edges} edges, got n={n!r}")
    return int(n)


def _ranked(graph: EdgeGraph, scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    s = scores.abs() if absolute else scores.clone()
    s = s.double()
    return torch.where(graph.valid & ~torch.isnan(s), s, torch.tensor(-np.inf, dtype=s.dtype))


def n_for_fraction(graph: EdgeGraph, fraction: float) -> int:
    """Edges in a circuit holding ``fraction`` of the graph's edges (at least 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"edge fraction must be in (0, 1], got {fraction!r}")
    return max(1, int(round(fraction * graph.n_edges)))


def top_n(graph: EdgeGraph, scores: torch.Tensor, n: int, *, absolute: bool = True, pruned: bool = True) -> torch.Tensor:
    """Mask of the ``n`` best edges (by |score| unless ``absolute=False``), optionally pruned."""
    n = _check_n(graph, n)
    s = _ranked(graph, scores, absolute).flatten()
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[torch.topk(s, n).indices] = True
    mask = mask.view(graph.n_writers, graph.n_readers) & graph.valid
    return prune(graph, mask) if pruned else mask


def greedy(graph: EdgeGraph, scores: torch.Tensor, n: int, *, absolute: bool = True, pruned: bool = True) -> torch.Tensor:
    """Hanna et al. 2024's greedy search: grow from the logits by the best edge into the circuit."""
    n = _check_n(graph, n)
    s = _ranked(graph, scores, absolute).numpy()
    mask = np.zeros((graph.n_writers, graph.n_readers), dtype=bool)
    heap, active, nodes = [], set(), {None}

    def activate(r):
        if r in active:
            return
        active.add(r)
        for w in range(int(graph.n_read[r])):
            if np.isfinite(s[w, r]):
                heapq.heappush(heap, (-s[w, r], w, r))

    activate(graph.n_readers - 1)
    count = 0
    while heap and count < n:
        _, w, r = heapq.heappop(heap)
        mask[w, r] = True
        count += 1
        if w not in nodes:
            nodes.add(w)
            for r2 in graph.writer_inputs(w):
                activate(r2)
    mask = torch.from_numpy(mask)
    return prune(graph, mask) if pruned else mask


def prune(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """Keep only edges on some embedding -> ... -> logits path of kept edges."""
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m & graph.valid.numpy()
    W, R = m.shape
    reach = np.zeros(W, dtype=bool)
    reach[0] = True
    for w in range(1, W):  # forward order: a writer's inputs read only earlier writers
        reach[w] = any(m[:graph.n_read[r], r][reach[:graph.n_read[r]]].any() for r in graph.writer_inputs(w))
    useful_w = np.zeros(W, dtype=bool)
    useful_r = np.zeros(R, dtype=bool)
    useful_r[R - 1] = True
    for w in range(W - 1, -1, -1):  # reverse order: a reader's owners come after every writer it reads
        for r in np.nonzero(m[w])[0]:
            if not useful_r[r] and any(useful_w[o] for o in graph.reader_owners(r)):
                useful_r[r] = True
        useful_w[w] = bool(useful_r[m[w]].any())
    keep = m & reach[:, None] & useful_r[None, :]
    return torch.from_numpy(keep)


def random_circuit(graph: EdgeGraph, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` edges drawn uniformly without replacement (not pruned)."""
    n = _check_n(graph, n)
    idx = torch.nonzero(graph.valid.flatten()).flatten()
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    mask = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    mask[pick] = True
    return mask.view_as(graph.valid)


def select(graph: EdgeGraph, scores: torch.Tensor, n: int, selection: str = "topn", **kwargs) -> torch.Tensor:
    """``top_n`` or ``greedy`` by name."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not one of {SELECTIONS}")
    return (top_n if selection == "topn" else greedy)(graph, scores, n, **kwargs)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two edge masks (1.0 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def bootstrap_stability(graph: EdgeGraph, per_pair: torch.Tensor, n: int, *, n_boot: int = 20, seed: int = 0,
                        selection: str = "topn") -> np.ndarray:
    """Jaccard overlaps (``[n_boot]``) of the unpruned selection of ``n`` edges from pairs resampled
    with replacement against the selection from all pairs (``per_pair``: ``[n_pairs, W, R]``)."""
    rng = np.random.default_rng(seed)
    full = select(graph, per_pair.mean(0), n, selection, pruned=False)
    out = []
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, len(per_pair), len(per_pair)))
        out.append(jaccard(full, select(graph, per_pair[idx].mean(0), n, selection, pruned=False)))
    return np.asarray(out)
