"""bench/gpu.py runs end to end (tiny shape, CPU): every phase timed, engine equals TransformerLens."""

import json

import pandas as pd

from conftest import load_script


def test_gpu_bench_tiny_on_cpu(tmp_path):
    bench = load_script("bench/gpu.py")
    csv = bench.main(["--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), "--reps", "1"])
    assert csv == tmp_path / "gpu_cpu.csv"
    table = pd.read_csv(csv)
    assert set(table.phase) == {"build", "forward", "patching", "generate", "edges"}
    assert set(table[table.phase == "patching"].method) == {"circuitlab", "transformer_lens"}
    ours = table[(table.phase == "patching") & (table.method == "circuitlab")].iloc[0]
    assert ours.max_abs_diff < 1e-4 and ours.metric_spread > 0
    assert (table.loc[table.phase != "build", "wall_s"] > 0).all()
    assert 0 < table[table.phase == "generate"].tokens.iloc[0] <= 4 * 8
    meta = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert meta["shape"]["n_layers"] == 4 and "torch" in meta and len(meta["load_average"]) == 3
