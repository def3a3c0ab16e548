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


def _conmy():
    from conftest import load_script

    return load_script("experiments/conmy_2023.py")


def test_conmy_table_auc_is_one_for_a_perfect_scorer_and_half_for_random():
    import numpy as np

    mod = _conmy()
    y = np.zeros(400, bool)
    y[:40] = True
    assert mod.auc(y.astype(float), y) == 1.0
    assert mod.auc(np.zeros(400), y) == 0.5  # all ties
    assert abs(mod.auc(np.random.default_rng(0).random(400), y) - 0.5) < 0.1
    fpr, tpr = mod.roc_points(y.astype(float), y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and (tpr[fpr == 0] == 1).any()
    with pytest.raises(ValueError, match="positive and one negative"):
        mod.auc(np.ones(3), np.ones(3, bool))


def test_sweep_reuses_criterion_values_exactly():
    m = hooked("single")
    pairs = _pairs(m, 2)
    shared = ACDCSearch(m, pairs)
    first, second = shared.run(1e-3), shared.run(1e-1)
    alone = ACDCSearch(m, pairs).run(1e-1)
    assert torch.equal(second.mask, alone.mask) and second.final == alone.final and second.n_evals == alone.n_evals
    assert first.n_cached == 0 == alone.n_cached and second.n_cached > 0


def test_exact_log_odds_equals_the_refusal_score_below_its_clamp_and_passes_it_above():
    m = hooked("distributed")  # its harmful prompts sit at the refusal score's clamp (p > 1 - 1e-7)
    harmful, harmless = planted_prompts(8, seed=0)
    exact, clamped = _conmy().exact_log_odds(m), refusal_metric(m)
    with torch.no_grad():
        for prompts in (harmful, harmless):
            logits = m.last_logits(list(prompts))
            e, c = exact(logits), clamped(logits)
            below = c < 15
            assert torch.allclose(e[below], c[below], atol=1e-3)
            assert (e[~below] >= c[~below] - 1e-3).all()
    assert (exact(m.last_logits(list(harmful))) > 16.2).all() and (clamped(m.last_logits(list(harmful))) < 16.12).all()
