"""The embedded model itself, and every other test that needs it (slow: loads 0.5B parameters; CI runs it).

They share one file so that under ``make test``'s ``--dist loadfile`` one worker loads the model once (the
session fixture) and the other never needs it: no second conversion wait on a cold cache, 3 GB less memory.
"""

import threading

import pytest

from conftest import HARMFUL, HARMLESS

pytestmark = pytest.mark.slow


def test_embedded_loads_from_the_cache_and_separates_refusal(embedded, monkeypatch):
    from circuitlab.io import datasets
    from circuitlab import load_model
    from circuitlab.methods import metrics
    from circuitlab.models import embedded as embedded_module

    # the session fixture converted once where the cache was cold (the load time is a benchmark, not a test)
    def again(*args):
        raise AssertionError("a cached embedded model was converted again")
    monkeypatch.setattr(embedded_module, "_convert", again)
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


def test_conversion_parses_the_gguf_once(monkeypatch, tmp_path):
    """transformers makes a reader per from_pretrained (tokenizer, config, weights); inside the conversion they
    share one per file, and the library's own class is back afterwards."""
    import gguf

    from circuitlab.models import embedded

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((path, mode))
    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    with embedded._one_gguf_parse():
        first = gguf.GGUFReader(a)
        assert gguf.GGUFReader(str(a)) is first and gguf.GGUFReader(b) is not first
    assert made == [(a, "r"), (b, "r")] and gguf.GGUFReader is Reader


# ---- refusal direction (was in test_direction.py) -------------------------------------------------------

def test_embedded_direction_bypasses_and_induces_refusal(embedded):
    """A difference-in-means direction from 6 + 6 prompts, tested on 2 + 2 held-out ones: ablating it lowers
    the harmful refusal score, adding it raises the harmless one (measured: by 2.54 and 1.40, each prompt
    alone by at least 2.3 and 1.1; it was 2.61 and 1.34 on 4 + 4)."""
    from circuitlab.core import hooks as hk
    from circuitlab.methods import interventions as iv
    from circuitlab.methods import metrics

    layer = 18  # its last-position candidate bypasses strongly (val score -2.97, results/arditi_2024/candidates.csv)
    name = hk.resid_pre(layer)
    acts = embedded.run_with_cache(HARMFUL[:6] + HARMLESS[:6], [name], "last")[name][:, 0]  # one pass for both
    r = acts[:6].mean(0) - acts[6:].mean(0)
    test_harmful, test_harmless = HARMFUL[6:8], HARMLESS[6:8]
    base_all = metrics.refusal_score(embedded, test_harmful + test_harmless)
    base, base_h = base_all[:2].mean(), base_all[2:].mean()
    ablated = metrics.refusal_score(embedded, test_harmful, fwd_hooks=iv.directional_ablation_hooks(embedded, r)).mean()
    assert ablated < base - 0.5, (base, ablated)
    added = metrics.refusal_score(embedded, test_harmless,
                                  fwd_hooks=iv.activation_addition_hooks(embedded, r, layer)).mean()
    assert added > base_h + 0.5, (base_h, added)


# ---- greedy generation (was in test_generation.py) ------------------------------------------------------

def test_early_verdicts_equal_full_decoding_on_the_embedded_model(embedded):
    """5 prompts, 16 tokens: two refuse at once (token 3), one refuses late (token 13, so its row stops
    mid-run), two never do and run to the end (measured on these prompts; was 8 prompts, 24 tokens)."""
    from circuitlab.io.datasets import load
    from circuitlab.methods.metrics import is_refusal

    prompts = list(load("advbench", split="val", n=8, seed=3))[:5]
    full = embedded.generate(prompts, 16, batch_size=8)
    early = embedded.generate(prompts, 16, batch_size=8, stop_when=is_refusal)
    verdicts = [is_refusal(t) for t in full]
    assert any(verdicts) and not all(verdicts), "the check needs rows that stop early and rows that run to the end"
    assert [is_refusal(t) for t in early] == verdicts
    for e, f in zip(early, full):
        assert e == f if not is_refusal(e) else f.startswith(e)
