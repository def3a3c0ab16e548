"""ACDC (Conmy et al. 2023) on planted models: exactly the planted edges at the documented tau
(1e-3, KL criterion), GQA-aware, warm start restricted to the candidates, bad input."""

from __future__ import annotations

import pytest
import torch

from circuitlab.graph import ACDCSearch, EdgeGraph, acdc, edge_scores, warm_start
from circuitlab.methods.attribution import refusal_metric
from circuitlab.methods.pairs import make_pairs
from circuitlab.models.planted import SUITE, hooked, planted_prompts

TAU = 1e-3  # documented in docs/papers/conmy_2023.md: every non-circuit edge changes KL by < 1e-6 here


def _pairs(model, n=4):
    return list(make_pairs(model, *planted_prompts(n, seed=0)))


def test_acdc_returns_exactly_the_planted_edges():
    m = hooked("single")
    r = acdc(m, _pairs(m), TAU)
    assert set(r.edges()) == set(SUITE["single"].edges)
    assert abs(r.final) < 1e-4  # the circuit reproduces the full model's distribution
    assert r.n_evals < EdgeGraph.from_model(m).n_edges + 1  # dangling readers are skipped


def test_acdc_on_gqa_warm_started_from_eap_ig():
    m = hooked("gqa")
    pairs = _pairs(m)
    g = EdgeGraph.from_model(m)
    cand = warm_start(g, edge_scores(m, pairs, refusal_metric(m), method="eap-ig").mean, 12)
    search = ACDCSearch(m, pairs, criterion="metric", metric=refusal_metric(m))
    r = search.run(0.1, candidates=cand, warm_start_n=12)
    assert set(r.edges()) == set(SUITE["gqa"].edges)  # kv-group readers a1.g1.k / a1.g1.v
    assert not (r.mask & ~cand).any() and r.warm_start == 12


def test_bad_input_fails_with_the_fix():
    m = hooked("single")
    with pytest.raises(ValueError, match="criterion"):
        ACDCSearch(m, _pairs(m, 2), criterion="l2")
    with pytest.raises(ValueError, match="needs metric"):
        ACDCSearch(m, _pairs(m, 2), criterion="metric")
    with pytest.raises(ValueError, match="tau"):
        ACDCSearch(m, _pairs(m, 2)).run(-1.0)
