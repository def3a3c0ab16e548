"""refusal-direction: splits, candidates, selection rule, attribution identities, evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab import ActivationStore
from circuitlab import hooks as hk
from circuitlab import interventions as iv
from circuitlab.datasets import PromptSet
from circuitlab.direction_eval import bootstrap_ci, direction_components, evaluate_direction, select_candidate
from circuitlab.directions import unit
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


def test_selection_follows_paper_rule():
    t, rule = select_candidate(_candidates_table(), 0.1, 0.0, baseline_harmful=-1.3)
    assert t.selected.sum() == 1 and t.loc[t.selected, "layer"].item() == 2  # layer 1 fails KL, 4 is pruned
    assert "fallback" not in rule


def test_selection_falls_back_to_baseline_relative_induction():
    table = _candidates_table().assign(induce_score=[-1.0, -0.5, -2.0, np.nan, 1.0])
    t, rule = select_candidate(table, 0.1, 0.0, baseline_harmful=-1.3)
    assert t.loc[t.selected, "layer"].item() == 0 and "baseline" in rule  # -1.0 > -1.3, layer 2 fails
    t, rule = select_candidate(table, 0.01, 0.0, baseline_harmful=-1.3)
    assert t.loc[t.selected, "layer"].item() == 1 and "no candidate passed" in rule


def test_selection_keeps_kl_filter_when_nothing_induces_refusal():
    table = _candidates_table().assign(induce_score=[-5.0, -5.0, -5.0, np.nan, 1.0])
    t, rule = select_candidate(table, 0.1, 0.0, baseline_harmful=-1.3)
    assert t.loc[t.selected, "layer"].item() == 2 and "no candidate induced" in rule  # layer 1 fails KL


def test_filter_keeps_refused_harmful_and_answered_harmless(tiny, harmful, harmless):
    from circuitlab import metrics

    h_scores, s_scores = metrics.refusal_score(tiny, list(harmful)), metrics.refusal_score(tiny, list(harmless))
    threshold = float(torch.cat([h_scores, s_scores]).median())  # the random model needs a threshold that splits
    exp = RefusalDirection(progress=False, filter_threshold=threshold)
    kept = {}
    h, s = exp.filter_refused(tiny, harmful, harmless, kept, "train")
    assert list(h) == [p for p, x in zip(harmful, h_scores.tolist()) if x > threshold]
    assert list(s) == [p for p, x in zip(harmless, s_scores.tolist()) if x < threshold]
    assert kept["train_harmful_kept"] == f"{len(h)}/{len(harmful)}"
    with pytest.raises(ValueError, match="filter_train=False and filter_val=False"):
        RefusalDirection(progress=False, filter_threshold=1e9).filter_refused(tiny, harmful, harmless, {}, "val")


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
    assert set(result.tables) >= {"evaluation", "components"}
    assert set(result.figures) >= {"candidates", "tradeoff", "refusal_rates"}
    assert "selection_rule" in result.summary


@pytest.mark.slow
def test_embedded_direction_bypasses_and_induces_refusal(embedded):
    from conftest import HARMFUL, HARMLESS
    from circuitlab import metrics

    layer = 18  # its last-position candidate bypasses strongly (val score -2.97, results/arditi_2024/candidates.csv)
    name = hk.resid_pre(layer)
    mean = {k: embedded.run_with_cache(p[:6], [name], "last")[name][:, 0].mean(0)
            for k, p in (("harmful", HARMFUL), ("harmless", HARMLESS))}
    r = mean["harmful"] - mean["harmless"]
    test_harmful, test_harmless = HARMFUL[6:], HARMLESS[6:]
    base = metrics.refusal_score(embedded, test_harmful).mean()
    ablated = metrics.refusal_score(embedded, test_harmful, fwd_hooks=iv.directional_ablation_hooks(embedded, r)).mean()
    assert ablated < base - 0.5, (base, ablated)
    base_h = metrics.refusal_score(embedded, test_harmless).mean()
    added = metrics.refusal_score(embedded, test_harmless,
                                  fwd_hooks=iv.activation_addition_hooks(embedded, r, layer)).mean()
    assert added > base_h + 0.5, (base_h, added)
