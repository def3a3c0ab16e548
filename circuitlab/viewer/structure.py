"""The residual-stream edge graph from node names alone (no torch): parsing, architecture, pruning.

The saved tables name nodes as ``circuitlab.graph.EdgeGraph`` does. Writers: ``embed``,
``a{l}.h{h}`` (one attention head), ``m{l}`` (one whole MLP). Readers: ``a{l}.h{h}.q``,
``a{l}.g{g}.k`` / ``a{l}.g{g}.v`` (one per key/value head, shared by the query heads of group
``g`` under grouped-query attention), ``m{l}`` and ``logits``. This module re-derives what the
viewer needs from those names: which writer owns a reader, which readers feed a writer, the
architecture (layers, heads, kv heads), and ``prune`` exactly as ``circuitlab.graph.prune``
computes it, so the viewer can rebuild a top-n circuit of the faithfulness curve from saved scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Architecture", "parse_writer", "parse_reader", "edge_counts", "infer_architecture", "prune",
           "entry_points"]

_WRITER = re.compile(r"^(?:(embed)|a(\d+)\.h(\d+)|m(\d+))$")
_READER = re.compile(r"^(?:(logits)|a(\d+)\.h(\d+)\.q|a(\d+)\.g(\d+)\.(k|v)|m(\d+))$")


def parse_writer(name: str) -> tuple[str, int, int | None]:
    """``(kind, layer, index)`` of a writer name: embed (layer -1), head (index = head) or mlp."""
    m = _WRITER.match(str(name))
    if not m:
        raise ValueError(f"{name!r} is not a writer name ('embed', 'a<layer>.h<head>', 'm<layer>')")
    if m.group(1):
        return "embed", -1, None
    if m.group(2) is not None:
        return "head", int(m.group(2)), int(m.group(3))
    return "mlp", int(m.group(4)), None


def parse_reader(name: str) -> tuple[str, int | None, int | None]:
    """``(kind, layer, index)`` of a reader name: q (head), k / v (kv group), mlp, logits (layer None)."""
    m = _READER.match(str(name))
    if not m:
        raise ValueError(f"{name!r} is not a reader name ('a<l>.h<h>.q', 'a<l>.g<g>.k|v', 'm<l>', 'logits')")
    if m.group(1):
        return "logits", None, None
    if m.group(2) is not None:
        return "q", int(m.group(2)), int(m.group(3))
    if m.group(4) is not None:
        return m.group(6), int(m.group(4)), int(m.group(5))
    return "mlp", int(m.group(7)), None


def edge_counts(n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """Writers, readers and edges of the graph (the closed forms of ``circuitlab.graph.graph``)."""
    before = [1 + l * (n_heads + 1) for l in range(n_layers)]
    writers = 1 + n_layers * (n_heads + 1)
    edges = (n_heads + 2 * n_kv_heads) * sum(before) + sum(b + n_heads for b in before) + writers
    return {"writers": writers, "readers": n_layers * (n_heads + 2 * n_kv_heads + 1) + 1, "edges": edges}


@dataclass(frozen=True)
class Architecture:
    """Layers, query heads and key/value heads of the graph a run was scored on."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (HF ``repeat_kv``: kv head g serves heads g*r .. g*r+r-1)."""
        return max(1, self.n_heads // max(1, self.n_kv_heads))

    def owners(self, reader: str) -> list[str]:
        """Writers whose computation reads ``reader`` (a shared k/v reader: every head of its group)."""
        kind, layer, idx = parse_reader(reader)
        if kind == "q":
            return [f"a{layer}.h{idx}"]
        if kind in ("k", "v"):
            r = self.group_size
            return [f"a{layer}.h{h}" for h in range(idx * r, (idx + 1) * r)]
        return [f"m{layer}"] if kind == "mlp" else []

    def inputs(self, writer: str) -> list[str]:
        """Readers that feed ``writer``: a head's q plus its group's k and v; an MLP's input."""
        kind, layer, idx = parse_writer(writer)
        if kind == "embed":
            return []
        if kind == "mlp":
            return [f"m{layer}"]
        g = idx // self.group_size
        return [f"a{layer}.h{idx}.q", f"a{layer}.g{g}.k", f"a{layer}.g{g}.v"]


def _solve_heads(n_layers: int, n_edges: int, min_heads: int, min_kv: int) -> tuple[int, int] | None:
    """The (heads, kv heads) whose graph has exactly ``n_edges`` edges, or None."""
    for heads in range(max(1, min_heads), 513):
        if edge_counts(n_layers, heads, 1)["edges"] > n_edges:
            return None
        for kv in range(max(1, min_kv), heads + 1):
            if heads % kv == 0 and edge_counts(n_layers, heads, kv)["edges"] == n_edges:
                return heads, kv
    return None


def infer_architecture(writers, readers, *, n_layers: int | None = None, counts: dict | None = None,
                       n_graph_edges: int | None = None) -> Architecture:
    """The architecture from a run's node names, made exact by its graph counts where saved.

    ``counts``: edge-attribution's graph table (writers, readers); ``n_graph_edges``: circuit-map's
    graph size. Without either, the largest layer / head / kv head seen (a lower bound).
    """
    w = [parse_writer(x) for x in writers]
    r = [parse_reader(x) for x in readers]
    layers = max([l for _, l, _ in w] + [l for _, l, _ in r if l is not None] + [0]) + 1
    n_layers = n_layers or layers
    heads = max([i + 1 for k, _, i in w if k == "head"] + [i + 1 for k, _, i in r if k == "q"] + [1])
    kv = max([i + 1 for k, _, i in r if k in ("k", "v")] + [1])
    if counts and counts.get("writers") and counts.get("readers"):
        heads = (int(counts["writers"]) - 1) // n_layers - 1
        kv = ((int(counts["readers"]) - 1) // n_layers - heads - 1) // 2
    elif n_graph_edges:
        solved = _solve_heads(n_layers, int(n_graph_edges), heads, kv)
        heads, kv = solved if solved else (heads, kv)
    return Architecture(n_layers, heads, max(1, kv))


def _writer_order(name: str) -> tuple[int, int]:
    kind, layer, idx = parse_writer(name)
    return (layer, -1 if kind == "embed" else (idx if kind == "head" else 1 << 30))


def prune(arch: Architecture, edges) -> list[bool]:
    """Per ``(writer, reader)`` edge: kept on some embedding -> ... -> logits path of these edges.

    ``circuitlab.graph.prune`` on edge lists: a writer is reached when an edge from a reached writer
    enters one of its inputs; a reader is useful when it is the logits or a useful writer owns it.
    """
    edges = [(str(w), str(r)) for w, r in edges]
    into: dict[str, list[str]] = {}
    out: dict[str, list[str]] = {}
    for w, r in edges:
        into.setdefault(r, []).append(w)
        out.setdefault(w, []).append(r)
    writers = sorted({w for w, _ in edges} | {o for _, r in edges for o in arch.owners(r)}, key=_writer_order)
    reach = {"embed": True}
    for w in writers:  # forward order: a writer's inputs read only earlier writers
        if w != "embed":
            reach[w] = any(reach.get(src, False) for r in arch.inputs(w) for src in into.get(r, ()))
    useful_r, useful_w = {"logits": True}, {}
    for w in reversed(writers):  # reverse order: a reader's owners come after every writer it reads
        for r in out.get(w, ()):
            if not useful_r.get(r) and any(useful_w.get(o, False) for o in arch.owners(r)):
                useful_r[r] = True
        useful_w[w] = any(useful_r.get(r, False) for r in out.get(w, ()))
    return [reach.get(w, False) and useful_r.get(r, False) for w, r in edges]


def entry_points(arch: Architecture, ranked_edges, sizes) -> list[int | None]:
    """Per edge of ``ranked_edges`` (best |score| first): the index of the first size in ``sizes``
    (increasing) whose pruned top-n circuit keeps it, or None when none does."""
    out: list[int | None] = [None] * len(ranked_edges)
    for i, n in enumerate(sizes):
        kept = prune(arch, ranked_edges[:n])
        for j, keep in enumerate(kept):
            if keep and out[j] is None:
                out[j] = i
    return out
