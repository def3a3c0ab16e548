"""experiments/acdc_vs_eapig.py on the tiny model: the table's columns, both methods at the same edge
counts, the full graph's held-out faithfulness is 1, and a bad option exits 2 before a model loads."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("experiments/acdc_vs_eapig.py")


def test_tiny_run_measures_both_methods_at_the_same_edge_counts(script, tmp_path):
    table = script.main(["--model", "tiny", "--n", "32", "--n-discover", "3", "--n-heldout", "3",
                         "--warm-start", "16", "--taus", "1,0.03,1e-3", "--ig-steps", "2", "--out", str(tmp_path)])
    assert list(table.columns) == script.COLUMNS
    assert table.equals(pd.read_csv(tmp_path / "table.csv").astype(table.dtypes))
    full = table[table.method == "full"].iloc[0]
    assert abs(full.faithfulness_heldout - 1.0) < 1e-6  # no edge ablated: the clean run itself
    acdc, eap = table[table.method == "acdc"], table[table.method == "eap-ig"]
    assert sorted(acdc.tau) == [1e-3, 0.03, 1.0]
    assert set(acdc.n_edges) == set(eap.n_edges) and eap.n_edges.is_unique
    assert (acdc.n_edges <= 16).all() and (acdc.n_evals >= 1).all() and (acdc.seconds >= 0).all()
    assert (eap.n_effective <= eap.n_edges).all() and table.faithfulness_heldout.notna().all()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["complete"] and run["acdc"]["warm_start"] == 16 and not run["acdc"]["taus_skipped"]
    assert run["pairs"]["discover"] == 3 and run["pairs"]["heldout"] == 3
    assert run["matmul_peak_gflops_start"] > 0 and run["provenance"]["load_average_start"]
    assert {"eapig_scoring", "acdc_total", "total"} <= set(run["timings_s"])
    kept = pd.read_csv(tmp_path / "circuits.csv")
    assert kept.groupby("tau").size().reindex(acdc.tau, fill_value=0).tolist() == acdc.n_edges.tolist()
    assert (tmp_path / "faithfulness_vs_edges.png").is_file() or (acdc.n_edges == 0).all()


@pytest.mark.parametrize("argv", [["--warm-start", "0"], ["--criterion", "l2"], ["--taus", "1e-3,x"],
                                  ["--taus", "-1"], ["--taus", "0.1,0.1"], ["--n-heldout", "0"],
                                  ["--budget-min", "0"], ["--model", "./no/such/model"]])
def test_bad_option_exits_2_before_loading(script, monkeypatch, capsys, argv):
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(script, "load_model", fail)
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    assert ": error: " in capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one line


def test_acdc_does_not_expand_nodes_cut_off_from_the_logits():
    """At a huge tau every edge into the logits goes first; then no node reaches the logits, so no other
    edge is tried (the warm-started embedded run relies on this: its large taus cost a few forwards)."""
    from circuitlab import load_model
    from circuitlab.graph import ACDCSearch, EdgeGraph
    from circuitlab.models.planted import planted_prompts
    from circuitlab.methods.pairs import make_pairs

    model = load_model("tiny")
    graph = EdgeGraph.from_model(model)
    result = ACDCSearch(model, list(make_pairs(model, *planted_prompts(8, seed=0)))).run(1e9)
    assert not result.pruned.any()
    assert result.n_evals == 1 + int(graph.valid[:, -1].sum())  # the baseline, then each edge into the logits
