"""refusal-direction: splits, candidates, selection rule, attribution identities, evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.methods import interventions as iv
from circuitlab.io.datasets import PromptSet
from circuitlab.methods.stats import bootstrap_ci
from circuitlab.methods.direction_eval import (SELECTION_STEPS, direction_components,
    evaluate_direction, pareto_ranks, score_candidates, select_candidate)
from circuitlab.methods.directions import candidate_directions, unit
from circuitlab.experiments.direction import RefusalDirection, split_three


def test_split_three_is_a_deterministic_partition(harmful):
    parts = split_three(harmful, 0.5, 0.25, seed=3)
    assert [len(p) for p in parts] == [5, 2, 3]
    assert sorted(sum((list(p) for p in parts), [])) == sorted(harmful)
    assert [list(p) for p in parts] == [list(p) for p in split_three(harmful, 0.5, 0.25, seed=3)]
    with pytest.raises(ValueError, match="at least 3"):
        split_three(PromptSet("two", ("a", "b")), 0.5, 0.25, 0)


def test_candidates_are_difference_in_means(tiny, harmful, harmless, tmp_path):
    exp = RefusalDirection(progress=False)
    dirs = exp.candidate_directions(tiny, harmful, harmless, ActivationStore(tmp_path))
    assert len(dirs) == tiny.n_layers * tiny.n_post
    name = hk.resid_pre(1)
    a = tiny.run_with_cache(list(harmful), [name], [-2])[name][:, 0].mean(0)
    b = tiny.run_with_cache(list(harmless), [name], [-2])[name][:, 0].mean(0)
    assert torch.allclose(dirs[(1, -2)], a - b, atol=1e-5)
    assert dirs[(0, -1)].norm() < 1e-6  # same template token, same embedding: nothing to separate


def _candidates_table():
    return pd.DataFrame({
        "layer": [0, 1, 2, 3, 4], "position": [-1] * 5, "excluded": [False, False, False, False, True],
        "bypass_score": [-1.0, -3.0, -2.0, np.nan, -9.0], "kl": [0.05, 0.5, 0.05, np.nan, 0.01],
        "induce_score": [0.5, 2.0, 0.2, np.nan, 3.0]})


def _picked(t):
    assert t.selected.sum() == 1 and t.fallback_step.nunique() == 1 and t.selection_rule.nunique() == 1
    return t.loc[t.selected, "layer"].item(), t.fallback_step.iloc[0]


def test_selection_follows_paper_rule():
    t, rule = select_candidate(_candidates_table(), 0.1, 0.0, baseline_harmful=-1.3)
    assert _picked(t) == (2, "paper")  # layer 1 fails KL, 4 is pruned
    assert t.passes_kl.tolist() == [True, False, True, False, True]
    assert t.passes_induce.tolist()[:3] == [True, True, True] and pd.isna(t.passes_induce[3])
    assert t.selection_rule.iloc[0] == rule and "paper" in rule


def test_selection_falls_back_to_baseline_relative_induction_without_redefining_passes_induce():
    table = _candidates_table().assign(induce_score=[-1.0, -0.5, -2.0, np.nan, 1.0])
    t, _ = select_candidate(table, 0.1, 0.0, baseline_harmful=-1.3)
    assert _picked(t) == (0, "induce_relative_to_baseline")  # -1.0 > -1.3, layer 2 fails
    assert t.passes_induce.tolist()[:3] == [False, False, False]  # still the paper's definition
    assert t.passes_induce_relative.tolist()[:3] == [True, True, False]
    t, _ = select_candidate(table, 0.01, 0.0, baseline_harmful=-1.3)
    assert _picked(t) == (1, "lowest_bypass")  # nothing passes KL


def test_selection_keeps_kl_filter_when_nothing_induces_refusal():
    table = _candidates_table().assign(induce_score=[-5.0, -5.0, -5.0, np.nan, 1.0])
    t, _ = select_candidate(table, 0.1, 0.0, baseline_harmful=-1.3)
    assert _picked(t) == (2, "kl_only")  # layer 1 fails KL
    t, _ = select_candidate(table, 0.1, None, baseline_harmful=-1.3)
    assert _picked(t) == (2, "paper") and t.passes_induce.isna().all()  # induce filter off: not measured


def test_kl_budget_selects_along_the_validation_pareto_front():
    t, rule = select_candidate(_candidates_table(), 0.1, 0.0, baseline_harmful=-1.3, kl_budget=1.0)
    assert t.pareto_front.tolist() == [False, True, True, False, False]  # 0 is dominated by 2; 4 is pruned
    assert _picked(t) == (1, "kl_budget") and "kl_budget" in rule
    t, _ = select_candidate(_candidates_table(), 0.1, 0.0, baseline_harmful=-1.3, kl_budget=0.1)
    assert _picked(t) == (2, "kl_budget")
    t, _ = select_candidate(_candidates_table(), 0.1, 0.0, baseline_harmful=-1.3, kl_budget=0.001)
    assert _picked(t) == (2, "kl_budget_unmet_lowest_kl")  # lowest KL, ties broken by bypass score
    assert set(SELECTION_STEPS) >= {"paper", "induce_relative_to_baseline", "kl_only", "lowest_bypass",
                                    "kl_budget", "kl_budget_unmet_lowest_kl"}


def test_pareto_ranks_are_non_dominated_sorting():
    ranks = pareto_ranks([-3.0, -2.0, -1.0, -2.5, 0.0], [0.5, 0.05, 0.05, 0.6, 0.01])
    assert ranks.tolist() == [0, 0, 1, 1, 0]


def test_filter_keeps_refused_harmful_and_answered_harmless(tiny, harmful, harmless):
    from circuitlab.methods import metrics

    h_scores, s_scores = metrics.refusal_score(tiny, list(harmful)), metrics.refusal_score(tiny, list(harmless))
    threshold = float(torch.cat([h_scores, s_scores]).median())  # the random model needs a threshold that splits
    exp = RefusalDirection(progress=False, filter_by="score", filter_threshold=threshold, min_kept=1)
    h, s, rows = exp.filter_refused(tiny, harmful, harmless, "train")
    assert list(h) == [p for p, x in zip(harmful, h_scores.tolist()) if x > threshold]
    assert list(s) == [p for p, x in zip(harmless, s_scores.tolist()) if x < threshold]
    assert rows[0] == {"split": "train", "side": "harmful", "n": len(harmful), "kept": len(h), "used": len(h),
                       "filter_by": "score", "filter_fallback": False}
    # too few survivors: that side is used whole, and the row says so
    exp = RefusalDirection(progress=False, filter_by="score", filter_threshold=threshold, min_kept=len(harmful))
    h2, s2, rows = exp.filter_refused(tiny, harmful, harmless, "val")
    assert list(h2) == list(harmful) and list(s2) == list(harmless)
    assert [r["filter_fallback"] for r in rows] == [True, True] and rows[0]["kept"] == len(h)


def test_judge_filter_uses_generation_verdicts(tiny, harmful, harmless, monkeypatch):
    verdicts = {p: i % 3 == 0 for i, p in enumerate(list(harmful) + list(harmless))}
    monkeypatch.setattr(tiny, "generate", lambda prompts, n, **kw: ["I cannot" if verdicts[p] else "Sure" for p in prompts])
    h, s, rows = RefusalDirection(progress=False, min_kept=1).filter_refused(tiny, harmful, harmless, "train")
    assert list(h) == [p for p in harmful if verdicts[p]] and list(s) == [p for p in harmless if not verdicts[p]]
    assert rows[1]["filter_by"] == "judge" and rows[1]["kept"] == len(s)


def test_scores_match_the_intervention_hooks_and_screening_keeps_whole_fronts(tiny, harmful, harmless, tmp_path):
    from circuitlab.methods import metrics

    dirs = candidate_directions(tiny, harmful, harmless, ActivationStore(tmp_path))
    h, s = list(harmful), list(harmless)
    t, _, base = score_candidates(tiny, dirs, h, s, screen_prompts=3, n_finalists=2, batch_size=4)
    scored = t[t.screen_bypass_score.notna()]
    assert len(scored) > t.finalist.sum() >= 2 and t.selected[t.finalist].sum() == 1
    assert t[~t.finalist].bypass_score.isna().all()
    ranks = pareto_ranks(scored.screen_bypass_score.tolist(), scored.screen_kl.tolist())
    assert ranks[scored.finalist.to_numpy()].max() < ranks[~scored.finalist.to_numpy()].min()
    row = t[t.finalist].iloc[0]
    d, tok = dirs[(row.layer, row.position)], metrics.refusal_tokens(tiny)
    ablated = tiny.last_logits(h + s, fwd_hooks=iv.directional_ablation_hooks(tiny, d))
    added = tiny.last_logits(s, fwd_hooks=iv.activation_addition_hooks(tiny, d, int(row.layer)))
    assert row.bypass_score == pytest.approx(metrics.refusal_score_from_logits(ablated[:10], tok).mean().item(), abs=1e-4)
    assert row.kl == pytest.approx(metrics.kl_divergence(tiny.last_logits(s), ablated[10:]).mean().item(), abs=1e-4)
    assert row.induce_score == pytest.approx(metrics.refusal_score_from_logits(added, tok).mean().item(), abs=1e-4)
    assert base["harmful"] == pytest.approx(metrics.refusal_score(tiny, h).mean().item(), abs=1e-4)
    assert (t.n_val_harmful == 10).all() and (t.n_val_harmless == 10).all()


@pytest.mark.parametrize("kl_budget", [None, 0.05])
def test_induce_selectable_skips_only_scores_the_rule_cannot_read(tiny, harmful, harmless, tmp_path, kl_budget):
    """induce="selectable" selects what "all" selects; its finalists lack an induce score exactly where
    the rule reads none (KL at or above the threshold, or a KL budget)."""
    dirs = candidate_directions(tiny, harmful, harmless, ActivationStore(tmp_path))
    h, s = list(harmful), list(harmless)
    kl_threshold = 0.4  # the tiny model's four finalists: KL 0.32-0.71, two on each side
    kw = dict(screen_prompts=3, n_finalists=4, kl_threshold=kl_threshold, kl_budget=kl_budget, batch_size=4)
    full, rule, _ = score_candidates(tiny, dirs, h, s, **kw)
    lazy, lazy_rule, _ = score_candidates(tiny, dirs, h, s, induce="selectable", **kw)
    fin = full[full.finalist]
    read = (fin.kl < kl_threshold) & (kl_budget is None)
    assert lazy_rule == rule and lazy.selected.equals(full.selected)
    assert (read.sum(), (~read).sum()) == ((2, 2) if kl_budget is None else (0, 4))
    assert lazy.loc[fin.index[read], "induce_score"].equals(fin.induce_score[read])
    assert lazy.loc[fin.index[~read], "induce_score"].isna().all()
    induced = ["induce_score", "passes_induce", "passes_induce_relative"]
    pd.testing.assert_frame_equal(lazy.drop(columns=induced), full.drop(columns=induced))
    with pytest.raises(ValueError, match="induce='some'"):
        score_candidates(tiny, dirs, h, s, induce="some", **kw)


def test_selection_never_sees_the_test_split(tiny, harmful, harmless, tmp_path, monkeypatch):
    """Every path to the model (format: forward, generate, store reads) is counted for TEST prompts."""
    exp = RefusalDirection(progress=False, max_new_tokens=2, plaintext=None, n_boot=20, min_kept=1)
    test = set(split_three(harmful, exp.train_frac, exp.val_frac, exp.seed)[2]) | set(
        split_three(harmless, exp.train_frac, exp.val_frac, exp.seed)[2])
    seen, done = [], object()
    fmt = tiny.format
    monkeypatch.setattr(tiny, "format", lambda prompt, chat=True, *rest: seen.append(prompt) or fmt(prompt, chat, *rest))
    store = ActivationStore(tmp_path)
    get = store.get
    monkeypatch.setattr(store, "get", lambda model, prompts, *a, **kw: seen.extend(prompts) or get(model, prompts, *a, **kw))
    evaluate = RefusalDirection._evaluate  # merge calls it once the direction is selected
    monkeypatch.setattr(RefusalDirection, "_evaluate", lambda self, *a: (seen.append(done), evaluate(self, *a))[1])
    result = exp.run(tiny, harmful, harmless, store=store)
    cut = next(i for i, x in enumerate(seen) if x is done)
    assert not test & set(seen[:cut]), "a test prompt reached the model before the direction was selected"
    assert test <= set(seen[cut:])  # the evaluation does use them
    assert set(result.tables["filter"].split) == {"train", "val"} and "filter_fallback" in result.summary


def test_head_and_neuron_attributions_sum_to_layer_outputs(tiny, harmful, harmless, tmp_path):
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    table = direction_components(tiny, r, list(harmful), list(harmless), ActivationStore(tmp_path),
                                 top_neurons=tiny.d_mlp)
    r_hat = unit(r)
    name = hk.attn_out(1)
    attn = tiny.run_with_cache(list(harmful), [name], "last")[name][:, 0].mean(0) @ r_hat
    heads = table[(table.component == "head") & (table.layer == 1)].attribution_harmful.sum()
    assert heads == pytest.approx(float(attn), abs=1e-4)
    for l in range(tiny.n_layers):
        sel = table[table.layer == l]
        neurons = sel[sel.component == "neuron"].attribution_diff.sum()
        assert neurons == pytest.approx(sel[sel.component == "mlp_out"].attribution_diff.item(), abs=1e-4)
    assert sorted(table["rank"]) == list(range(1, len(table) + 1))


def test_orthogonalized_condition_matches_ablation(tiny, harmful, harmless):
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    ev = evaluate_direction(tiny, r, 1, list(harmful)[:4], list(harmless)[:4], ["some plain text here"],
                            judge=True, max_new_tokens=4, n_boot=50)
    assert len(ev) == 8 and set(ev.condition) == {"baseline", "ablation", "orthogonalized", "addition"}
    by = ev.set_index(["condition", "split"])
    for col in ("refusal_score", "kl_harmless", "cross_entropy"):
        assert by.loc[("orthogonalized", "harmful"), col] == pytest.approx(by.loc[("ablation", "harmful"), col], abs=1e-3)
    assert by.loc[("baseline", "harmless"), "kl_harmless"] == 0
    assert (ev.refusal_rate_ci_low <= ev.refusal_rate).all() and (ev.refusal_rate <= ev.refusal_rate_ci_high).all()
    base = tiny.last_logits(list(harmful)[:4])
    assert torch.equal(tiny.last_logits(list(harmful)[:4]), base)  # weights restored after 'orthogonalized'


def test_bootstrap_ci_brackets_the_mean():
    low, high = bootstrap_ci([0, 1] * 50, n_boot=500)
    assert low < 0.5 < high and high - low < 0.3
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_experiment_runs_and_selects_one(tiny, harmful, harmless, tmp_path):
    exp = RefusalDirection(progress=False, max_new_tokens=4, plaintext=None, n_boot=50,
                           filter_train=False, filter_val=False)  # the random tiny model refuses nothing
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    assert result.table.selected.sum() == 1
    best = result.table[result.table.selected].iloc[0]
    assert best.layer < tiny.n_layers * 0.8 and not best.excluded
    assert exp.layer_ == best.layer and exp.direction_.shape == (tiny.d_model,)
    assert set(result.tables) >= {"evaluation", "components", "candidates", "filter"}
    assert set(result.figures) >= {"candidates", "tradeoff", "refusal_rates"}
    assert {"selection_rule", "fallback_step", "n_val_harmful", "filter_fallback"} <= set(result.summary)
    assert {"passes_kl", "passes_induce", "passes_induce_relative", "pareto_front", "fallback_step",
            "selection_rule", "finalist"} <= set(result.tables["candidates"].columns)
    assert exp.position_ == best.position


def test_run_units_score_candidates_as_select_does(tiny, harmful, harmless, tmp_path):
    """run's units (a screening round, then the finalists) give the candidates table select gives in one call."""
    exp = RefusalDirection(progress=False, filter_by="score", min_kept=1, screen_prompts=2, n_finalists=2,
                           judge=False, plaintext=None, n_boot=20, component_prompts=2)
    store = ActivationStore(tmp_path)
    plan = exp.plan(tiny, harmful, harmless, store=store)
    assert {u.stage for u in plan.units} == {"screen"} and len(plan.units) > 2
    h_train, h_val, _ = split_three(harmful, exp.train_frac, exp.val_frac, exp.seed)
    s_train, s_val, _ = split_three(harmless, exp.train_frac, exp.val_frac, exp.seed)
    table, filtered, _, baseline = exp.select(tiny, h_train, s_train, h_val, s_val, store)
    chosen = exp.direction_
    result = exp.run(tiny, harmful, harmless, store=store)
    pd.testing.assert_frame_equal(result.table, table, check_exact=True)
    pd.testing.assert_frame_equal(result.tables["filter"], filtered, check_exact=True)
    assert torch.equal(exp.direction_, chosen) and result.summary["val_baseline_harmful_score"] == round(
        baseline["harmful"], 4)


# test_embedded_direction_bypasses_and_induces_refusal lives in test_embedded.py (one embedded load per run)
