"""Edge attribution (EAP, EAP-IG) and exact circuit faithfulness: known answers, identities, parity
with TransformerLens, GQA edge accounting, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitlab.methods.pairs import make_pairs
from circuitlab.graph import (EdgeGraph, area_under_curve, bootstrap_stability, edge_scores,
    evaluate_circuits, faithfulness, greedy, jaccard, prune, random_circuit, top_n)
from circuitlab.methods.metrics import refusal_score_from_logits, refusal_tokens

PLANTED_PATH = [("embed", "a1.g2.k"), ("embed", "a1.g2.v"), ("a1.h2", "m2"), ("m2", "logits")]


def _metric(model):
    toks = refusal_tokens(model)
    return lambda logits: refusal_score_from_logits(logits, toks)


@pytest.fixture(scope="module")
def tiny_pairs(tiny, harmful, harmless):
    return list(make_pairs(tiny, harmful, harmless))


@pytest.fixture(scope="module")
def planted_pairs(planted, planted_sets):
    return list(make_pairs(planted, *planted_sets))


@pytest.fixture(scope="module")
def planted_scores(planted, planted_pairs):
    return {(method, mode): edge_scores(planted, planted_pairs, _metric(planted), method=method, mode=mode)
            for method in ("eap", "eap-ig") for mode in ("denoise", "noise")}


# ---- the graph ---------------------------------------------------------------------------------

def test_gqa_edge_accounting(tiny):
    g = EdgeGraph.from_model(tiny)
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (2, 4, 2)
    c = g.counts()
    # readers per layer: 4 q + 2 k + 2 v + 1 mlp; writers before layer l: 1 + 5 l
    assert c["readers"] == 2 * 9 + 1 == g.n_readers and c["writers"] == 11 == g.n_writers
    assert (c["into_q"], c["into_k"], c["into_v"]) == (4 * 7, 2 * 7, 2 * 7)
    assert c["into_mlp"] == 5 + 10 and c["into_logits"] == 11
    assert c["edges"] == g.n_edges == int(g.valid.sum()) == 82
    # without GQA k and v would have one reader per query head: 2 * (4 - 2) * 7 more edges
    assert c["edges_without_gqa"] - c["edges"] == 2 * (4 - 2) * 7 == 28
    k0 = g.reader_index("a1.g1.k")
    assert [g.writers[w] for w in g.reader_owners(k0)] == ["a1.h2", "a1.h3"]  # HF repeat_kv grouping
    assert g.n_read[k0] == 6 and g.n_read[g.reader_index("m1")] == 10


def test_embedded_graph_size():
    g = EdgeGraph(24, 14, 2)
    c = g.counts()
    assert (c["writers"], c["readers"]) == (361, 457)
    assert (c["into_q"], c["into_k"], c["into_v"], c["into_mlp"], c["into_logits"]) == (58296, 8328, 8328, 4500, 361)
    assert c["edges"] == 79813 == g.n_edges and c["edges_without_gqa"] == 179749


# ---- known answers on the planted model -------------------------------------------------------

def test_planted_path_found_first(planted, planted_scores):
    g = EdgeGraph.from_model(planted)
    path = g.mask(PLANTED_PATH)
    for mode in ("denoise", "noise"):
        ig = planted_scores[("eap-ig", mode)].mean
        assert set(g.edges_of(top_n(g, ig, 4, pruned=False))) == set(PLANTED_PATH)
        assert torch.equal(greedy(g, ig, 4), path) and torch.equal(top_n(g, ig, 4), path)
        # plain EAP ranks the value, head -> MLP and MLP -> logits edges first; at the harmless
        # baseline every value is 0, so the key's gradient vanishes (the failure EAP-IG fixes)
        eap = planted_scores[("eap", mode)].mean
        assert set(g.edges_of(top_n(g, eap, 3, pruned=False))) == set(PLANTED_PATH[1:])


def test_planted_circuit_is_faithful_random_is_not(planted, planted_pairs):
    g = EdgeGraph.from_model(planted)
    metric = _metric(planted)
    masks = [g.mask(PLANTED_PATH)] + [random_circuit(g, len(PLANTED_PATH), seed) for seed in range(5)]
    f = evaluate_circuits(planted, planted_pairs, metric, masks).faithfulness()
    assert f[0] >= 0.9
    assert np.all(np.abs(f[1:]) < 0.2)
    assert faithfulness(planted, planted_pairs, metric, PLANTED_PATH, ablation="mean") >= 0.9


# ---- identities --------------------------------------------------------------------------------

def test_no_ablation_is_clean_and_full_ablation_is_corrupted(tiny, tiny_pairs):
    g, metric = EdgeGraph.from_model(tiny), _metric(tiny)
    result = evaluate_circuits(tiny, tiny_pairs, metric, [g.valid.clone()], batch_size=4)
    with torch.no_grad():
        plain = {name: np.array([float(metric(tiny.forward(p[i][None])[:, -1].float())[0])
                                 for p in ((pr.harmful_ids, pr.harmless_ids) for pr in tiny_pairs)])
                 for name, i in (("clean", 0), ("corrupt", 1))}
    np.testing.assert_allclose(result.circuits[0], plain["clean"], atol=1e-4)
    np.testing.assert_allclose(result.clean, plain["clean"], atol=1e-4)
    np.testing.assert_allclose(result.empty, plain["corrupt"], atol=1e-4)
    assert result.faithfulness()[0] == pytest.approx(1.0, abs=1e-6)
    mean = evaluate_circuits(tiny, tiny_pairs, metric, [g.valid.clone()], ablation="mean")
    np.testing.assert_allclose(mean.circuits[0], plain["clean"], atol=1e-4)


def test_eap_ig_with_one_step_is_eap_and_batching_is_exact(tiny, tiny_pairs):
    metric = _metric(tiny)
    eap = edge_scores(tiny, tiny_pairs, metric, method="eap", batch_size=4)
    ig1 = edge_scores(tiny, tiny_pairs, metric, method="eap-ig", steps=1, batch_size=6)
    single = edge_scores(tiny, tiny_pairs[:1], metric, method="eap", batch_size=1)
    assert torch.allclose(eap.per_pair, ig1.per_pair, atol=1e-6, equal_nan=True)
    assert torch.allclose(eap.per_pair[0], single.per_pair[0], atol=1e-5, equal_nan=True)
    table = eap.table()
    assert list(table.abs_rank[:3]) == [1, 2, 3] and len(table) == EdgeGraph.from_model(tiny).n_edges
    assert table.layer.min() == -1 and table.reader_layer.max() == tiny.n_layers


# ---- parity with TransformerLens on a non-GQA model -------------------------------------------

def test_parity_with_transformerlens(harmful, harmless):
    from circuitlab.graph.oracle import build_mha, tl_edge_scores, tl_faithfulness

    model = build_mha()
    metric = _metric(model)
    pairs = list(make_pairs(model, harmful, harmless))[:3]
    ours = edge_scores(model, pairs, metric, method="eap", mode="denoise", batch_size=3).mean
    theirs = tl_edge_scores(model, pairs, metric)
    assert torch.allclose(ours, theirs, atol=1e-4, equal_nan=True)
    g = EdgeGraph.from_model(model)
    pair = (pairs[0].harmful_ids, pairs[0].harmless_ids)
    for n in (12, 90):  # sparse and dense circuits take the two correction paths
        circuit = top_n(g, ours, n, pruned=False)
        assert faithfulness(model, [pair], metric, circuit) == pytest.approx(
            tl_faithfulness(model, pair, metric, circuit), abs=1e-4)


# ---- selection, curves, stability --------------------------------------------------------------

def test_prune_keeps_only_connected_edges():
    g = EdgeGraph(2, 4, 2)
    dangling = g.mask([("a0.h1", "m1"), ("embed", "a1.g0.k"), ("m0", "logits")])
    assert not prune(g, dangling).any()  # a0.h1 has no input edge; m1 and head a1.h0/1 reach no logits
    chain = g.mask([("embed", "a0.h1.q"), ("a0.h1", "m1"), ("m1", "logits"), ("embed", "a1.g1.v")])
    assert g.edges_of(prune(g, chain)) == [("embed", "a0.h1.q"), ("a0.h1", "m1"), ("m1", "logits")]
    kv = g.mask([("embed", "a0.g0.v"), ("a0.h1", "logits")])  # kv group 0 feeds heads 0 and 1
    assert torch.equal(prune(g, kv), kv)
    assert jaccard(chain, kv) == 0.0 and jaccard(chain, chain) == 1.0


def test_area_under_curve_matches_mib():
    fr = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert area_under_curve(fr, [1.0] * 10) == pytest.approx((0.999, 0.0))
    cpr, cmd = area_under_curve(fr, [0.0] * 9 + [1.0])
    assert cpr == pytest.approx(0.25) and cmd == pytest.approx(0.999 - 0.25)
    assert area_under_curve(fr, [1.0] * 10, x="log")[0] == pytest.approx(1.0)


def test_bootstrap_stability_is_one_for_identical_pairs():
    g = EdgeGraph(2, 4, 2)
    s = torch.where(g.valid, torch.randn(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0)), torch.nan)
    jac = bootstrap_stability(g, s[None].repeat(5, 1, 1), 8, n_boot=5)
    assert np.allclose(jac, 1.0)


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_fails_early_with_the_fix(tiny, tiny_pairs):
    g, metric = EdgeGraph.from_model(tiny), _metric(tiny)
    a, b = tiny_pairs[0].harmful_ids, tiny_pairs[1].harmless_ids
    assert len(a) != len(b)
    with pytest.raises(ValueError, match="make_pairs"):
        edge_scores(tiny, [(a, b)], metric)
    with pytest.raises(ValueError, match="does not depend on the logits"):
        edge_scores(tiny, tiny_pairs[:1], lambda logits: torch.zeros(len(logits)))
    with pytest.raises(ValueError, match="empty"):
        evaluate_circuits(tiny, tiny_pairs, metric, [torch.zeros_like(g.valid)])
    with pytest.raises(ValueError, match="not a writer.*layers 0..1"):
        faithfulness(tiny, tiny_pairs, metric, [("a7.h0", "logits")])
    with pytest.raises(ValueError, match="not a reader"):
        g.mask([("embed", "a0.h0.k")])  # keys are per kv head on GQA: a0.g0.k
    with pytest.raises(ValueError, match="not an edge"):
        g.mask([("m1", "m0")])
    with pytest.raises(ValueError, match="method"):
        edge_scores(tiny, tiny_pairs, metric, method="acdc")
