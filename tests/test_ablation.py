"""Ablation experiment and fragility curve, checked on the planted-circuit model (known answer)."""

import pandas as pd
import pytest

from circuitlab import ActivationStore
from circuitlab.methods import metrics
from circuitlab.core.components import Component
from circuitlab.experiments import get
from circuitlab.experiments import ablation as ablation_module
from circuitlab.experiments.ablation import attribution_ranking, halve_split, matched_random
from circuitlab.methods.ranking import top_components
from circuitlab.methods.interventions import ablation_hooks
from circuitlab.models.planted import PLANTED_HEAD, PLANTED_NEURON


def test_matched_random_keeps_layer_counts_and_avoids_top():
    top = [Component("neuron", 2, 37), Component("neuron", 2, 5), Component("neuron", 0, 1)]
    rnd = matched_random(top, width=64, n_layers=3, seed=0)
    assert sorted(c.layer for c in rnd) == sorted(c.layer for c in top)
    assert not set(rnd) & set(top)
    assert rnd == matched_random(top, width=64, n_layers=3, seed=0)
    assert rnd != matched_random(top, width=64, n_layers=3, seed=1)


def test_matched_random_borrows_from_nearest_layer_when_a_layer_is_full():
    top = [Component("head", 1, h) for h in range(3)] + [Component("head", 0, 0)]
    rnd = matched_random(top, width=4, n_layers=3, seed=0)
    assert len(rnd) == 4 and not set(rnd) & set(top)
    assert sum(c.layer == 1 for c in rnd) == 1  # the one head left in layer 1; two come from layers 0 and 2
    with pytest.raises(ValueError, match="impossible"):
        matched_random([Component("head", 0, h) for h in range(3)], width=3, n_layers=1, seed=0)


def test_top_components_reads_rank_order():
    table = pd.DataFrame({"layer": [1, 0, 2], "component": ["neuron"] * 3, "neuron": [4, 9, 7], "rank": [2, 3, 1]})
    assert top_components(table, "neuron", 2) == [Component("neuron", 2, 7), Component("neuron", 1, 4)]
    with pytest.raises(ValueError, match="fewer than k"):
        top_components(table, "neuron", 5)


def test_ablating_the_planted_neuron_removes_refusal_a_random_one_does_not(planted, planted_sets):
    harmful, harmless = planted_sets
    base = metrics.refusal_score(planted, list(harmful))
    benign = metrics.refusal_score(planted, list(harmless))
    assert base.mean() - benign.mean() > 5
    hooks = ablation_hooks(planted, [Component("neuron", *PLANTED_NEURON)], "zero")
    ablated = metrics.refusal_score(planted, list(harmful), fwd_hooks=hooks)
    assert (ablated - benign).abs().max() < 1.0  # back to the harmless level
    for seed in range(3):
        other = matched_random([Component("neuron", *PLANTED_NEURON)], planted.d_mlp, planted.n_layers, seed)
        kept = metrics.refusal_score(planted, list(harmful), fwd_hooks=ablation_hooks(planted, other, "zero"))
        assert (kept - base).abs().max() < 0.5


def test_fragility_curve_top_beats_random_on_planted(planted, planted_sets):
    harmful, harmless = planted_sets
    exp = get("ablation")(k_grid=[1, 4], method="zero", random_seeds=2, judge_at="none", n_text=4)
    result = exp.run(planted, harmful, harmless)
    t = result.table
    assert set(t.selection) == {"baseline", "top", "random"}
    assert len(t[t.selection == "random"]) == 2 * 2
    ranking = result.tables["ranking_used"]
    assert (int(ranking.iloc[0].layer), int(ranking.iloc[0].neuron)) == PLANTED_NEURON
    base = t[t.selection == "baseline"].refusal_score.iloc[0]
    top1 = t[(t.selection == "top") & (t.k == 1)].refusal_score.iloc[0]
    rnd1 = t[(t.selection == "random") & (t.k == 1)].refusal_score.mean()
    assert base - top1 > 5 and abs(base - rnd1) < 0.5
    assert (t[t.selection == "top"].kl_harmless >= 0).all()
    assert result.summary["k_to_halve_refusal"] == 1
    assert "fragility_neuron" in result.figures


def test_attribution_ranking_puts_planted_units_first(planted, planted_sets):
    harmful, harmless = planted_sets
    store = ActivationStore(memory=True, disk=False)
    neurons = attribution_ranking(planted, harmful, harmless, "neuron", store)
    heads = attribution_ranking(planted, harmful, harmless, "head", store)
    assert (int(neurons.iloc[0].layer), int(neurons.iloc[0].neuron)) == PLANTED_NEURON
    assert (int(heads.iloc[0]["layer"]), int(heads.iloc[0]["head"])) == PLANTED_HEAD
    assert len(neurons) == planted.n_layers * planted.d_mlp


def test_bad_parameters_are_clear(planted, planted_sets):
    harmful, harmless = planted_sets
    with pytest.raises(ValueError, match="kind="):
        get("ablation")(kind="layer").run(planted, harmful, harmless)
    with pytest.raises(ValueError, match="rank_by"):
        get("ablation")(rank_by="magic", k_grid=[1]).run(planted, harmful, harmless)
    with pytest.raises(ValueError, match="k_grid"):
        get("ablation")(k_grid=[0]).run(planted, harmful, harmless)
    with pytest.raises(ValueError, match="judge_at"):
        get("ablation")(judge_at="sometimes")


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else None)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_judge_runs_only_at_the_decisive_points(planted, planted_sets, monkeypatch):
    harmful, harmless = planted_sets
    judged = _counting(monkeypatch, metrics, "judge_refusals")
    exp = get("ablation")(k_grid=[1, 2, 4], method="zero", random_seeds=2, max_new_tokens=2, n_text=4)
    result = exp.run(planted, harmful, harmless, store=ActivationStore(memory=True, disk=False))
    t, s = result.table, result.summary
    assert s["k_to_halve_refusal"] == 1  # from the score curve: the planted neuron is ranked first
    judged_rows = set(t[t.judged].apply(lambda r: (r.selection, int(r.seed), int(r.k)), axis=1))
    assert judged_rows == {("baseline", -1, 0), ("top", -1, 1), ("top", -1, 4), ("random", 0, 1), ("random", 0, 4)}
    assert t[~t.judged].refusal_rate.isna().all() and t[t.judged].refusal_rate.notna().all()
    over = t[t.over_refusal_rate.notna()]
    assert set(zip(over.selection, over.k)) == {("baseline", 0), ("top", 1), ("top", 4)}
    assert len(judged) == 5 + 3  # harmful at 5 judged rows, harmless at baseline + 2 top points
    assert t.refusal_score.notna().all() and t.refusal_prob.between(0, 1).all()  # scored everywhere
    assert s["judged_k"] == [1, 4] and "top2_refusal_rate" not in s and "top2_refusal_prob" in s
    assert {"baseline_refusal_rate", "top1_refusal_rate", "random4_refusal_rate", "top4_over_refusal_rate",
            "halving_confirmed_by_judge", "k_to_halve_refusal_judged"} <= set(s)


def test_judge_at_all_and_none(planted, planted_sets):
    harmful, harmless = planted_sets
    kw = dict(k_grid=[1, 2], method="zero", random_seeds=2, max_new_tokens=2, n_text=4, judge_harmless=False)
    t = get("ablation")(judge_at="all", **kw).run(planted, harmful, harmless).table
    assert set(t[t.judged].selection + t[t.judged].seed.astype(str)) == {"baseline-1", "top-1", "random0"}
    assert len(t[t.judged]) == 1 + 2 + 2 and t.over_refusal_rate.isna().all()
    t = get("ablation")(judge_at="none", **kw).run(planted, harmful, harmless).table
    assert not t.judged.any() and t.refusal_rate.isna().all()


def test_random_controls_at_the_decisive_k_equal_those_of_the_full_grid(planted, planted_sets):
    harmful, harmless = planted_sets
    kw = dict(k_grid=[1, 2, 4], method="zero", random_seeds=2, max_new_tokens=2, n_text=4)
    full = get("ablation")(**kw).run(planted, harmful, harmless)
    short = get("ablation")(random_at="decisive", **kw).run(planted, harmful, harmless)
    f, t = full.table, short.table
    assert full.summary["k_to_halve_refusal"] == 1  # decisive k: 1 (halving) and 4 (largest)
    assert set(zip(t[t.selection == "random"].seed, t[t.selection == "random"].k)) == {(0, 1), (1, 1), (0, 4), (1, 4)}
    # the same draws, the same hooks: every row the short run has equals the full run's, judged rows included
    both = t.merge(f, on=["selection", "seed", "k"], suffixes=("", "_full"))
    assert len(both) == len(t) == len(f) - 2
    for col in ("refusal_score", "refusal_prob", "kl_harmless", "refusal_rate", "cross_entropy"):
        assert ((both[col] - both[f"{col}_full"]).abs().max() < 1e-6) or both[col].isna().all(), col
    assert (both.judged == both.judged_full).all() and t.k.is_monotonic_increasing
    assert short.summary["random2_refusal_prob"] is None
    assert short.summary["random4_refusal_rate"] == full.summary["random4_refusal_rate"]
    with pytest.raises(ValueError, match="random_at"):
        get("ablation")(random_at="some")


def test_cross_entropy_is_measured_with_the_judge_and_equals_the_every_point_value(planted, planted_sets, monkeypatch):
    harmful, harmless = planted_sets
    kw = dict(k_grid=[1, 2, 4], method="zero", random_seeds=1, max_new_tokens=2, n_text=4, judge_harmless=False)
    ce_calls = _counting(monkeypatch, metrics, "cross_entropy")
    judged = get("ablation")(**kw).run(planted, harmful, harmless).table
    measured = judged[judged.cross_entropy.notna()]
    assert set(zip(measured.selection, measured.k)) == {("baseline", 0), ("top", 1), ("top", 4), ("random", 1),
                                                        ("random", 4)}
    assert len(ce_calls) == len(measured) == judged.judged.sum()  # one plain-text pass per judged row, none elsewhere
    every = get("ablation")(cross_entropy_at="all", **kw).run(planted, harmful, harmless).table
    assert every.cross_entropy.notna().all()
    both = measured.merge(every, on=["selection", "seed", "k"], suffixes=("", "_all"))
    assert (both.cross_entropy - both.cross_entropy_all).abs().max() < 1e-5  # same hooks, same texts: same value
    with pytest.raises(ValueError, match="cross_entropy_at"):
        get("ablation")(cross_entropy_at="some")


def test_baseline_is_shared_across_runs_and_read_from_the_store(planted, planted_sets, monkeypatch):
    harmful, harmless = planted_sets
    store = ActivationStore(memory=True, disk=False)
    judged = _counting(monkeypatch, metrics, "judge_refusals")
    estimates = _counting(monkeypatch, ablation_module, "mean_patch_estimates")
    kw = dict(method="mean", random_seeds=1, max_new_tokens=2, n_text=4, rank_by="attribution", judge_at="none")
    shared: dict = {}
    runs = [get("ablation")(kind=kind, k_grid=grid, **kw).run(planted, harmful, harmless, store=store, shared=shared)
            for kind, grid in (("neuron", [1, 4]), ("head", [1, 2]))]
    assert len(estimates) == 1  # attribution estimates hold both kinds: computed once
    assert sum(k[0] == "baseline" for k in shared) == 1
    alone = get("ablation")(kind="head", k_grid=[1, 2], **kw).run(planted, harmful, harmless, store=store)
    pd.testing.assert_frame_equal(runs[1].table, alone.table)
    base = runs[0].table[runs[0].table.selection == "baseline"].iloc[0].drop("component")
    assert base.equals(runs[1].table[runs[1].table.selection == "baseline"].iloc[0].drop("component"))
    # the baseline read from the store's final residual equals a fresh forward pass
    eval_h = halve_split(harmful, 0)[1]
    assert base.refusal_score == pytest.approx(metrics.refusal_score(planted, eval_h).mean().item(), abs=1e-4)
    # a run with other settings does not reuse it
    get("ablation")(kind="head", k_grid=[1], **{**kw, "judge_at": "decisive"}).run(
        planted, harmful, harmless, store=store, shared=shared)
    assert sum(k[0] == "baseline" for k in shared) == 2 and len(judged) > 0


def test_shared_prefix_scoring_equals_plain_forward(planted, planted_sets):
    """Mean ablation treats every position alike: the shared-prefix last logits equal a plain forward."""
    harmful, harmless = planted_sets
    prompts = list(harmful)[:6] + list(harmless)[:6]
    comps = [Component("neuron", 2, 37), Component("neuron", 1, 3), Component("head", 1, 2)]
    hooks = ablation_hooks(planted, comps, "mean", reference=list(harmless))
    exp = get("ablation")(method="mean", batch_size=5)
    shared = exp._last_logits(planted, prompts, hooks)
    plain = planted.last_logits(prompts, fwd_hooks=hooks, batch_size=5)
    assert (shared - plain).abs().max() < 1e-4
