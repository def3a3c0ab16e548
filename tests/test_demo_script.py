"""The demo script's text summary renders from real experiment summaries (planted model, fast)."""

import importlib.util
from pathlib import Path

from circuitlab import load_model
from circuitlab.experiments import get
from circuitlab.planted import planted_prompts


def _script():
    path = Path(__file__).resolve().parent.parent / "experiments" / "refusal_circuit.py"
    spec = importlib.util.spec_from_file_location("refusal_circuit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_summary_from_planted_runs():
    model = load_model("planted")
    harmful, harmless = planted_prompts(8)
    circuit = get("circuit-map")(n_neurons=3, n_heads=2, n_verify=4).run(model, harmful, harmless)
    fragility = {f"fragility_{kind}": get("ablation")(kind=kind, k_grid=[1, 2], random_seeds=1, judge=False,
                                       judge_harmless=False, n_text=2, method="zero")
                 .run(model, harmful, harmless).summary for kind in ("neuron", "head")}
    text = _script().render({"circuit": circuit.summary, "fragility": fragility, "n_per_set": 8, "seconds": 1})
    assert "verified components: 2" in text
    assert "1 neurons: top-k" in text and "heads needed to halve refusal" in text
