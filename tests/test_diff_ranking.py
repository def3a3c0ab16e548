"""diff-ranking: statistics against scipy, ranking on the planted circuit, store reuse."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.experiments import get
from circuitlab.methods.ranking import benjamini_hochberg, rank_units, unit_statistics
from circuitlab.models.planted import PLANTED_HEAD, PLANTED_NEURON


def test_statistics_match_scipy_and_handle_constant_units():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (12, 5)), rng.normal(0.0, 1.0, (9, 5))
    a[:, 3], b[:, 3] = 7.0, 7.0  # constant in both groups
    a[:, 4], b[:, 4] = 2.0, 1.0  # constant in both groups, different levels: still "constant"
    st = unit_statistics(a, b)
    for u in range(3):
        pooled = np.sqrt((11 * a[:, u].var(ddof=1) + 8 * b[:, u].var(ddof=1)) / 19)
        assert st["effect_size"][u] == pytest.approx((a[:, u].mean() - b[:, u].mean()) / pooled)
        assert st["p_value"][u] == pytest.approx(stats.ttest_ind(a[:, u], b[:, u], equal_var=False).pvalue)
    assert st["effect_size"][3:].tolist() == [0.0, 0.0] and st["p_value"][3:].tolist() == [1.0, 1.0]
    assert all(np.isfinite(v).all() for v in st.values())
    with pytest.raises(ValueError, match="at least 2"):
        unit_statistics(a[:1], b)


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(1).uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)
    assert benjamini_hochberg(np.array([])).size == 0


def test_ties_are_broken_deterministically():
    effect = np.array([1.0, -1.0, 1.0, 2.0])
    p = np.array([0.1, 0.1, 0.1, 0.5])
    ranks = rank_units(effect, p, layer=np.array([1, 0, 0, 3]), index=np.array([0, 5, 2, 1]))
    assert ranks.tolist() == [4, 3, 2, 1]  # |d| first, then p, then layer, then index


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_planted_neuron_and_head_rank_first(planted, planted_sets, positions, tmp_path):
    result = get("diff-ranking")(top_k=5, positions=positions).run(planted, *planted_sets,
                                                                   store=ActivationStore(tmp_path))
    table = result.table
    neurons, heads = table[table.component == "neuron"], table[table.component == "head"]
    top_n, top_h = neurons.iloc[0], heads.iloc[0]
    assert (top_n["layer"], top_n["neuron"], top_n["rank"]) == (*PLANTED_NEURON, 1)
    assert (top_h["layer"], top_h["head"], top_h["rank"]) == (*PLANTED_HEAD, 1)
    for top, rest in ((top_n, neurons.iloc[1:]), (top_h, heads.iloc[1:])):
        assert top["direction"] == "harmful_higher" and top["q_value"] < 0.01
        assert top["effect_size"] > 10 * rest["effect_size"].abs().max()  # nothing else carries it
    assert len(neurons) == len(heads) == 5 and list(neurons["rank"]) == [1, 2, 3, 4, 5]
    assert result.summary["top_neuron"] == "L{}N{}".format(*PLANTED_NEURON)


def test_reads_the_right_units_and_reuses_the_store(planted, planted_sets, tmp_path):
    store = ActivationStore(tmp_path)
    first = get("diff-ranking")(top_k=3).run(planted, *planted_sets, store=store)
    batches = store.forward_batches
    second = get("diff-ranking")(top_k=3).run(planted, *planted_sets, store=store)
    assert store.forward_batches == batches  # second run: no forward pass
    assert first.table.equals(second.table)
    layer, neuron = PLANTED_NEURON
    direct = planted.run_with_cache(list(planted_sets[0]), [hk.mlp_post(layer), hk.attn_z(PLANTED_HEAD[0])], "last")
    row = first.table[first.table.component == "neuron"].iloc[0]
    assert row["mean_harmful"] == pytest.approx(direct[hk.mlp_post(layer)][:, 0, neuron].mean().item(), rel=1e-5)
    head_norm = direct[hk.attn_z(PLANTED_HEAD[0])][:, 0, PLANTED_HEAD[1]].norm(dim=-1).mean().item()
    row = first.table[first.table.component == "head"].iloc[0]
    assert row["mean_harmful"] == pytest.approx(head_norm, rel=1e-5)


def test_tiny_model_table_shape_and_bad_input(tiny, harmful, harmless, tmp_path):
    result = get("diff-ranking")(top_k=4, heads=False).run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    assert set(result.table.component) == {"neuron"} and len(result.table) == 4
    assert result.table["q_value"].between(0, 1).all() and result.table["neuron"].notna().all()
    by_layer = result.tables["by_layer"]
    assert by_layer["n_units"].sum() == tiny.n_layers * tiny.d_mlp
    with pytest.raises(ValueError, match="positions"):
        get("diff-ranking")(positions="post").run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
