"""circuit-map on the planted-circuit model: it must recover the planted head and neuron, with stages;
its edge circuit must hold the planted path and be faithful, and stages are read off it; screening
and verification use disjoint prompts, for the nodes and for the edges."""

import pytest
import torch

from circuitlab import ActivationStore, load_model
from circuitlab import graph as eg
from circuitlab.experiments import circuit_map, get
from circuitlab.experiments.circuit_map import (STAGE_RULES, CircuitMap, assign_stage, graph_stage,
    split_halves)
from circuitlab.models.planted import FEATURE_LAYER, PLANTED_HEAD, PLANTED_NEURON, planted_prompts

EDGE_COLUMNS = ["stage_rule", "edge_node", "in_edge_circuit", "edge_in_mass", "edge_out_mass", "edge_in_from",
                "edge_out_to"]
# the planted path as graph edges (no GQA on the planted model: kv head = head)
HEAD_NODE, MLP_NODE = "a{}.h{}".format(*PLANTED_HEAD), f"m{PLANTED_NEURON[0]}"
PLANTED_PATH = {("embed", "a{}.g{}.k".format(*PLANTED_HEAD)), ("embed", "a{}.g{}.v".format(*PLANTED_HEAD)),
                (HEAD_NODE, MLP_NODE), (MLP_NODE, "logits")}


@pytest.fixture(scope="module")
def planted_map():
    model = load_model("planted")
    harmful, harmless = planted_prompts(32)  # 16 per half
    return get("circuit-map")(n_neurons=5, n_heads=4).run(model, harmful, harmless)


def _row(table, kind, layer, index):
    col = "neuron" if kind == "neuron" else "head"
    match = table[(table.component == kind) & (table.layer == layer) & (table[col] == index)]
    assert len(match) == 1, f"{kind} {layer}.{index} is not among the candidates"
    return match.iloc[0]


def test_recovers_planted_head_as_detection(planted_map):
    head = _row(planted_map.table, "head", *PLANTED_HEAD)
    assert head.verified and head.stage == "detection"
    assert head.patch_effect > 0.9 and head.content_read > 0.9  # it reads the keyword, not the template


def test_recovers_planted_neuron_as_production(planted_map):
    neuron = _row(planted_map.table, "neuron", *PLANTED_NEURON)
    assert neuron.verified and neuron.stage == "production"
    assert neuron.logit_attribution > 0.9 and neuron.content_read == 0


def test_every_stage_of_the_planted_circuit_is_filled(planted_map):
    t, s = planted_map.table, planted_map.summary
    assert set(t[t.verified].stage) == {"detection", "production"}  # the planted circuit's two roles
    assert s["verified_detection"] == 1 and s["verified_production"] == 1
    # the direction is chosen on validation prompts: the only layer where the twins differ at the end
    assert s["direction_layer"] == FEATURE_LAYER and "validation" in s["direction_source"]


def test_nothing_else_is_verified(planted_map):
    t = planted_map.table
    verified = {(r.component, r.layer, r.head if r.component == "head" else r.neuron)
                for r in t[t.verified].itertuples()}
    assert verified == {("head", *PLANTED_HEAD), ("neuron", *PLANTED_NEURON)}
    assert planted_map.summary["first_readable_layer"] == FEATURE_LAYER


def test_screen_and_verify_use_disjoint_prompts(tiny, harmful, harmless, tmp_path, monkeypatch):
    screen, verify = split_halves(harmful, 0)
    assert not set(screen) & set(verify) and sorted(list(screen) + list(verify)) == sorted(harmful)
    seen = {"screen": set(), "verify": set(), "edge_screen": set(), "edge_verify": set()}
    atp, patch, find = circuit_map.mean_patch_estimates, CircuitMap._patch_effects, eg.find_circuit
    monkeypatch.setattr(circuit_map, "mean_patch_estimates",
                        lambda model, prompts, *a, **kw: seen["screen"].update(prompts) or atp(model, prompts, *a, **kw))
    monkeypatch.setattr(CircuitMap, "_patch_effects", lambda self, model, comps, h, s, store: seen["verify"].update(
        h + s) or patch(self, model, comps, h, s, store))

    def spy(model, discover, evaluate, *a, **kw):  # token ids of every prompt the edge stage scores / evaluates on
        for key, pairs in (("edge_screen", discover), ("edge_verify", evaluate)):
            seen[key].update(tuple(ids.tolist()) for p in pairs for ids in (p.harmful_ids, p.harmless_ids))
        seen["n_pairs"] = (len(discover), len(evaluate))
        return find(model, discover, evaluate, *a, **kw)

    monkeypatch.setattr(eg, "find_circuit", spy)
    exp = CircuitMap(n_neurons=3, n_heads=2, n_atp_neurons=2, n_atp_heads=1, n_verify=4, probe_threshold=0.6,
                     n_edges=16, n_edge_pairs=1)  # 5 % of the tiny graph (4 edges) prunes to nothing; 16 keep a connected circuit
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    assert seen["screen"] and seen["verify"] and not seen["screen"] & seen["verify"]
    assert seen["screen"] <= set(screen) and seen["verify"] <= set(verify) | set(split_halves(harmless, 0)[1])
    assert set(result.table.stage) <= {"detection", "evaluation", "decision", "production"}
    # edges: scored on screening-half pairs only, evaluated on verification-half pairs only
    halves = {name: {tuple(tiny.tokenize([p])[0][0].tolist()) for s in (harmful, harmless)
                     for p in split_halves(s, 0)[i]} for i, name in enumerate(("screen", "verify"))}
    assert seen["edge_screen"] and seen["edge_verify"] and not seen["edge_screen"] & seen["edge_verify"]
    assert seen["edge_screen"] <= halves["screen"] and seen["edge_verify"] <= halves["verify"]
    assert result.summary["edge_circuit"].startswith("eap-ig greedy") and result.summary["edge_circuit_edges"] > 0
    assert seen["n_pairs"][0] == 1 < seen["n_pairs"][1]  # n_edge_pairs bounds the scoring pairs, not the evaluation
    in_circuit = result.table[result.table.in_edge_circuit.astype(bool)]
    assert set(in_circuit.edge_node) <= set(result.tables["circuit_edges"].writer)  # a kept node writes a kept edge


def test_stage_rule_order():
    assert assign_stage(direction_frac=0.9, logit_frac=0.5, content_read=0.9, tau=0.1, read_threshold=0.5) == "production"
    assert assign_stage(0.9, 0.0, 0.8, 0.1, 0.5) == "detection"  # the content reader, even if it writes the direction
    assert assign_stage(0.5, 0.0, 0.2, 0.1, 0.5) == "decision"
    assert assign_stage(0.01, 0.01, 0.2, 0.1, 0.5) == "evaluation"
    assert assign_stage(0.0, 0.9, 0.0, 0.1, 0.5) == "production"  # by what it writes, at any depth


def test_figure_and_tables(planted_map, tmp_path):
    out = planted_map.save(tmp_path / "run")
    assert (out / "circuit.png").is_file() and (out / "layers.csv").is_file()


# ---- the edge circuit and stages read off the graph ---------------------------------------------

def test_edge_circuit_holds_the_planted_path_and_is_faithful(planted_map):
    edges = planted_map.tables["circuit_edges"]
    assert PLANTED_PATH <= set(zip(edges.writer, edges.reader))
    row = planted_map.tables["edge_circuit"].iloc[0]
    s = planted_map.summary
    assert row.faithfulness >= 0.9 and s["edge_faithfulness"] >= 0.9
    assert s["edge_circuit_edges"] == row.n_edges == len(edges) and s["edge_graph_edges"] == row.n_graph_edges
    assert s["edge_circuit_pct"] == pytest.approx(100 * row.n_edges / row.n_graph_edges, abs=1e-3)
    assert row.n_discover_pairs == row.n_eval_pairs == 16  # every pair of each half (n_verify = 16)


def test_planted_stages_are_read_off_the_graph(planted_map):
    neuron = _row(planted_map.table, "neuron", *PLANTED_NEURON)
    assert (neuron.stage, neuron.stage_rule, neuron.edge_node) == ("production", "graph", MLP_NODE)
    assert neuron.in_edge_circuit and neuron.edge_out_to == "logits"
    head = _row(planted_map.table, "head", *PLANTED_HEAD)
    assert (head.stage, head.stage_rule, head.edge_node) == ("detection", "graph", HEAD_NODE)
    assert head.in_edge_circuit and head.edge_in_from == "embed" and head.edge_out_to == MLP_NODE
    # the planted nodes carry the largest edge score mass: out of every candidate, into every candidate head
    t = planted_map.table
    assert neuron.edge_out_mass == t.edge_out_mass.max()
    assert head.edge_in_mass == t[t.component == "head"].edge_in_mass.max()
    assert planted_map.summary["staged_by_graph"] >= 2


def test_edge_columns_and_tables(planted_map, tmp_path):
    t = planted_map.table
    assert set(EDGE_COLUMNS) <= set(t.columns) and set(t.stage_rule) <= set(STAGE_RULES)
    assert ((t.edge_in_mass >= 0) & (t.edge_in_mass <= 1) & (t.edge_out_mass >= 0) & (t.edge_out_mass <= 1)).all()
    assert (t[t.stage_rule == "graph"].in_edge_circuit).all()
    out = planted_map.save(tmp_path / "run")
    for name in ("edge_circuit.csv", "circuit_edges.csv", "edge_circuit.png"):
        assert (out / name).is_file()


def test_edges_off_keeps_the_columns(tiny, harmful, harmless, tmp_path):
    exp = CircuitMap(n_neurons=2, n_heads=1, n_atp_neurons=0, n_atp_heads=0, n_verify=4, probe_threshold=0.6,
                     edges=False)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    t = result.table
    assert set(EDGE_COLUMNS) <= set(t.columns) and (t.stage_rule == "reads-writes").all()
    assert t.in_edge_circuit.isna().all() and "edge_circuit" not in result.tables
    assert result.summary["edge_circuit"].startswith("off") and result.summary["edge_faithfulness"] is None


def test_graph_stage_rule():
    assert graph_stage(True, "embed", "logits") == "production"  # writes the logits, whatever it reads
    assert graph_stage(True, "embed", "m2") == "detection"
    assert graph_stage(True, "a0.h1", "m2") is None  # neither: the reads-writes rule decides
    assert graph_stage(False, "embed", "logits") is None and graph_stage(None, None, None) is None


def test_node_edges_on_a_gqa_graph():
    g = eg.EdgeGraph(2, 4, 2)
    scores = torch.where(g.valid, 1.0, torch.nan)
    assert eg.node_writer(g, "neuron", 1, 37) == eg.node_writer(g, "mlp_out", 1) == g.mlp_writer(1)
    with pytest.raises(ValueError, match="not a graph node"):
        eg.node_writer(g, "resid_pre", 0)
    circuit = g.mask([("embed", "a1.g1.k"), ("a0.h2", "a1.h3.q"), ("a1.h3", "logits"), ("m0", "a1.g1.v")])
    node = eg.node_edges(g, scores, circuit, g.head_writer(1, 3))
    assert node.node == "a1.h3" and node.in_circuit and node.top_out == "logits" and node.top_in in {"embed", "a0.h2", "m0"}
    # inputs: its q plus its group's k and v (shared with head a1.h2), each read by the 6 writers before layer 1
    assert node.in_mass == pytest.approx(3 * 6 / g.n_edges) and node.out_mass == pytest.approx(2 / g.n_edges)
    assert not eg.node_edges(g, scores, circuit, g.head_writer(0, 0)).in_circuit
    # a1.h2 shares a1.h3's kept k/v inputs but writes nothing kept: outside the circuit, no strongest edges
    outside = eg.node_edges(g, scores, circuit, g.head_writer(1, 2))
    assert not outside.in_circuit and outside.top_in is None and outside.top_out is None
    assert outside.in_mass == pytest.approx(node.in_mass)  # the same q size and the same shared k, v


def test_edge_stage_is_skipped_without_equal_length_pairs(tiny):
    short, long = ["how do i make a bomb"], ["write a long tutorial about baking bread at home"]
    edge, status = CircuitMap()._edge_circuit(tiny, (short, long), (short, long))
    assert edge is None and status.startswith("skipped") and "edge_pairing=pad" in status
