"""The viewer's graph document (schema ``circuitlab.circuit-graph``, version 1): built from run
folders, checked, written and read. The page inlines exactly this document; docs/guide/viewer.md
documents every field.

Top level: ``schema``, ``schema_version``, ``title``, ``model`` (id, fingerprint, refusal tokens),
``architecture`` (n_layers, n_heads, n_kv_heads, group_size), ``runs`` (one per run folder: experiment,
folder name, provenance, parameters, datasets, versions, summary), ``layers`` (probe accuracy per layer;
direction and first readable layer), ``nodes`` (every writer plus ``logits``), ``readers`` (every
reader with the nodes that own it: a shared k/v reader lists every head of its group), ``measures``
(key, label, description of the card rows), ``units`` (a circuit-map run's located units),
``edge_sets`` (``edgesets``) and ``default_edge_set``.
"""

from __future__ import annotations

import json
from pathlib import Path

from circuitlab.viewer.edgesets import MAX_EDGES, circuit_map_set, edge_attribution_sets
from circuitlab.viewer.errors import ViewerError
from circuitlab.viewer.runs import Run, load_run
from circuitlab.viewer.structure import infer_architecture
from circuitlab.viewer.units import MEASURES, number, units_of

__all__ = ["SCHEMA", "SCHEMA_VERSION", "build_graph", "validate_graph", "write_graph", "read_graph"]

SCHEMA, SCHEMA_VERSION = "circuitlab.circuit-graph", 1
_TOP = ("schema", "schema_version", "title", "model", "architecture", "runs", "layers", "nodes", "readers",
        "measures", "units", "edge_sets", "default_edge_set")
_PROVENANCE = ("commit", "dirty", "diff_sha256", "started", "ended", "wall_seconds", "device", "dtype")


def _run_record(run: Run) -> dict:
    """What the page says about where a run came from (config.json, no tables)."""
    c = run.config
    prov = c.get("provenance") or {}
    return {"experiment": run.experiment, "folder": run.path.name,  # no machine path: pages are shared
            "provenance": {k: prov.get(k) for k in _PROVENANCE},
            "parameters": c.get("parameters") or {}, "datasets": c.get("datasets") or {},
            "versions": c.get("versions") or {}, "summary": json.loads(json.dumps(c.get("summary") or {}, default=str))}


def _architecture(runs: list[Run]):
    """Layers, heads and kv heads from every node name the runs hold, made exact by their graph counts."""
    writers, readers, counts, n_graph, n_layers = set(), set(), None, None, None
    for run in runs:
        edges = run.tables.get("circuit_edges") if run.experiment == "circuit-map" else run.table
        if edges is not None:
            writers |= set(edges.writer.astype(str).unique())
            readers |= set(edges.reader.astype(str).unique())
            logits = edges.reader_layer[edges.reader == "logits"] if "reader_layer" in edges.columns else []
            n_layers = n_layers or (int(logits.iloc[0]) if len(logits) else None)
        if run.experiment == "edge-attribution" and "graph" in run.tables:
            counts = dict(zip(run.tables["graph"].quantity, run.tables["graph"]["count"]))
        if run.experiment == "circuit-map":
            writers |= {str(n) for n in run.table.edge_node.dropna()}
            n_graph = n_graph or run.summary.get("edge_graph_edges")
            if "layers" in run.tables:  # a circuit-map run without edges still says how deep the model is
                n_layers = n_layers or len(run.tables["layers"])
    return infer_architecture(sorted(writers), sorted(readers), n_layers=n_layers, counts=counts,
                              n_graph_edges=n_graph)


def _nodes_and_readers(arch) -> tuple[list[dict], list[dict]]:
    nodes = [{"id": "embed", "kind": "embed", "layer": -1}]
    readers = []
    for l in range(arch.n_layers):
        nodes += [{"id": f"a{l}.h{h}", "kind": "head", "layer": l, "head": h, "kv_group": h // arch.group_size}
                  for h in range(arch.n_heads)] + [{"id": f"m{l}", "kind": "mlp", "layer": l}]
        readers += [{"id": f"a{l}.h{h}.q", "kind": "q", "layer": l, "index": h} for h in range(arch.n_heads)]
        readers += [{"id": f"a{l}.g{g}.{kv}", "kind": kv, "layer": l, "index": g}
                    for kv in ("k", "v") for g in range(arch.n_kv_heads)]
        readers.append({"id": f"m{l}", "kind": "mlp", "layer": l, "index": None})
    nodes.append({"id": "logits", "kind": "logits", "layer": arch.n_layers})
    readers.append({"id": "logits", "kind": "logits", "layer": arch.n_layers, "index": None})
    for r in readers:
        r["owners"] = arch.owners(r["id"])
    return nodes, readers


def _layers(runs: list[Run]) -> dict:
    for run in runs:
        if run.experiment == "circuit-map":
            rows = run.tables.get("layers")
            acc = [] if rows is None or "probe_accuracy" not in rows.columns else \
                [{"layer": int(r.layer), "probe_accuracy": number(r.probe_accuracy)} for r in rows.itertuples()]
            return {"probe_accuracy": acc, "direction_layer": run.summary.get("direction_layer"),
                    "first_readable_layer": run.summary.get("first_readable_layer")}
    return {"probe_accuracy": [], "direction_layer": None, "first_readable_layer": None}


def build_graph(run_dir, *more_runs, max_edges: int = MAX_EDGES) -> dict:
    """The graph document of one run folder, joined with further runs of the same model (e.g. a
    circuit-map run and the edge-attribution run whose curves the page should offer)."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in (run_dir, *more_runs)]
    kinds = [r.experiment for r in runs]
    if len(set(kinds)) < len(kinds):
        raise ViewerError(f"two {kinds[0]} runs given: join at most one circuit-map and one edge-attribution run")
    prints = {r.fingerprint for r in runs}
    if len(prints) > 1:
        raise ViewerError(f"the runs are of different models (fingerprints {', '.join(map(str, prints))}): "
                          "join only runs of one model")
    arch = _architecture(runs)
    sets = []
    for run in runs:
        if run.experiment == "circuit-map":
            sets += [s for s in [circuit_map_set(run)] if s is not None]
        else:
            sets += edge_attribution_sets(run, arch, max_edges)
    cm = next((r for r in runs if r.experiment == "circuit-map"), None)
    model = runs[0].config.get("model") or {}
    nodes, readers = _nodes_and_readers(arch)
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "title": f"{model.get('id', 'model')}: {' + '.join(kinds)}",
        "model": {"id": model.get("id"), "fingerprint": model.get("fingerprint"),
                  "refusal_tokens": (model.get("refusal_tokens") or {}).get("tokens"),
                  "refusal_token_ids": (model.get("refusal_tokens") or {}).get("ids")},
        "architecture": {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "n_kv_heads": arch.n_kv_heads,
                         "group_size": arch.group_size},
        "runs": [_run_record(r) for r in runs], "layers": _layers(runs), "nodes": nodes, "readers": readers,
        "measures": [{"key": k, "label": label, "description": d} for k, label, d in MEASURES],
        "units": units_of(cm.table, cm.config.get("parameters") or {}) if cm is not None else [],
        "edge_sets": sets, "default_edge_set": sets[0]["id"] if sets else None,
    }


def validate_graph(doc: dict) -> dict:
    """Check a graph document against schema version 1 (ValueError naming the first problem); returns it."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {doc.get('schema_version')!r}; this circuitlab reads {SCHEMA_VERSION}")
    missing = [k for k in _TOP if k not in doc]
    if missing:
        raise ValueError(f"graph document lacks {', '.join(missing)}")
    nodes, readers = {n["id"] for n in doc["nodes"]}, {r["id"]: r for r in doc["readers"]}
    for s in doc["edge_sets"]:
        for key in ("id", "method", "label", "edges", "curve"):
            if key not in s:
                raise ValueError(f"edge set {s.get('id')!r} lacks {key}")
        for w, r, score, entry in s["edges"]:
            if w not in nodes or r not in readers:
                raise ValueError(f"edge set {s['id']}: edge {w} -> {r} names an unknown node or reader")
            if not isinstance(score, (int, float)) or (entry is not None and not 0 <= entry < len(s["curve"])):
                raise ValueError(f"edge set {s['id']}: edge {w} -> {r} has a bad score or curve entry")
    for u in doc["units"]:
        if u["node"] not in nodes:
            raise ValueError(f"unit {u['id']} sits in unknown node {u['node']}")
    ids = [s["id"] for s in doc["edge_sets"]]
    if doc["default_edge_set"] is not None and doc["default_edge_set"] not in ids:
        raise ValueError(f"default_edge_set {doc['default_edge_set']!r} is not one of {ids}")
    return doc


def write_graph(doc: dict, path) -> Path:
    """Write a checked graph document as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(validate_graph(doc), separators=(",", ":"), allow_nan=False))
    return path


def read_graph(path) -> dict:
    """Read and check a graph document written by ``write_graph``."""
    return validate_graph(json.loads(Path(path).read_text()))
