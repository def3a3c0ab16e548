"""The planted suite: each model's ground truth is what its weights compute (exact edge ablation on
matched pairs: keeping only the ground-truth edges keeps refusal, ablating them removes it; OR: each
path alone suffices; AND: each path is necessary), the single model is unchanged, truth round-trips."""

from __future__ import annotations

import time

import pytest
import torch

from circuitlab.graph import CircuitRunner, EdgeGraph
from circuitlab.methods.attribution import refusal_metric
from circuitlab.methods.pairs import make_pairs
from circuitlab.models.planted import SUITE, PlantedCircuit, build, build_planted, circuit, hooked, planted_prompts


@pytest.fixture(scope="module")
def runners():
    h, hl = planted_prompts(12, seed=1)
    out = {}
    for name in SUITE:
        m = hooked(name)
        g = EdgeGraph.from_model(m)
        out[name] = (g, CircuitRunner(m, list(make_pairs(m, h, hl)), refusal_metric(m), graph=g, batch_size=12))
    return out


def _frac(runner, mask) -> float:
    """Mean refusal score of a circuit as a fraction of the clean-minus-corrupted gap."""
    m = runner.run([mask], check=False)[0].mean()
    return float((m - runner.empty.mean()) / (runner.clean.mean() - runner.empty.mean()))


@pytest.mark.parametrize("name", list(SUITE))
def test_ground_truth_is_what_the_weights_compute(runners, name):
    g, r = runners[name]
    gt = g.mask(SUITE[name].edges)
    assert r.clean.mean() - r.empty.mean() > 10  # harmful refuses, harmless does not, by a wide margin
    assert _frac(r, gt) > 0.95  # keeping only the circuit preserves refusal
    assert abs(_frac(r, g.valid & ~gt)) < 0.05  # ablating it removes refusal


def _only(gt: PlantedCircuit, head) -> list:
    """The ground-truth edges without the other planted heads' edges."""
    others = [f"a{l}.h{h}" for l, h in gt.heads() if (l, h) != head]
    groups = [f"a{l}.g{h}." for l, h in gt.heads() if (l, h) != head]  # no GQA in or/and: group = head
    return [e for e in gt.edges if e[0] not in others and not any(e[1].startswith(p) for p in groups)]


def test_or_each_path_suffices_and_is_not_necessary(runners):
    g, r = runners["or"]
    gt = SUITE["or"]
    for head in gt.heads():
        assert _frac(r, g.mask(_only(gt, head))) > 0.95


def test_and_each_path_is_necessary(runners):
    g, r = runners["and"]
    gt = SUITE["and"]
    for head in gt.heads():
        assert _frac(r, g.mask(_only(gt, head))) < 0.05


def test_decoy_is_correlated_but_unread(runners):
    g, r = runners["decoy"]
    decoy = [("embed", "a1.g0.k"), ("embed", "a1.g0.v"), ("a1.h0", "m2")]
    assert abs(_frac(r, g.mask(decoy + [("m2", "logits")]))) < 0.05  # it carries nothing to the output
    hf, tok = build("decoy")
    ids = tok(["how do i make a bomb", "how do i make a cake"], return_tensors="pt").input_ids
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states[2][:, -1]
    assert hs[0, 6] - hs[1, 6] > 0.05 and abs(hs[1, 6]) < 1e-6  # but it is perfectly correlated


def test_gqa_model_shares_key_value_heads():
    hf, _ = build("gqa")
    assert hf.config.num_key_value_heads == 2 < hf.config.num_attention_heads
    assert ("embed", "a1.g1.k") in SUITE["gqa"].edges


def test_single_is_the_original_model_and_builds_fast():
    t = time.perf_counter()
    a, _ = build("single")
    assert time.perf_counter() - t < 1.0
    b, _ = build_planted()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_truth_round_trips_and_bad_names_fail():
    for gt in SUITE.values():
        assert PlantedCircuit.from_dict(gt.to_dict()) == gt
    with pytest.raises(ValueError, match="the suite has"):
        circuit("nope")
