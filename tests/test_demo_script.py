"""The demo script's text summary renders from real experiment summaries, and its profiler runs (planted, fast)."""

import time

import pandas as pd
import pytest

from circuitlab import load_model
from circuitlab.methods import metrics
from circuitlab.experiments import get
from circuitlab.models.planted import planted_prompts
from circuitlab.io.results import OutputError

from conftest import load_script


def _script():
    return load_script("experiments/refusal_circuit.py")


def test_render_summary_from_planted_runs():
    model = load_model("planted")
    harmful, harmless = planted_prompts(8)
    circuit = get("circuit-map")(n_neurons=3, n_heads=2, n_verify=4).run(model, harmful, harmless)
    fragility = {f"fragility_{kind}": get("ablation")(kind=kind, k_grid=[1, 2], random_seeds=1, max_new_tokens=2,
                                                      n_text=2, method="zero")
                 .run(model, harmful, harmless).summary for kind in ("neuron", "head")}
    text = _script().render({"circuit": circuit.summary, "fragility": fragility, "n_per_set": 8, "seconds": 1})
    assert "verified components: 2" in text
    assert "1 neurons: top-k" in text and "heads needed to halve refusal" in text
    assert "judged refusal" in text and "refusal-token probability" in text


def test_render_reads_old_judge_everywhere_summaries():
    old = {"measure": "refusal_rate", "baseline_refusal_rate": 0.56, "top10_refusal_rate": 0.28,
           "random10_refusal_rate": 0.56, "top10_kl_harmless": 0.2, "k_to_halve_refusal": 10}
    circuit = {"first_readable_layer": 1, "direction_layer": 2, "n_candidates": 4, "n_verified": 2,
               **{f"verified_{s}": 0 for s in ("detection", "evaluation", "decision", "production")}}
    text = _script().render({"circuit": circuit, "fragility": {"fragility_neuron": old, "fragility_head": old},
                             "n_per_set": 64, "seconds": 1})
    assert "10 neurons: top-k 0.280 vs random-k 0.560" in text


def test_profiler_counts_nested_calls_once():
    prof = load_script("bench/demo_profile.py").Profiler()

    def inner():
        time.sleep(0.05)

    timed_inner = prof.timed(inner, "kl")

    def outer():
        time.sleep(0.05)
        timed_inner()
        timed_inner()

    with prof.phase("p"):
        prof.timed(outer, "cross-entropy")()
        prof.timed(inner, "generation prefill")()  # outside decoding: stays with its caller's kind
    table = prof.table(wall=0.2).set_index(["phase", "kind"])
    assert 0.1 <= table.loc[("p", "kl"), "seconds"] < 0.14 and table.loc[("p", "kl"), "calls"] == 2
    assert 0.05 <= table.loc[("p", "cross-entropy"), "seconds"] < 0.09
    assert ("p", "generation prefill") not in table.index and 0.05 <= table.loc[("p", "other"), "seconds"] < 0.09


DEMO_ARGS = ["--model", "planted", "--quick", "--n", "8", "--compare-effect-size"]


@pytest.fixture(scope="module")
def profiled_demo(tmp_path_factory):
    """One profiled demo run (planted, quick): the profile test reads its table, the rerun test reruns the demo
    into its folder (the profiler runs the demo's own main, so this is the demo's first run there)."""
    root = tmp_path_factory.mktemp("profiled_demo")
    bench = load_script("bench/demo_profile.py")
    original = metrics.kl_divergence
    table = bench.main(["--out", str(root / "profile.csv"), "--results", str(root / "demo"), *DEMO_ARGS])
    return root, table, original


def test_demo_profile_smoke_on_planted(profiled_demo):
    tmp_path, table, original = profiled_demo
    assert metrics.kl_divergence is original  # the wrappers are removed afterwards
    csv = pd.read_csv(tmp_path / "profile.csv")
    assert list(csv.columns) == ["phase", "kind", "seconds", "calls"] and len(csv) == len(table)
    assert {"load", "circuit map", "fragility baseline", "fragility_neuron", "fragility_head",
            "fragility_neuron_effect_size"} <= set(csv.phase)
    assert {"activations", "patching", "last_logits", "generation prefill", "generation decode", "kl",
            "cross-entropy", "other"} <= set(csv.kind)
    parts = csv[(csv.phase != "ALL") & (csv.kind != "ALL")]
    wall = csv[(csv.phase == "ALL") & (csv.kind == "ALL")].seconds.item()
    assert abs(parts.seconds.sum() - wall) < 0.05 * wall + 0.1  # exclusive: the parts add up to the wall time
    summary = (tmp_path / "demo" / "summary.json").read_text()
    assert '"model": "planted"' in summary
    assert (tmp_path / "profile.json").is_file()


def test_demo_runs_twice_into_the_same_folder(profiled_demo, tmp_path):
    """`make demo` twice: the second run replaces its own earlier run folders; a stranger's folder fails first.
    The first run is the profiled one (the same demo main, same arguments), so the demo runs once more here."""
    demo = _script()
    first = profiled_demo[0] / "demo"
    assert (first / "circuit" / "config.json").is_file()
    second = demo.main([*DEMO_ARGS, "--out", str(first)])
    assert second["n_per_set"] == 8 and (first / "circuit" / "config.json").is_file()
    (tmp_path / "mine" / "circuit").mkdir(parents=True)
    (tmp_path / "mine" / "circuit" / "notes.txt").write_text("a user's file")
    started = time.time()
    with pytest.raises(OutputError):  # before any model is loaded
        demo.main(["--model", "planted", "--quick", "--n", "8", "--out", str(tmp_path / "mine")])
    assert time.time() - started < 5 and (tmp_path / "mine" / "circuit" / "notes.txt").read_text() == "a user's file"
