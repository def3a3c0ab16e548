"""probing: the probe finds the planted feature exactly where it arrives; CV and control are honest."""

from __future__ import annotations

import numpy as np
import pytest

from circuitlab import ActivationStore
from circuitlab.experiments import get
from circuitlab.experiments.probing import parse_positions
from circuitlab.methods.probes import cross_validated_probe
from circuitlab.models.planted import FEATURE_LAYER, PLANTED_HEAD


def test_probe_on_separable_and_on_random_data():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30, dtype=int), np.zeros(30, dtype=int)]
    X = rng.normal(size=(60, 8))
    separable = X.copy()
    separable[:, 0] += 10 * y
    good = cross_validated_probe(separable, y)
    assert good["accuracy_mean"] == 1.0 and good["auroc_mean"] == 1.0 and good["control_accuracy"] < 0.8
    assert (good["n_train"], good["n_test"]) == (48, 12)
    noise = cross_validated_probe(X, y, control_repeats=3)
    assert 0.25 < noise["accuracy_mean"] < 0.75 and 0.25 < noise["control_accuracy"] < 0.75


def test_accuracy_is_chance_before_the_feature_layer_and_high_from_it(planted, planted_sets, tmp_path):
    result = get("probing")(paired=True).run(planted, *planted_sets, store=ActivationStore(tmp_path))
    table = result.table
    resid = table[table.component == "resid_pre"]
    assert sorted(set(resid.position)) == list(range(-planted.n_post, 0))
    before, after = resid[resid.layer < FEATURE_LAYER], resid[resid.layer >= FEATURE_LAYER]
    assert before["accuracy_mean"].max() <= 0.6 and before["auroc_mean"].max() <= 0.6
    assert after["accuracy_mean"].min() >= 0.95 and (after["accuracy_mean"] > after["control_accuracy"] + 0.2).all()
    heads = table[table.component == "head"]
    best = heads.iloc[0]
    assert (best["layer"], best["head"], best["accuracy_mean"]) == (*PLANTED_HEAD, 1.0)
    others = heads[(heads["layer"] != PLANTED_HEAD[0]) | (heads["head"] != PLANTED_HEAD[1])]
    assert others["accuracy_mean"].max() <= 0.6
    assert result.summary["first_layer_accuracy_ge_0.9"] == FEATURE_LAYER
    assert set(result.figures) == {"resid_layer_position", "head_layer_head"}


def test_second_run_does_no_forward_pass(planted, planted_sets, tmp_path):
    store = ActivationStore(tmp_path)
    first = get("probing")(positions="last", heads=False).run(planted, *planted_sets, store=store)
    batches = store.forward_batches
    second = get("probing")(positions="last", heads=False).run(planted, *planted_sets, store=store)
    assert store.forward_batches == batches
    assert first.table.equals(second.table)
    assert first.table.iloc[0]["layer"] == FEATURE_LAYER


def test_few_prompts_lower_the_fold_count(tiny, harmful, harmless, tmp_path):
    result = get("probing")(positions="last", heads=False).run(tiny, harmful[:3], harmless[:3],
                                                               store=ActivationStore(tmp_path))
    assert result.summary["n_splits"] == 3
    assert (result.table["n_test"] == 2).all() and (result.table["n_train"] == 4).all()
    assert result.table["auroc_mean"].between(0, 1).all()


def test_bad_input_is_refused(tiny, harmful, harmless, tmp_path):
    store = ActivationStore(tmp_path)
    with pytest.raises(ValueError, match="head_position"):
        get("probing")(positions="last", head_position=-3).run(tiny, harmful, harmless, store=store)
    with pytest.raises(ValueError, match="paired"):
        get("probing")(paired=True).run(tiny, harmful, harmless[:5], store=store)
    with pytest.raises(ValueError, match="at least 2"):
        get("probing")().run(tiny, harmful[:1], harmless, store=store)
    assert parse_positions("-3,-1") == [-3, -1] and parse_positions("post") == "post"
    with pytest.raises(ValueError, match="positions"):
        parse_positions("first")
