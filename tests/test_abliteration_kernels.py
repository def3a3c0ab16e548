"""Heretic 1.4.0's default kernels in circuitlab: projected directions (``orthogonalize_direction``) and
norm-preserving rows (``row_normalization="full"``) equal a direct computation of Heretic's formulas to
1e-5 and leave the model's other directions unchanged; the edits equal their hooks; the
``heretic-defaults`` family searches; an exported edited model loads and scores without re-application."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.experiments.abliteration_search import AbliterationSearch
from circuitlab.methods import abliteration as ab
from circuitlab.methods.direction_eval import last_logits_shared
from test_abliteration_search import assert_edits_equal_their_hooks


def _heretic_full(W: torch.Tensor, v: torch.Tensor, weight: float) -> torch.Tensor:
    """Heretic 1.4.0 model.abliterate, row_normalization FULL, written out (before its LoRA truncation)."""
    W_org = W
    norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
    W = F.normalize(W, p=2, dim=1)
    lora_A = (v @ W).view(1, -1)
    lora_B = (-weight * v).view(-1, 1)
    W = F.normalize(W + lora_B @ lora_A, p=2, dim=1) * norms
    return W_org + (W - W_org)


def test_norm_preserved_equals_heretics_formula_and_keeps_row_norms():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 80, generator=gen)
    v = F.normalize(torch.randn(48, generator=gen), dim=0)
    for weight in (0.3, 1.0, 1.4):
        edited = ab.norm_preserved(W, v, weight)
        assert torch.allclose(edited, _heretic_full(W, v, weight), atol=1e-5)
        assert torch.allclose(edited.norm(dim=1), W.norm(dim=1), atol=1e-5)  # every row keeps its norm
    assert torch.allclose(ab.norm_preserved(W, v, 0.0), W, atol=1e-6)


def test_norm_preserved_leaves_rows_outside_the_direction_unchanged():
    """Rows are residual coordinates: a coordinate the direction has no part in is not touched."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(32, 20, generator=gen)
    v = torch.zeros(32)
    v[:5] = torch.randn(5, generator=gen)
    v = v / v.norm()
    edited = ab.norm_preserved(W, v, 1.0)
    assert torch.allclose(edited[5:], W[5:], atol=1e-6)
    assert not torch.allclose(edited[:5], W[:5], atol=1e-3)


def test_plain_projection_leaves_every_orthogonal_direction_unchanged(tiny):
    """uᵀ W' = uᵀ W for every u ⟂ r̂: only the write along r̂ changes (attention and MLP writers)."""
    gen = torch.Generator().manual_seed(2)
    r = F.normalize(torch.randn(tiny.d_model, generator=gen), dim=0)
    u = torch.randn(3, tiny.d_model, generator=gen)
    u = u - (u @ r)[:, None] * r  # three directions orthogonal to r̂
    from circuitlab.core.weights import writer_weight

    before = [writer_weight(tiny, k, 1).detach().float().clone() for k in ("attn_out", "mlp_out")]
    with ab.abliterated(tiny, [ab.Edit(1, "attn_out", None, 1.0, r), ab.Edit(1, "mlp_out", None, 0.8, r)]):
        after = [writer_weight(tiny, k, 1).detach().float().clone() for k in ("attn_out", "mlp_out")]
    for b, a, w in zip(before, after, (1.0, 0.8)):
        assert torch.allclose(u @ a, u @ b, atol=1e-5)
        assert torch.allclose(r @ a, (1 - w) * (r @ b), atol=1e-5)


def test_projected_directions_equal_heretics_computation(tiny, harmful, harmless, tmp_path):
    store = ActivationStore(tmp_path)
    h, s = list(harmful), list(harmless)
    projected = ab.residual_directions(tiny, h, s, store=store, orthogonalize=True)
    names = [hk.resid_post(l) for l in range(tiny.n_layers)]
    bad = store.get(tiny, h, names, "last")
    good = store.get(tiny, s, names, "last")
    for l, n in enumerate(names):
        bad_mean, good_mean = bad[n][:, 0].float().mean(0), good[n][:, 0].float().mean(0)
        r = F.normalize(bad_mean - good_mean, p=2, dim=0)  # Heretic main.py, orthogonalize_direction
        g = F.normalize(good_mean, p=2, dim=0)
        expected = F.normalize(r - (r @ g) * g, p=2, dim=0)
        assert torch.allclose(projected[l], expected, atol=1e-5)
        assert abs(float(projected[l] @ g)) < 1e-5  # the harmless mean's direction is left alone
    plain = ab.residual_directions(tiny, h, s, store=store)
    assert torch.allclose(plain.norm(dim=1), projected.norm(dim=1), atol=1e-5)


def test_norm_preserving_edits_equal_their_hooks_and_restore(tiny):
    gen = torch.Generator().manual_seed(3)
    r, q = (F.normalize(torch.randn(tiny.d_model, generator=gen), dim=0) for _ in range(2))
    edits = [ab.Edit(0, "attn_out", None, 1.2, r, True), ab.Edit(1, "mlp_out", None, 0.9, q, True),
             ab.Edit(1, "head", 0, 1.0, q, True), ab.Edit(0, "neuron", 3, 0.7, r, True)]
    assert_edits_equal_their_hooks(tiny, edits)


def test_heretic_defaults_family_searches_and_differs_from_plain(tiny, harmful, harmless, tmp_path):
    store = ActivationStore(tmp_path)
    exp = AbliterationSearch(variants=["heretic", "heretic-defaults"], n_trials=3, n_startup_trials=2,
                             plaintext=None, progress=False, batch_size=8)
    (h_train, h_val, _), (s_train, s_val, _) = ([p.split(x, seed=0) for x in ("train", "val", "test")]
                                                for p in (harmful, harmless))
    trials = exp.search(tiny, h_train, s_train, h_val, s_val, store=store)
    assert set(trials.variant) == {"heretic", "heretic-defaults"} and len(trials) == 6
    variant, params = exp.params_[3]
    edits = exp.edits(tiny, variant, params)
    assert variant == "heretic-defaults" and all(e.norm_preserving for e in edits)
    assert not any(e.norm_preserving for e in exp.edits(tiny, "heretic", params))
    assert torch.allclose(exp.projected_.norm(dim=1), torch.ones(tiny.n_layers), atol=1e-5)


def test_exported_model_loads_and_scores_without_reapplication(tiny, harmful, harmless, tmp_path):
    """What scoring Heretic's exported model does: load the folder, score it as it is, against the
    base model's logits; it equals scoring the live edited model."""
    from circuitlab import load_model

    dirs = ab.residual_directions(tiny, list(harmful), list(harmless), store=ActivationStore(tmp_path),
                                  orthogonalize=True)
    params = ab.AbliterationParams(attn=ab.Kernel(1.3, 1.0, 0.5, 1.0), mlp=ab.Kernel(0.9, 0.6, 0.2, 1.0))
    edits = ab.heretic_edits(tiny, dirs, params, norm_preserving=True)
    h, s = list(harmful)[:4], list(harmless)[:4]
    base = last_logits_shared(tiny, s, batch_size=4)
    with ab.abliterated(tiny, edits):
        live = ab.score_model(tiny, h, s, base, batch_size=4)
    folder = ab.export_abliterated(tiny, edits, tmp_path / "export")
    loaded = load_model(str(folder))
    scores = ab.score_model(loaded, h, s, base, refusal_tokens=None, batch_size=4)
    assert abs(scores["refusal_score"] - live["refusal_score"]) < 1e-4
    assert abs(scores["kl"] - live["kl"]) < 1e-4 and live["kl"] > 0


def test_pareto_script_scores_a_heretic_export_as_it_is(tiny, tmp_path, monkeypatch):
    """experiments/abliteration_pareto.py --heretic-run: a (faked) finished Heretic-defaults search and the
    model its menu saved; the exported model, scored as it is, equals its trial re-applied in circuitlab."""
    import json

    import pandas as pd

    from circuitlab.io import datasets

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.syspath_prepend(str(root / "experiments"))
    import abliteration_pareto

    from bench.peers import heretic

    run = tmp_path / "heretic"
    files = heretic.write_prompts(run / "prompts", "advbench", "harmless", {"train": 6, "val": 4, "test": 4}, 0)
    h_train, s_train = (list(datasets.load(files[f"{k}_train"]["file"])) for k in ("harmful", "harmless"))
    row = {"trial": 1, "state": "COMPLETE", "refusals": 1, "kl": 0.05, "pareto": True,
           "direction_scope": "per layer", "direction_index": None}
    for comp, (top, pos) in {"attn.o_proj": (1.2, 1.0), "mlp.down_proj": (0.9, 0.6)}.items():
        row.update({f"{comp}.max_weight": top, f"{comp}.max_weight_position": pos, f"{comp}.min_weight": 0.3,
                    f"{comp}.min_weight_distance": 1.0})
    pd.DataFrame([row]).to_csv(run / "trials.csv", index=False)
    dirs = ab.residual_directions(tiny, h_train, s_train, store=ActivationStore(tmp_path / "s0"), batch_size=8,
                                  orthogonalize=True)
    edits = ab.heretic_edits(tiny, dirs, abliteration_pareto.heretic_params(row), norm_preserving=True)
    export = ab.export_abliterated(tiny, edits, tmp_path / "export")
    (run / "run.json").write_text(json.dumps({"prompts": files, "family": "Heretic's defaults", "n_trials": 1,
                                              "menu": {"saved": True, "export": str(export), "chosen": row}}))
    out = tmp_path / "out"
    summary = abliteration_pareto.main(
        ["--model", "tiny", "--variants", "heretic-defaults", "--trials", "2", "--startup-trials", "1",
         "--n-train", "6", "--n-val", "4", "--n-test", "4", "--n-text", "2", "--no-arditi", "--max-tokens", "2",
         "--batch-size", "8", "--heretic-run", str(run), "--heretic-reapply", "chosen", "--out", str(out),
         "--store", str(tmp_path / "store")], model=tiny)
    fronts = pd.read_csv(out / "fronts.csv")
    exported = fronts[fronts.variant == "heretic (exported)"].iloc[0]
    reapplied = fronts[fronts.variant == "heretic (re-applied)"].iloc[0]
    assert exported.test_kl > 0 and abs(exported.test_kl - reapplied.test_kl) < 1e-4
    assert abs(exported.test_refusal_score - reapplied.test_refusal_score) < 1e-4
    assert summary["heretic"]["family"] == "heretic defaults" and "matmul_peak_flops" in summary

    # The export lives outside the repository and may be gone: the rerun says so and scores the re-applied trial
    # (it crashed after the whole search before); a --heretic-export that does not exist fails before any work.
    import shutil

    shutil.rmtree(export)
    again = ["--model", "tiny", "--variants", "heretic-defaults", "--trials", "2", "--startup-trials", "1",
             "--n-train", "6", "--n-val", "4", "--n-test", "4", "--n-text", "2", "--no-arditi", "--max-tokens", "2",
             "--batch-size", "8", "--heretic-run", str(run), "--heretic-reapply", "chosen",
             "--store", str(tmp_path / "store")]
    abliteration_pareto.main(again + ["--out", str(tmp_path / "out2")], model=tiny)
    assert set(pd.read_csv(tmp_path / "out2" / "fronts.csv").variant) >= {"heretic (re-applied)"}
    assert "heretic (exported)" not in set(pd.read_csv(tmp_path / "out2" / "fronts.csv").variant)
    with pytest.raises(SystemExit) as stop:
        abliteration_pareto.main(again + ["--out", str(tmp_path / "out3"), "--heretic-export", str(export)], model=tiny)
    assert stop.value.code == 2 and not (tmp_path / "out3").exists()
