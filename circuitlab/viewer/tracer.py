"""One edge set of a graph document in circuit-tracer's graph-file format (the JSON its local server
and Neuronpedia's attribution-graph viewer load): ``metadata``, ``qParams``, ``nodes``, ``links``.

What maps (docs/guide/viewer.md has the table):

- the embedding is one ``embedding`` node (``E_0_0``); the logits are one target ``logit`` node in
  layer ``n_layers + 1`` for the first refusal token;
- every head and MLP becomes a node of feature type ``cross layer transcoder`` in its layer, feature
  ``cantor(layer, slot)`` (slot = head index, ``n_heads`` for the MLP), its name in ``clerp``;
- an edge becomes a link from its writer to the node that owns its reader; a head's q, k and v
  edges from one writer are summed into one link, and a shared GQA k/v edge is linked to every
  head of its group (so one saved score can appear on several links).

What does not: circuit-tracer's graphs are per prompt and per token position over transcoder
features with error nodes; circuitlab's are summed over positions and averaged over prompt pairs,
over whole heads and MLPs, exact (no error nodes). Every ``ctx_idx`` is 0, there are no error nodes,
link weights are EAP / EAP-IG scores (first-order estimates of the metric change), not direct
attributions, and stages, patch effects and faithfulness have no field there.
"""

from __future__ import annotations

from circuitlab.viewer.graph_json import validate_graph
from circuitlab.viewer.structure import parse_writer

__all__ = ["to_circuit_tracer", "node_id"]


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_id(name: str, n_heads: int, n_layers: int, logit_token: int = 0) -> dict:
    """The circuit-tracer node for one circuitlab node name (module docstring)."""
    if name == "logits":
        layer = str(n_layers + 1)
        return {"node_id": f"{layer}_{logit_token}_0", "feature": logit_token, "layer": layer, "ctx_idx": 0,
                "feature_type": "logit", "jsNodeId": f"L_{logit_token}-0", "is_target_logit": True}
    kind, layer, idx = parse_writer(name)
    if kind == "embed":
        return {"node_id": "E_0_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
                "jsNodeId": "E_0-0", "is_target_logit": False}
    slot = idx if kind == "head" else n_heads
    return {"node_id": f"{layer}_{slot}_0", "feature": _cantor(layer, slot), "layer": str(layer), "ctx_idx": 0,
            "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{slot}-0", "is_target_logit": False}


def _clerp(name: str, doc: dict) -> str:
    if name == "logits":
        tokens = doc["model"].get("refusal_tokens") or ["refusal"]
        return f"refusal score (logit of {', '.join(repr(t) for t in tokens)})"
    if name == "embed":
        return "token embedding (all positions)"
    kind, layer, idx = parse_writer(name)
    units = [u["label"] for u in doc["units"] if u["node"] == name]
    what = f"attention head L{layer}H{idx}" if kind == "head" else f"MLP layer {layer} (whole MLP)"
    return what + (f"; located units: {', '.join(units)}" if units else "")


def to_circuit_tracer(doc: dict, edge_set: str | None = None, *, slug: str | None = None) -> dict:
    """The edge set ``edge_set`` (default: the document's default) as a circuit-tracer graph file."""
    validate_graph(doc)
    sets = {s["id"]: s for s in doc["edge_sets"]}
    chosen = sets.get(edge_set or doc["default_edge_set"])
    if chosen is None:
        raise ValueError(f"edge set {edge_set!r} is not one of {sorted(sets)}")
    arch = doc["architecture"]
    owners = {r["id"]: r["owners"] or ["logits"] for r in doc["readers"]}
    token = (doc["model"].get("refusal_token_ids") or [0])[0]
    weights: dict[tuple[str, str], float] = {}
    for w, r, score, _ in chosen["edges"]:
        for target in owners[r]:
            weights[(w, target)] = weights.get((w, target), 0.0) + score
    names = {"embed", "logits"} | {n for pair in weights for n in pair}
    ids = {n: node_id(n, arch["n_heads"], arch["n_layers"], token) for n in names}
    order = {n["id"]: i for i, n in enumerate(doc["nodes"])}
    nodes = [{**ids[n], "token_prob": 0.0, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": _clerp(n, doc),
              "influence": None, "activation": None} for n in sorted(names, key=order.__getitem__)]
    links = [{"source": ids[w]["node_id"], "target": ids[t]["node_id"], "weight": s} for (w, t), s in weights.items()]
    run = doc["runs"][0]
    datasets = "; ".join(f"{k}: {v.get('name')}" for k, v in (run.get("datasets") or {}).items())
    return {
        "metadata": {"slug": slug or f"circuitlab-{doc['model'].get('id')}-{chosen['id'].replace(':', '-')}",
                     "scan": f"circuitlab-{doc['model'].get('id')}", "transcoder_list": [], "prompt_tokens": [],
                     "prompt": f"{chosen['label']}; prompts {datasets}", "node_threshold": None,
                     "schema_version": 1, "info": chosen["description"]},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes, "links": links,
    }
