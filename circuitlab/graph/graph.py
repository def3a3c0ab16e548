"""The residual-stream edge graph of a transformer, with grouped-query (GQA) key/value readers.

The graph of edge attribution patching (Syed et al. 2023, "Attribution Patching Outperforms
Automated Circuit Discovery"; Hanna et al. 2024, "Have Faith in Faithfulness"; the ACDC graph of
Conmy et al. 2023): the residual stream entering any component is the sum of everything written
before it, so each (writer, reader) pair is one edge.

- **Writers** (in forward order): the token embedding ``embed``; every attention head ``a{l}.h{h}``
  (its own output ``z_h W_O^h``); every MLP ``m{l}``.
- **Readers**: every head's query input ``a{l}.h{h}.q``; every *key/value head's* key and value
  inputs ``a{l}.g{g}.k`` / ``a{l}.g{g}.v``; every MLP input ``m{l}``; the ``logits`` (the final
  residual, before the final norm). Layer norms belong to the reader (as in EAP): a reader's input
  is its pre-norm copy of the residual stream.

GQA. With ``n_kv`` key/value heads for ``n_heads`` query heads, key and value projections are
computed once per key/value head and shared by the ``n_heads / n_kv`` query heads of its group
(Ainslie et al. 2023; HF ``repeat_kv``: kv head ``g`` serves query heads ``g*r .. g*r + r - 1``,
``r = n_heads / n_kv``). A key or value input therefore exists once per kv head, not per query
head: the graph has ``n_heads + 2 n_kv + 1`` readers per layer instead of ``3 n_heads + 1``. An
edge into ``a{l}.g{g}.k`` changes the keys of every query head in group ``g`` at once.

Edge count: a layer-``l`` attention reader reads the ``1 + l (n_heads + 1)`` writers before it;
MLP ``l`` reads those plus the ``n_heads`` heads of its own layer; the logits read all writers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["EdgeGraph", "READER_KINDS", "edge_counts"]

READER_KINDS = ("q", "k", "v", "mlp", "logits")
_WRITER_RE = re.compile(r"^(?:embed|a(\d+)\.h(\d+)|m(\d+))$")
_READER_RE = re.compile(r"^(?:logits|a(\d+)\.h(\d+)\.q|a(\d+)\.g(\d+)\.(k|v)|m(\d+))$")


def edge_counts(n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """Writer, reader and edge counts by reader kind, from the closed forms in the module docstring."""
    before = [1 + l * (n_heads + 1) for l in range(n_layers)]
    counts = {
        "writers": 1 + n_layers * (n_heads + 1),
        "readers": n_layers * (n_heads + 2 * n_kv_heads + 1) + 1,
        "into_q": n_heads * sum(before),
        "into_k": n_kv_heads * sum(before),
        "into_v": n_kv_heads * sum(before),
        "into_mlp": sum(b + n_heads for b in before),
        "into_logits": 1 + n_layers * (n_heads + 1),
    }
    counts["edges"] = sum(v for k, v in counts.items() if k.startswith("into_"))
    return counts


@dataclass(frozen=True)
class EdgeGraph:
    """Writers, readers and the valid-edge mask ``[n_writers, n_readers]`` of one architecture.

    Writers are numbered in forward order, so a reader reads a *prefix* of them: reader ``r``
    reads writers ``0 .. n_read[r] - 1``. Score and circuit tensors are ``[n_writers, n_readers]``
    with invalid entries NaN (scores) or False (circuits).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __post_init__(self):
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_model(cls, model) -> "EdgeGraph":
        """The graph of a ``HookedModel`` (reads ``n_key_value_heads`` from the bridge config)."""
        kv = getattr(model.bridge.cfg, "n_key_value_heads", None) or model.n_heads
        return cls(model.n_layers, model.n_heads, int(kv))

    # ---- names and indices ------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def group_of(self, head: int) -> int:
        """The key/value head serving query head ``head`` (HF ``repeat_kv`` layout)."""
        return head // self.group_size

    @cached_property
    def writers(self) -> tuple[str, ...]:
        names = ["embed"]
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}" for h in range(self.n_heads)] + [f"m{l}"]
        return tuple(names)

    @cached_property
    def readers(self) -> tuple[str, ...]:
        names = []
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}.q" for h in range(self.n_heads)]
            names += [f"a{l}.g{g}.k" for g in range(self.n_kv_heads)]
            names += [f"a{l}.g{g}.v" for g in range(self.n_kv_heads)]
            names.append(f"m{l}")
        return tuple(names + ["logits"])

    @cached_property
    def _writer_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.writers)}

    @cached_property
    def _reader_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.readers)}

    def writer_index(self, name: str) -> int:
        if name not in self._writer_index:
            raise ValueError(f"{name!r} is not a writer of this graph ({self._range_hint()}); writers are "
                             f"'embed', 'a<layer>.h<head>' and 'm<layer>'")
        return self._writer_index[name]

    def reader_index(self, name: str) -> int:
        if name not in self._reader_index:
            raise ValueError(f"{name!r} is not a reader of this graph ({self._range_hint()}); readers are "
                             f"'a<layer>.h<head>.q', 'a<layer>.g<kv head>.k|v', 'm<layer>' and 'logits'")
        return self._reader_index[name]

    def _range_hint(self) -> str:
        return (f"layers 0..{self.n_layers - 1}, heads 0..{self.n_heads - 1}, "
                f"kv heads 0..{self.n_kv_heads - 1}")

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    def writer_layer(self, w: int) -> int:
        """Layer of writer ``w``; ``-1`` for the embedding."""
        return -1 if w == 0 else (w - 1) // (self.n_heads + 1)

    def writer_kind(self, w: int) -> str:
        """``embed`` | ``head`` | ``mlp_out`` (circuitlab component names)."""
        if w == 0:
            return "embed"
        return "mlp_out" if (w - 1) % (self.n_heads + 1) == self.n_heads else "head"

    def writer_head(self, w: int) -> int | None:
        return (w - 1) % (self.n_heads + 1) if self.writer_kind(w) == "head" else None

    @cached_property
    def _reader_info(self) -> list[tuple[str, int, int | None]]:
        """Per reader: (kind, layer, head or kv head or None); logits has layer n_layers."""
        info = []
        for l in range(self.n_layers):
            info += [("q", l, h) for h in range(self.n_heads)]
            info += [("k", l, g) for g in range(self.n_kv_heads)]
            info += [("v", l, g) for g in range(self.n_kv_heads)]
            info.append(("mlp", l, None))
        return info + [("logits", self.n_layers, None)]

    def reader_kind(self, r: int) -> str:
        return self._reader_info[r][0]

    def reader_layer(self, r: int) -> int:
        return self._reader_info[r][1]

    def reader_head(self, r: int) -> int | None:
        return self._reader_info[r][2]

    # ---- structure --------------------------------------------------------------------------

    def head_writer(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_writer(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def n_read(self) -> np.ndarray:
        """Per reader: how many writers (a prefix in forward order) it reads."""
        out = []
        for kind, l, _ in self._reader_info:
            if kind == "logits":
                out.append(self.n_writers)
            else:
                out.append(1 + l * (self.n_heads + 1) + (self.n_heads if kind == "mlp" else 0))
        return np.asarray(out)

    @cached_property
    def valid(self) -> torch.Tensor:
        """Bool ``[n_writers, n_readers]``: True where writer precedes reader (an edge)."""
        return torch.arange(self.n_writers)[:, None] < torch.as_tensor(self.n_read)[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @cached_property
    def _columns(self) -> dict[tuple[str, int], list[int]]:
        out: dict[tuple[str, int], list[int]] = {}
        for r, (k, l, _) in enumerate(self._reader_info):
            out.setdefault((k, l), []).append(r)
        return out

    def reader_columns(self, kind: str, layer: int) -> list[int]:
        """Reader indices of one kind in one layer (in head / kv-head order)."""
        return list(self._columns.get((kind, layer), []))

    def reader_owners(self, r: int) -> list[int]:
        """Writer nodes whose computation reads reader ``r`` (a kv reader: every head of its group)."""
        kind, l, idx = self._reader_info[r]
        if kind == "q":
            return [self.head_writer(l, idx)]
        if kind in ("k", "v"):
            return [self.head_writer(l, h) for h in range(idx * self.group_size, (idx + 1) * self.group_size)]
        return [self.mlp_writer(l)] if kind == "mlp" else []

    def writer_inputs(self, w: int) -> list[int]:
        """Readers that feed writer ``w`` (its q, its group's k and v; an MLP's input)."""
        kind = self.writer_kind(w)
        if kind == "embed":
            return []
        l = self.writer_layer(w)
        if kind == "mlp_out":
            return self.reader_columns("mlp", l)
        h = self.writer_head(w)
        g = self.group_of(h)
        return [self.reader_columns("q", l)[h], self.reader_columns("k", l)[g], self.reader_columns("v", l)[g]]

    def counts(self) -> dict:
        """Edge counts by reader kind, plus what a non-GQA graph of the same size would have."""
        out = edge_counts(self.n_layers, self.n_heads, self.n_kv_heads)
        out["edges_without_gqa"] = edge_counts(self.n_layers, self.n_heads, self.n_heads)["edges"]
        return out

    # ---- edges by name ----------------------------------------------------------------------

    def edge(self, writer: str, reader: str) -> tuple[int, int]:
        """``(w, r)`` indices of the edge ``writer -> reader``; ValueError if it is not an edge."""
        w, r = self.writer_index(writer), self.reader_index(reader)
        if not self.valid[w, r]:
            raise ValueError(f"{writer} -> {reader} is not an edge: a reader only reads writers before it "
                             f"in the forward pass (same-layer heads feed only that layer's MLP)")
        return w, r

    def mask(self, edges) -> torch.Tensor:
        """Circuit mask ``[n_writers, n_readers]`` from ``(writer, reader)`` name pairs."""
        out = torch.zeros(self.n_writers, self.n_readers, dtype=torch.bool)
        for item in edges:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise ValueError(f"an edge is a (writer, reader) name pair, got {item!r}")
            out[self.edge(item[0], item[1])] = True
        return out

    def edges_of(self, mask: torch.Tensor) -> list[tuple[str, str]]:
        """``(writer, reader)`` name pairs of a circuit mask, in writer then reader order."""
        return [(self.writers[w], self.readers[r]) for w, r in torch.nonzero(mask & self.valid).tolist()]

    def check_mask(self, mask: torch.Tensor, *, allow_empty: bool = False) -> torch.Tensor:
        """Validate a circuit mask's shape and edges (and non-emptiness) before any compute."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.n_writers, self.n_readers):
            raise ValueError(f"circuit mask must be [{self.n_writers}, {self.n_readers}] (writers x readers), "
                             f"got {tuple(mask.shape)}; build one with EdgeGraph.mask([(writer, reader), ...])")
        if (mask & ~self.valid).any():
            w, r = torch.nonzero(mask & ~self.valid)[0].tolist()
            raise ValueError(f"circuit mask marks {self.writers[w]} -> {self.readers[r]}, which is not an edge")
        if not allow_empty and not mask.any():
            raise ValueError("the circuit is empty: keep at least one edge (its faithfulness is m(empty) by "
                             "definition; an empty circuit is the baseline, not a circuit)")
        return mask
