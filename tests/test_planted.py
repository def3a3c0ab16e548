"""The planted-circuit model: its circuit is where its docstring says, and nothing else carries it."""

from __future__ import annotations

import pytest
import torch

from circuitlab.core import hooks as hk
from circuitlab.methods import metrics
from circuitlab.models.planted import (FEATURE_LAYER, HARMFUL_WORDS, HARMLESS_WORDS, PLANTED_HEAD,
    PLANTED_NEURON, build_planted, planted_prompts)


def test_keywords_and_refusal_token_are_single_tokens(planted):
    for word in HARMFUL_WORDS + HARMLESS_WORDS + ("sorry",):
        planted.to_single_token(" " + word)
    assert metrics.refusal_tokens(planted) == [planted.to_single_token(" sorry")]


def test_prompts_are_pairs_differing_in_one_token(planted, planted_sets):
    harmful, harmless = planted_sets
    assert len(harmful) == len(harmless) == 16 and len(set(harmful)) == 16
    for bad, good in zip(harmful, harmless):
        a, b = planted.tokenize([bad])[0][0], planted.tokenize([good])[0][0]
        assert a.shape == b.shape
        assert int((a != b).sum()) == 1
    with pytest.raises(ValueError, match="n must be between"):
        planted_prompts(0)


def test_build_is_deterministic():
    first, _ = build_planted()
    second, _ = build_planted()
    for (name, p), (_, q) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(p, q), name


def test_refusal_score_separates_the_sets(planted, planted_sets):
    harmful, harmless = planted_sets
    assert (metrics.refusal_score(planted, list(harmful)) > 2).all()
    assert (metrics.refusal_score(planted, list(harmless)) < -2).all()


def test_planted_head_attends_to_the_keyword(planted, planted_sets):
    layer, head = PLANTED_HEAD
    ids, mask = planted.tokenize(list(planted_sets[0]))
    keyword_ids = torch.tensor([planted.to_single_token(" " + w) for w in HARMFUL_WORDS])
    captured = {}
    with torch.no_grad(), planted.hooks([(hk.attn_pattern(layer), lambda a, hook: captured.update(p=a))]):
        planted.forward(ids, mask)
    on_keyword = (captured["p"][:, head, -1] * torch.isin(ids, keyword_ids)).sum(-1)
    assert (on_keyword > 0.99).all()


def test_last_position_is_identical_for_twins_before_the_feature_layer(planted, planted_sets):
    names = [hk.resid_pre(l) for l in range(planted.n_layers)]
    bad, good = (planted.run_with_cache(list(s), names, "post") for s in planted_sets)
    for layer in range(planted.n_layers):
        gap = (bad[hk.resid_pre(layer)] - good[hk.resid_pre(layer)]).abs().max().item()
        if layer < FEATURE_LAYER:
            assert gap < 1e-5, layer
        else:
            assert gap > 1e-2, layer


def test_neuron_fires_only_on_harmful_and_causes_the_refusal(planted, planted_sets):
    layer, neuron = PLANTED_NEURON
    harmful, harmless = (list(s) for s in planted_sets)
    bad, good = (planted.run_with_cache(s, [hk.mlp_post(layer)], "last")[hk.mlp_post(layer)][:, 0, neuron]
                 for s in (harmful, harmless))
    assert (bad > 1).all() and (good.abs() < 1e-6).all()

    def ablate(act, hook):
        act[..., neuron] = 0.0
        return act

    ablated = metrics.refusal_score(planted, harmful, fwd_hooks=[(hk.mlp_post(layer), ablate)])
    assert (ablated < 0).all()
