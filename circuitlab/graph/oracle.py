"""TransformerLens as the parity oracle for edge scores and faithfulness (non-GQA models only).

``transformer_lens.tools.analysis.attribution_patching`` (4.3) scores *per-position* edges
(writer at position p -> reader at position p) with ``(a_clean - a_corrupt) . g_corrupt`` (our
``mode="denoise"``), one pair at a time, and measures ``faithfulness`` by ablating every edge
outside a circuit of per-position edges. It refuses GQA/MQA attention, so parity is checked on
models whose key/value heads equal their query heads (``build_mha``).

Mapping: our edge ``u -> v`` is the sum over positions of TransformerLens's ``(u, p) -> (v, p)``
edges; our circuit ``C`` is TransformerLens's circuit ``{(u, p) -> (v, p) : u -> v in C, all p}``.
Node kinds: ``embed`` / ``attn_head_out`` / ``mlp_out`` writers; ``q_input`` / ``k_input`` /
``v_input`` / ``mlp_in`` / ``logits`` readers.
"""

from __future__ import annotations

import contextlib
import os

import torch

from circuitlab.graph.forward import check_pairs
from circuitlab.graph.graph import EdgeGraph

__all__ = ["build_mha", "tl_edge_scores", "tl_faithfulness"]


def build_mha(*, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, d_mlp: int = 128, vocab_size: int | None = None,
              seed: int = 0, init_std: float | None = 0.2):
    """A random-init Qwen2 ``HookedModel`` with as many key/value heads as query heads (no GQA).

    ``init_std`` rescales 2-D weights like ``circuitlab.models.tiny`` (None keeps HF's init, for large
    sizes). ``vocab_size`` defaults to the tiny tokenizer's.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from circuitlab.core.model import HookedModel
    from circuitlab.models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=vocab_size or len(tok), hidden_size=d_model, intermediate_size=d_mlp,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf = Qwen2ForCausalLM(config).eval()
        if init_std is not None:
            with torch.no_grad():
                for p in hf.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, init_std)
    finally:
        torch.random.set_rng_state(state)
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-0.5B-Instruct", hf_model=hf, tokenizer=tok)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return HookedModel(bridge, tok, f"mha-{n_layers}x{n_heads}x{d_model}")


def _tl():
    from transformer_lens.tools.analysis import attribution_patching as ap
    return ap


@contextlib.contextmanager
def _params_require_grad(model):
    """TransformerLens grows its autograd graph from the weights; circuitlab freezes them."""
    params = [p for p in model.bridge.parameters() if not p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def _writer_node(ap, graph: EdgeGraph, w: int, pos: int):
    kind = graph.writer_kind(w)
    if kind == "embed":
        return ap.Node("embed", pos)
    if kind == "head":
        return ap.Node("attn_head_out", pos, graph.writer_layer(w), graph.writer_head(w))
    return ap.Node("mlp_out", pos, graph.writer_layer(w))


def _reader_node(ap, graph: EdgeGraph, r: int, pos: int):
    kind, layer, head = graph.reader_kind(r), graph.reader_layer(r), graph.reader_head(r)
    if kind == "logits":
        return ap.Node("logits", pos, graph.n_layers - 1)
    if kind == "mlp":
        return ap.Node("mlp_in", pos, layer)
    return ap.Node(f"{kind}_input", pos, layer, head)


def _check_mha(graph: EdgeGraph):
    if graph.n_kv_heads != graph.n_heads:
        raise ValueError("TransformerLens edge attribution refuses GQA/MQA models; use build_mha() for parity")


def _tl_metric(metric):
    return lambda logits: metric(logits[:, -1].float())[0]


def tl_edge_scores(model, pairs, metric) -> torch.Tensor:
    """TransformerLens ``attribution_patch(granularity='edge')`` summed over positions and averaged
    over pairs, as ``[n_writers, n_readers]`` (NaN off the graph); clean = first of each pair."""
    ap = _tl()
    graph = EdgeGraph.from_model(model)
    _check_mha(graph)
    total = torch.zeros(graph.n_writers, graph.n_readers, dtype=torch.float64)
    pairs = check_pairs(pairs)
    w_of = {}
    r_of = {}
    for clean, corrupt in pairs:
        with _params_require_grad(model):
            res = ap.attribution_patch(model.bridge, clean[None], corrupt[None], _tl_metric(metric),
                                       ap.EdgeAttributionConfig(granularity="edge"))
        for (u, v), score in res.edge_scores.items():
            ku, kv = (u.kind, u.layer, u.head), (v.kind, v.layer, v.head)
            if ku not in w_of:
                w_of[ku] = _lookup(graph, ap, u, writer=True)
            if kv not in r_of:
                r_of[kv] = _lookup(graph, ap, v, writer=False)
            total[w_of[ku], r_of[kv]] += score
    out = (total / len(pairs)).float()
    return torch.where(graph.valid, out, torch.nan)


def _lookup(graph: EdgeGraph, ap, node, *, writer: bool) -> int:
    items = range(graph.n_writers) if writer else range(graph.n_readers)
    make = _writer_node if writer else _reader_node
    for i in items:
        if make(ap, graph, i, node.position) == node:
            return i
    raise KeyError(f"TransformerLens node {node} has no counterpart in the graph")


def tl_faithfulness(model, pair, metric, circuit: torch.Tensor) -> float:
    """TransformerLens ``faithfulness`` (corrupted-run ablation) of a circuit mask on one pair."""
    ap = _tl()
    graph = EdgeGraph.from_model(model)
    _check_mha(graph)
    (clean, corrupt), = check_pairs([pair])
    edges = [(_writer_node(ap, graph, w, p), _reader_node(ap, graph, r, p))
             for w, r in torch.nonzero(circuit & graph.valid).tolist() for p in range(len(clean))]
    res = ap.faithfulness(model.bridge, clean[None], corrupt[None], _tl_metric(metric), edges)
    return float(res.recovered)
