"""circuit-map on the planted-circuit model: it must recover the planted head and neuron, with stages;
screening and verification use disjoint prompts."""

import pytest

from circuitlab import ActivationStore, load_model
from circuitlab.experiments import circuit_map, get
from circuitlab.experiments.circuit_map import CircuitMap, assign_stage, split_halves
from circuitlab.planted import FEATURE_LAYER, PLANTED_HEAD, PLANTED_NEURON, planted_prompts


@pytest.fixture(scope="module")
def planted_map():
    model = load_model("planted")
    harmful, harmless = planted_prompts(32)  # 16 per half
    return get("circuit-map")(n_neurons=5, n_heads=4).run(model, harmful, harmless)


def _row(table, kind, layer, index):
    col = "neuron" if kind == "neuron" else "head"
    match = table[(table.component == kind) & (table.layer == layer) & (table[col] == index)]
    assert len(match) == 1, f"{kind} {layer}.{index} is not among the candidates"
    return match.iloc[0]


def test_recovers_planted_head_as_detection(planted_map):
    head = _row(planted_map.table, "head", *PLANTED_HEAD)
    assert head.verified and head.stage == "detection"
    assert head.patch_effect > 0.9 and head.content_read > 0.9  # it reads the keyword, not the template


def test_recovers_planted_neuron_as_production(planted_map):
    neuron = _row(planted_map.table, "neuron", *PLANTED_NEURON)
    assert neuron.verified and neuron.stage == "production"
    assert neuron.logit_attribution > 0.9 and neuron.content_read == 0


def test_every_stage_of_the_planted_circuit_is_filled(planted_map):
    t, s = planted_map.table, planted_map.summary
    assert set(t[t.verified].stage) == {"detection", "production"}  # the planted circuit's two roles
    assert s["verified_detection"] == 1 and s["verified_production"] == 1
    # the direction is chosen on validation prompts: the only layer where the twins differ at the end
    assert s["direction_layer"] == FEATURE_LAYER and "validation" in s["direction_source"]


def test_nothing_else_is_verified(planted_map):
    t = planted_map.table
    verified = {(r.component, r.layer, r.head if r.component == "head" else r.neuron)
                for r in t[t.verified].itertuples()}
    assert verified == {("head", *PLANTED_HEAD), ("neuron", *PLANTED_NEURON)}
    assert planted_map.summary["first_readable_layer"] == FEATURE_LAYER


def test_screen_and_verify_use_disjoint_prompts(tiny, harmful, harmless, tmp_path, monkeypatch):
    screen, verify = split_halves(harmful, 0)
    assert not set(screen) & set(verify) and sorted(list(screen) + list(verify)) == sorted(harmful)
    seen = {"screen": set(), "verify": set()}
    atp, patch = circuit_map.mean_patch_estimates, CircuitMap._patch_effects
    monkeypatch.setattr(circuit_map, "mean_patch_estimates",
                        lambda model, prompts, *a, **kw: seen["screen"].update(prompts) or atp(model, prompts, *a, **kw))
    monkeypatch.setattr(CircuitMap, "_patch_effects", lambda self, model, comps, h, s, store: seen["verify"].update(
        h + s) or patch(self, model, comps, h, s, store))
    exp = CircuitMap(n_neurons=3, n_heads=2, n_atp_neurons=2, n_atp_heads=1, n_verify=4, probe_threshold=0.6)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    assert seen["screen"] and seen["verify"] and not seen["screen"] & seen["verify"]
    assert seen["screen"] <= set(screen) and seen["verify"] <= set(verify) | set(split_halves(harmless, 0)[1])
    assert set(result.table.stage) <= {"detection", "evaluation", "decision", "production"}


def test_stage_rule_order():
    assert assign_stage(direction_frac=0.9, logit_frac=0.5, content_read=0.9, tau=0.1, read_threshold=0.5) == "production"
    assert assign_stage(0.9, 0.0, 0.8, 0.1, 0.5) == "detection"  # the content reader, even if it writes the direction
    assert assign_stage(0.5, 0.0, 0.2, 0.1, 0.5) == "decision"
    assert assign_stage(0.01, 0.01, 0.2, 0.1, 0.5) == "evaluation"
    assert assign_stage(0.0, 0.9, 0.0, 0.1, 0.5) == "production"  # by what it writes, at any depth


def test_figure_and_tables(planted_map, tmp_path):
    out = planted_map.save(tmp_path / "run")
    assert (out / "circuit.png").is_file() and (out / "layers.csv").is_file()
