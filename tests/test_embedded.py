"""The embedded model itself (slow: loads 0.5B parameters; CI runs it)."""

import threading

import pytest

pytestmark = pytest.mark.slow


def test_embedded_loads_from_the_cache_and_separates_refusal(monkeypatch):
    from circuitlab.io import datasets
    from circuitlab import load_model
    from circuitlab.methods import metrics
    from circuitlab.models import embedded

    load_model("embedded")  # converts once where the cache is cold (the load time is a benchmark, not a test)

    def again(*args):
        raise AssertionError("a cached embedded model was converted again")
    monkeypatch.setattr(embedded, "_convert", again)
    model = load_model("embedded")
    assert (model.n_layers, model.d_model, model.n_heads, model.d_mlp) == (24, 896, 14, 4864)
    assert model.n_post == 5
    harmful = datasets.load("advbench", split="val", n=8, seed=3)
    harmless = datasets.load("harmless", split="val", n=8, seed=3)
    h = metrics.refusal_score(model, list(harmful))
    b = metrics.refusal_score(model, list(harmless))
    assert h.mean() - b.mean() > 1.0  # measured gap on 32 + 32 prompts: see README
    judged = metrics.judge_refusals(model, list(harmful)[:4] + list(harmless)[:4], max_new_tokens=12)
    assert sum(judged[4:]) <= 1 and sum(judged[:4]) >= 2


def test_concurrent_first_uses_convert_once(tmp_path, monkeypatch):
    """Two processes (here threads, each with its own lock handle) asking for a cold embedded model: one
    converts, the other waits for it and reads the result."""
    from circuitlab.models import embedded

    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    calls = []

    def convert(gguf_dir, out_dir):
        calls.append(out_dir)
        threading.Event().wait(0.5)  # long enough for the second caller to arrive while this one converts
        for name in ("model.safetensors", "config.json"):
            (out_dir / name).write_text("x")
    monkeypatch.setattr(embedded, "_assemble_gguf", lambda path: path.write_bytes(b""))
    monkeypatch.setattr(embedded, "_convert", convert)
    found = []
    threads = [threading.Thread(target=lambda: found.append(embedded.embedded_model_dir(progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(found) == 2 and found[0] == found[1] and (found[0] / "config.json").is_file()
