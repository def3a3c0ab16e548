"""The embedded model itself (slow: loads 0.5B parameters; CI runs it)."""

import time

import pytest

pytestmark = pytest.mark.slow


def test_embedded_loads_fast_when_cached_and_separates_refusal():
    from circuitlab.io import datasets
    from circuitlab import load_model
    from circuitlab.methods import metrics

    t0 = time.time()
    model = load_model("embedded")
    assert time.time() - t0 < 60  # README reports the measured time; this only guards regressions
    assert (model.n_layers, model.d_model, model.n_heads, model.d_mlp) == (24, 896, 14, 4864)
    assert model.n_post == 5
    harmful = datasets.load("advbench", split="val", n=8, seed=3)
    harmless = datasets.load("harmless", split="val", n=8, seed=3)
    h = metrics.refusal_score(model, list(harmful))
    b = metrics.refusal_score(model, list(harmless))
    assert h.mean() - b.mean() > 1.0  # measured gap on 32 + 32 prompts: see README
    judged = metrics.judge_refusals(model, list(harmful)[:4] + list(harmless)[:4], max_new_tokens=12)
    assert sum(judged[4:]) <= 1 and sum(judged[:4]) >= 2
