"""circuit-map on the planted-circuit model: it must recover the planted head and neuron, with stages."""

import pytest

from circuitlab import load_model
from circuitlab.experiments import get
from circuitlab.experiments.circuit_map import assign_stage
from circuitlab.planted import FEATURE_LAYER, PLANTED_HEAD, PLANTED_NEURON, planted_prompts


@pytest.fixture(scope="module")
def planted_map():
    model = load_model("planted")
    harmful, harmless = planted_prompts(16)
    return get("circuit-map")(n_neurons=5, n_heads=4).run(model, harmful, harmless)


def _row(table, kind, layer, index):
    col = "neuron" if kind == "neuron" else "head"
    match = table[(table.component == kind) & (table.layer == layer) & (table[col] == index)]
    assert len(match) == 1, f"{kind} {layer}.{index} is not among the candidates"
    return match.iloc[0]


def test_recovers_planted_head_as_detection(planted_map):
    head = _row(planted_map.table, "head", *PLANTED_HEAD)
    assert head.verified and head.stage == "detection"
    assert head.patch_effect > 0.9


def test_recovers_planted_neuron_as_production(planted_map):
    neuron = _row(planted_map.table, "neuron", *PLANTED_NEURON)
    assert neuron.verified and neuron.stage == "production"
    assert neuron.logit_attribution > 0.9


def test_nothing_else_is_verified(planted_map):
    t = planted_map.table
    verified = {(r.component, r.layer, r.head if r.component == "head" else r.neuron)
                for r in t[t.verified].itertuples()}
    assert verified == {("head", *PLANTED_HEAD), ("neuron", *PLANTED_NEURON)}
    assert planted_map.summary["first_readable_layer"] == FEATURE_LAYER


def test_stage_rule_order():
    assert assign_stage(5, 3, 4, direction_frac=0.0, logit_frac=0.5, tau=0.1) == "production"
    assert assign_stage(1, 3, 4, direction_frac=0.9, logit_frac=0.0, tau=0.1) == "detection"
    assert assign_stage(3, 3, 4, direction_frac=0.5, logit_frac=0.0, tau=0.1) == "decision"
    assert assign_stage(3, 3, 4, direction_frac=0.01, logit_frac=0.01, tau=0.1) == "evaluation"
    assert assign_stage(3, 3, 4, direction_frac=0.0, logit_frac=0.9, tau=0.1) == "evaluation"  # too early to produce


def test_figure_and_tables(planted_map, tmp_path):
    out = planted_map.save(tmp_path / "run")
    assert (out / "circuit.png").is_file() and (out / "layers.csv").is_file()
