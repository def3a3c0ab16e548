import math

import torch

from circuitlab.methods import metrics


def test_refusal_score_is_log_odds():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    score = metrics.refusal_score_from_logits(logits, [0, 1])
    assert math.isclose(score.item(), 0.0, abs_tol=1e-5)  # p = 0.5
    score = metrics.refusal_score_from_logits(logits, [2])
    assert math.isclose(score.item(), 0.0, abs_tol=1e-5)
    score = metrics.refusal_score_from_logits(torch.log(torch.tensor([[0.9, 0.1]])), [0])
    assert math.isclose(score.item(), math.log(9), rel_tol=1e-4)


def test_refusal_score_is_stable_at_extremes():
    logits = torch.tensor([[100.0, -100.0]])
    assert torch.isfinite(metrics.refusal_score_from_logits(logits, [0])).all()
    assert torch.isfinite(metrics.refusal_score_from_logits(logits, [1])).all()


def test_kl_zero_for_same_and_positive_otherwise():
    a = torch.randn(4, 10)
    assert torch.allclose(metrics.kl_divergence(a, a), torch.zeros(4), atol=1e-6)
    assert (metrics.kl_divergence(a, a.flip(-1)) > 0).all()


def test_judge_phrases():
    assert metrics.is_refusal("I'm sorry, but I can't help with that.")
    assert metrics.is_refusal("As an AI developed by Alibaba, I cannot")
    assert not metrics.is_refusal("As an AI language model, I don't have personal preferences, but")
    assert not metrics.is_refusal("Sure! Here is a recipe for bread.")


def test_refusal_tokens_and_score_on_model(tiny, harmful):
    ids = metrics.refusal_tokens(tiny)
    assert len(ids) >= 1
    scores = metrics.refusal_score(tiny, list(harmful)[:4])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_cross_entropy_is_positive_and_finite(tiny, harmless):
    ce = metrics.cross_entropy(tiny, list(harmless)[:4])
    assert 0 < ce < 20


def test_hooks_change_the_metric(tiny, harmful):
    from circuitlab.core import hooks

    prompts = list(harmful)[:3]
    base = metrics.refusal_score(tiny, prompts)
    zeroed = metrics.refusal_score(tiny, prompts, fwd_hooks=[(hooks.resid_post(1), lambda a, hook: a * 0)])
    assert not torch.allclose(base, zeroed)
    assert torch.allclose(metrics.refusal_score(tiny, prompts), base)  # hooks gone afterwards


def test_refusal_tokens_come_from_data_not_the_model_name(tiny, tmp_path, monkeypatch):
    """The same weights under another name get the same tokens (the record, not the name, decides)."""
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    from circuitlab import load_model

    renamed = load_model("tiny")
    renamed.name = "embedded"
    assert metrics.refusal_tokens(renamed) == metrics.refusal_tokens(load_model("tiny"))
    assert "source" in renamed.refusal_token_record


def test_calibration_finds_the_planted_refusal_token(planted, planted_sets):
    harmful, harmless = planted_sets
    record = metrics.calibrate_refusal_tokens(planted, list(harmful)[:8], list(harmless)[:8], max_new_tokens=2,
                                              phrases=("sorry",))
    assert record["ids"] == [planted.to_single_token(" sorry")] and "calibrated" in record["source"]
    metrics.set_refusal_tokens(planted, [" sorry"], "model config refusal_strings")


def test_explicit_strings_override(tiny):
    assert metrics.refusal_tokens(tiny, ["I"]) == [tiny.to_single_token("I")]


def test_judge_with_shared_prefix_gives_the_same_verdicts(planted, planted_sets):
    """Directional ablation treats every position alike: sharing the chat prefix changes no verdict."""
    from circuitlab.methods import interventions as iv
    harmful, harmless = planted_sets
    prompts = list(harmful)[:6] + list(harmless)[:6]
    direction = torch.randn(planted.bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    for hooks in ([], iv.directional_ablation_hooks(planted, direction)):
        kw = dict(max_new_tokens=6, fwd_hooks=hooks, batch_size=5, phrases=("sorry",))
        plain = metrics.judge_refusals(planted, prompts, **kw)
        shared = metrics.judge_refusals(planted, prompts, share_prefix=True, **kw)
        assert shared == plain and any(plain)
