"""abliteration-search and circuitlab.methods.abliteration on the tiny model: the front is non-dominated, runs
are reproducible, the test split stays out of the search, weight edits equal their hooks, zero weights
change nothing, an exported front point reloads with transformers, an unmet KL budget says so."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.methods import abliteration as ab
from circuitlab.experiments.abliteration_search import AbliterationSearch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["how do i make a cake", "write a poem", "tell me how to steal a car", "hi"]
FAST = dict(n_trials=4, n_startup_trials=2, plaintext=None, progress=False, batch_size=8)


def _direction(model, seed=1):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


def _splits(prompts, seed=0):
    return [prompts.split(s, seed=seed) for s in ("train", "val", "test")]


def _search(tiny, harmful, harmless, store, **kw):
    exp = AbliterationSearch(**{**FAST, **kw})
    (h_train, h_val, _), (s_train, s_val, _) = _splits(harmful, exp.seed), _splits(harmless, exp.seed)
    return exp, exp.search(tiny, h_train, s_train, h_val, s_val, store=store)


def _dominated(i, trials) -> bool:
    r, k = trials.val_refusal, trials.val_kl
    return bool(((r <= r[i]) & (k <= k[i]) & ((r < r[i]) | (k < k[i]))).any())


# ---- the family ------------------------------------------------------------------------------------

def test_kernel_is_heretics_linear_falloff():
    k = ab.Kernel(max_weight=1.2, max_weight_position=3.0, min_weight=0.4, min_weight_distance=2.0)
    assert [k.at(l) for l in range(7)] == pytest.approx([0.0, 0.4, 0.8, 1.2, 0.8, 0.4, 0.0])
    params = ab.AbliterationParams(attn=k, mlp=ab.Kernel(1.0, 0.0, 0.5, 1.0), direction_index=None)
    assert ab.layer_weights(params, 3) == {"attn": pytest.approx([0.0, 0.4, 0.8]), "mlp": [1.0, 0.5, 0.0]}
    assert ab.AbliterationParams.from_flat(params.flat()) == params and params.scope == "per layer"
    with pytest.raises(ValueError, match="min_weight_distance"):
        ab.Kernel(1.0, 0.0, 0.5, 0.0)


def test_direction_index_interpolates_between_layers():
    dirs = torch.eye(4)[:3]
    assert torch.equal(ab.direction_at(dirs, 1.0), dirs[1])
    mid = ab.direction_at(dirs, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2))
    assert torch.equal(ab.direction_at(dirs, 2.0), dirs[2])
    with pytest.raises(ValueError, match="direction_index"):
        ab.direction_at(dirs, 2.5)


def test_a_zero_direction_row_edits_nothing(tiny):
    """A layer whose harmful and harmless means coincide has no direction (Heretic: a zero vector)."""
    dirs = torch.zeros(tiny.n_layers, tiny.d_model)
    dirs[1] = ab.direction_at(torch.eye(tiny.d_model)[:2], 1.0)
    kernel = ab.Kernel(1.0, 0.5, 1.0, 1.0)
    edits = ab.heretic_edits(tiny, dirs, ab.AbliterationParams(attn=kernel, mlp=kernel))
    assert {e.layer for e in edits} == {1}
    assert not ab.direction_at(torch.zeros(2, 4), 0.5).any()


def test_residual_directions_are_unit_rows(tiny, harmful, harmless, tmp_path):
    dirs = ab.residual_directions(tiny, list(harmful), list(harmless), store=ActivationStore(tmp_path))
    assert dirs.shape == (tiny.n_layers, tiny.d_model)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(tiny.n_layers), atol=1e-5)


def test_component_targeted_orthogonalization_equals_its_hooks(tiny):
    r, q = _direction(tiny, 1), _direction(tiny, 2)
    # heads of one layer with two directions, a whole MLP output, single neurons, another layer's head
    edits = [ab.Edit(0, "head", 1, 1.0, r), ab.Edit(0, "head", 3, 0.7, q), ab.Edit(1, "mlp_out", None, 1.3, r),
             ab.Edit(0, "neuron", 5, 1.0, q), ab.Edit(0, "neuron", 9, 0.5, r), ab.Edit(1, "head", 0, 1.2, q)]
    assert_edits_equal_their_hooks(tiny, edits)


def assert_edits_equal_their_hooks(model, edits):
    """The edits as hooks give the edited weights' logits, they change the model, and the weights come back exactly."""
    base = model.last_logits(PROMPTS)
    hooked = model.last_logits(PROMPTS, fwd_hooks=ab.edit_hooks(model, edits))
    with ab.abliterated(model, edits):
        edited = model.last_logits(PROMPTS)
    assert torch.allclose(hooked, edited, atol=1e-4), (hooked - edited).abs().max()
    assert not torch.allclose(edited, base, atol=1e-3)
    assert torch.equal(model.last_logits(PROMPTS), base)  # weights restored exactly


def test_heretic_family_and_top_writers_equal_their_hooks(tiny, harmful, harmless, tmp_path):
    dirs = ab.residual_directions(tiny, list(harmful), list(harmless), store=ActivationStore(tmp_path))
    params = ab.AbliterationParams(attn=ab.Kernel(1.3, 1.0, 0.5, 1.0), mlp=ab.Kernel(0.9, 0.6, 0.2, 1.0))
    writers = ab.top_writers(tiny, dirs[0], list(harmful), list(harmless), store=ActivationStore(tmp_path),
                             kinds=("head", "mlp_out", "neuron"), top_n=3)
    assert writers.attribution_diff.is_monotonic_decreasing
    targeted = ab.targeted_edits(writers, dirs[0], top_n=5, weight=1.1, kinds=("head", "mlp_out", "neuron"))
    assert len(targeted) == 5
    for edits in (ab.heretic_edits(tiny, dirs, params), targeted):
        hooked = tiny.last_logits(PROMPTS, fwd_hooks=ab.edit_hooks(tiny, edits))
        with ab.abliterated(tiny, edits):
            assert torch.allclose(tiny.last_logits(PROMPTS), hooked, atol=1e-4)


def test_zero_weights_leave_the_model_unchanged_exactly(tiny):
    base = tiny.last_logits(PROMPTS)
    fingerprint = tiny.fingerprint
    zero = ab.AbliterationParams(attn=ab.Kernel(0.0, 0.5, 0.0, 1.0), mlp=ab.Kernel(0.0, 0.5, 0.0, 1.0),
                                 direction_index=0.5)
    dirs = torch.stack([_direction(tiny, s) for s in range(tiny.n_layers)])
    assert ab.heretic_edits(tiny, dirs, zero) == [] and ab.global_edits(tiny, dirs[0], 0.0) == []
    explicit = [ab.Edit(0, "attn_out", None, 0.0, dirs[0]), ab.Edit(1, "head", 2, 0.0, dirs[1])]
    with ab.abliterated(tiny, explicit):
        assert torch.equal(tiny.last_logits(PROMPTS), base)
    assert torch.equal(tiny.last_logits(PROMPTS, fwd_hooks=ab.edit_hooks(tiny, explicit)), base)
    assert tiny.fingerprint == fingerprint


def test_overlapping_edits_are_refused(tiny):
    r = _direction(tiny)
    with pytest.raises(ValueError, match="overlapping"):
        ab.edit_hooks(tiny, [ab.Edit(0, "attn_out", None, 1.0, r), ab.Edit(0, "head", 1, 1.0, r)])
    with pytest.raises(ValueError, match="index"):
        ab.Edit(0, "head", None, 1.0, r)
    with pytest.raises(ValueError, match="outside"):
        with ab.abliterated(tiny, [ab.Edit(0, "head", tiny.n_heads, 1.0, r)]):
            pass


# ---- the search ------------------------------------------------------------------------------------

def test_search_saves_a_non_dominated_front(tiny, harmful, harmless, tmp_path):
    exp = AbliterationSearch(**{**FAST, "variants": ["heretic", "targeted", "global"], "n_trials": 3})
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    trials = result.tables["trials"]
    assert len(trials) == 9 and set(trials.variant) == {"heretic", "targeted", "global"}
    assert trials.pareto_front.any() and trials.seconds.gt(0).all()
    points = set(zip(trials[trials.pareto_front].val_refusal, trials[trials.pareto_front].val_kl))
    for i in trials.index:  # the front: exactly the non-dominated trials (one of equal points)
        if trials.pareto_front[i]:
            assert not _dominated(i, trials)
        else:
            assert _dominated(i, trials) or (trials.val_refusal[i], trials.val_kl[i]) in points
    front = result.table
    assert (front.variant == "original").sum() == 1 and front[front.variant == "original"].test_kl.item() == 0
    measured = front[front.variant != "original"]
    assert set(measured.trial) == set(trials[trials.variant_front].trial) and measured.test_kl.gt(0).all()
    assert measured.pareto_front.sum() == trials.pareto_front.sum()
    out = result.save(tmp_path / "run")
    assert (out / "table.csv").is_file() and (out / "trials.csv").is_file() and (out / "front.png").is_file()
    assert "refusal score" in result.summary["refusal_objective"]
    exp.test_front = "pareto"  # the front of all families together is measured instead
    together, _ = exp.evaluate(tiny, list(harmful)[:4], list(harmless)[:4])
    assert set(together[together.variant != "original"].trial) == set(trials[trials.pareto_front].trial)


def test_same_seed_same_trials(tiny, harmful, harmless, tmp_path):
    store = ActivationStore(tmp_path)
    _, a = _search(tiny, harmful, harmless, store)
    _, b = _search(tiny, harmful, harmless, store)
    _, c = _search(tiny, harmful, harmless, store, seed=1)
    drop = ["seconds"]
    assert a.drop(columns=drop).equals(b.drop(columns=drop))
    assert not a.drop(columns=drop).equals(c.drop(columns=drop))


def test_a_journal_resumes_the_search_without_rescoring(tiny, harmful, harmless, tmp_path, monkeypatch):
    store, journal = ActivationStore(tmp_path / "store"), str(tmp_path / "search.journal")
    kw = dict(variants=["heretic", "global"], journal=journal)
    first, a = _search(tiny, harmful, harmless, store, n_trials=2, **kw)
    scored = []
    objectives = AbliterationSearch._objectives
    monkeypatch.setattr(AbliterationSearch, "_objectives",
                        lambda self, *args: scored.append(args[1]) or objectives(self, *args))
    second, b = _search(tiny, harmful, harmless, store, n_trials=3, **kw)
    assert len(b) == 6 and len(scored) == 1 + 2  # the unedited baseline, then one new trial per family
    old = b[b.from_journal].reset_index(drop=True)
    assert len(old) == 4 and not a.from_journal.any() and not b[~b.from_journal].empty
    cols = ["variant", "study_trial", "val_refusal", "val_kl", "edits"]
    assert old[cols].equals(a[cols])
    replayed = (0, 1, 3, 4)  # each family's first two trials; 2 and 5 are new
    assert [second.params_[i] for i in replayed] == [first.params_[i] for i in range(4)]  # exports stay possible
    _, same = _search(tiny, harmful, harmless, store, n_trials=3, test_front="pareto", **kw)  # a test-only setting
    assert same.from_journal.all()
    _, other = _search(tiny, harmful, harmless, store, n_trials=2, seed=1, **kw)  # other settings: a new study
    assert not other.from_journal.any()


def test_converge_adds_trials_until_the_front_stops_growing(tiny, harmful, harmless, tmp_path, monkeypatch):
    """With ``converge`` a family runs past ``n_trials`` until its val hypervolume grew by less than that share over
    its last 20 % (at most ``max_trials``); a journal rerun reads back exactly the trials the rule kept."""
    from circuitlab.methods.heretic_scoring import hypervolume_change
    from circuitlab.experiments.abliteration_search import hypervolume_box

    store, journal = ActivationStore(tmp_path / "store"), str(tmp_path / "search.journal")
    kw = dict(variants=["global"], n_trials=3, journal=journal)
    exp, trials = _search(tiny, harmful, harmless, store, converge=1e-9, max_trials=7, **kw)
    info = exp.convergence_["global"]
    points, box = hypervolume_box("score", trials.val_refusal.tolist(), trials.val_baseline_refusal.iloc[0],
                                  None)
    change = hypervolume_change(points, trials.val_kl.tolist(), ref=box)
    assert 3 <= len(trials) <= 7 and info["trials"] == len(trials)
    assert info["stopped_by"] == ("converge" if change < 1e-9 else "max_trials")
    if len(trials) < 7:  # it stopped at the first count where the front had stopped growing
        assert change < 1e-9 and info["converged"]
        shorter = trials.iloc[:-1]
        before = hypervolume_change(hypervolume_box("score", shorter.val_refusal.tolist(), box[0], None)[0],
                                    shorter.val_kl.tolist(), ref=box)
        assert len(shorter) < 3 or not before < 1e-9
    again, replay = _search(tiny, harmful, harmless, store, converge=1e-9, max_trials=7, **kw)
    assert replay.from_journal.all() and len(replay) == len(trials)
    _, capped = _search(tiny, harmful, harmless, store, converge=0.5, max_trials=3, **kw)
    assert len(capped) == 3  # max_trials = n_trials: the budget of a plain run
    with pytest.raises(ValueError, match="max_trials"):
        AbliterationSearch(**FAST, converge=0.02, max_trials=2)
    with pytest.raises(ValueError, match="converge"):
        AbliterationSearch(**FAST, converge=2.0)


def test_journal_in_a_missing_folder_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="journal"):
        AbliterationSearch(**FAST, journal=str(tmp_path / "no" / "such.journal"))


def test_search_never_sees_the_test_split(tiny, harmful, harmless, tmp_path, monkeypatch):
    """Every path to the model (format: forward, generate, store reads) is counted for TEST prompts."""
    exp = AbliterationSearch(**FAST, judge=True, max_new_tokens=2)
    test = set(harmful.split("test", seed=exp.seed)) | set(harmless.split("test", seed=exp.seed))
    seen, done = [], object()
    fmt = tiny.format
    monkeypatch.setattr(tiny, "format", lambda prompt, chat=True, *rest: seen.append(prompt) or fmt(prompt, chat, *rest))
    store = ActivationStore(tmp_path)
    get = store.get
    monkeypatch.setattr(store, "get",
                        lambda model, prompts, *a, **kw: seen.extend(prompts) or get(model, prompts, *a, **kw))
    search = AbliterationSearch.search
    monkeypatch.setattr(AbliterationSearch, "search",
                        lambda self, *a, **kw: (search(self, *a, **kw), seen.append(done))[0])
    result = exp.run(tiny, harmful, harmless, store=store)
    cut = next(i for i, x in enumerate(seen) if x is done)
    assert not test & set(seen[:cut]), "a test prompt reached the model during the search"
    assert test <= set(seen[cut:])  # the front's evaluation does use them
    assert "test_marker_refusals" in result.table


def test_search_removes_the_planted_refusal(planted, planted_sets, tmp_path):
    """The planted model refuses by construction: the Heretic family must find near-free removals."""
    harmful, harmless = planted_sets
    exp = AbliterationSearch(**{**FAST, "variants": ["heretic"], "n_startup_trials": 4})
    result = exp.run(planted, harmful, harmless, store=ActivationStore(tmp_path))
    table = result.table
    original = table[table.variant == "original"].test_refusal_score.item()
    best = table[table.variant == "heretic"].sort_values("test_refusal_score").iloc[0]
    assert original > 5 and best.test_refusal_score < original - 10 and best.test_kl < 0.01, (original, best)
    assert (table[table.variant == "heretic"].val_refusal < table.val_baseline_refusal.dropna().iloc[0]).all()


def test_nsga2_and_marker_objective_run(tiny, harmful, harmless, tmp_path):
    exp, trials = _search(tiny, harmful, harmless, ActivationStore(tmp_path), sampler="nsga2", refusal="markers",
                          max_new_tokens=2, variants=["global"])
    assert len(trials) == 4 and (trials.val_refusal == trials.val_refusal.round()).all()
    assert set(trials.refusal_objective) == {"markers"}


def test_exported_front_point_reloads_with_transformers(tiny, harmful, harmless, tmp_path):
    from transformers import AutoModelForCausalLM

    exp, trials = _search(tiny, harmful, harmless, ActivationStore(tmp_path / "store"), variants=["targeted"])
    trial = int(trials[trials.pareto_front].trial.iloc[0])
    with ab.abliterated(tiny, exp.edits(tiny, *exp.params_[trial])):
        expected = tiny.last_logits(PROMPTS)
    out = exp.export(tiny, trial, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert not torch.allclose(tiny.last_logits(PROMPTS), expected, atol=1e-4)  # the live model is restored
    with pytest.raises(ValueError, match="not one of"):
        exp.export(tiny, 999, tmp_path / "nope")


def test_unmet_kl_budget_says_so_and_keeps_the_front(tiny, harmful, harmless, tmp_path):
    exp = AbliterationSearch(**FAST, kl_budget=1e-12, variants=["global"])
    with pytest.warns(UserWarning, match="no trial met kl_budget"):
        result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path))
    assert "no trial met kl_budget=1e-12" in result.summary["selection"]
    assert result.table.pareto_front.any() and not result.table.selected.any()
    met = AbliterationSearch(**FAST, kl_budget=100.0, variants=["global"]).run(
        tiny, harmful, harmless, store=ActivationStore(tmp_path))
    chosen = met.table[met.table.selected]
    assert len(chosen) == 1 and chosen.pareto_front.item() and met.summary["selected_trial"] == chosen.trial.item()


def test_too_few_prompts_is_a_clear_error(tiny, harmful, harmless):
    with pytest.raises(ValueError, match="at least 4 prompts"):
        AbliterationSearch(**FAST).run(tiny, harmful[:3], harmless)


# ---- the comparison script ---------------------------------------------------------------------------

def _heretic_row(trial, index, pareto=True):
    """A row shaped like bench/peers/heretic.trials_table's (Heretic's component names)."""
    row = {"trial": trial, "state": "COMPLETE", "refusals": 1, "kl": 0.05, "pareto": pareto,
           "direction_scope": "per layer" if index is None else "global", "direction_index": index}
    for comp, (top, pos) in {"attn.o_proj": (1.2, 1.0), "mlp.down_proj": (0.9, 0.6)}.items():
        row.update({f"{comp}.max_weight": top, f"{comp}.max_weight_position": pos, f"{comp}.min_weight": 0.3,
                    f"{comp}.min_weight_distance": 1.0})
    return row


def test_pareto_script_smoke_on_tiny(tiny, tmp_path, monkeypatch, capsys):
    """The script end to end on the tiny model, Heretic's trials faked (its venv is not needed)."""
    import pandas as pd

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import abliteration_pareto

    from bench.peers import heretic

    monkeypatch.setattr(heretic, "VENV", tmp_path / "no-venv")
    assert abliteration_pareto.run_heretic(None, None, tmp_path, {}) is None
    assert "Heretic skipped: its virtualenv" in capsys.readouterr().out
    params = abliteration_pareto.heretic_params(_heretic_row(1, 0.5))
    assert params.direction_index == 0.5 and params.attn == ab.Kernel(1.2, 1.0, 0.3, 1.0)
    assert abliteration_pareto.heretic_params(_heretic_row(2, None)).scope == "per layer"
    fake = pd.DataFrame([_heretic_row(1, 0.5), _heretic_row(2, None), _heretic_row(3, 0.2, pareto=False)])
    monkeypatch.setattr(abliteration_pareto, "run_heretic", lambda a, model, out, files: fake)
    out = tmp_path / "abliteration"
    abliteration_pareto.main(["--model", "tiny", "--variants", "heretic,targeted", "--trials", "2", "--n-train", "6",
                              "--n-val", "4", "--n-test", "4", "--n-text", "2", "--arditi-filter", "none",
                              "--judge", "--max-tokens", "3", "--capability", "2", "--benign", "sensitive-benign",
                              "--n-benign", "2", "--out", str(out), "--journal", str(tmp_path / "search.journal"),
                              "--store", str(tmp_path / "store")],
                             model=tiny)
    for name in ("fronts.csv", "pareto_test.png", "summary.json", "circuitlab/trials.csv", "prompts/harmful_test.txt"):
        assert (out / name).is_file(), name
    fronts = pd.read_csv(out / "fronts.csv")
    assert set(fronts.method) == {"circuitlab", "original", "arditi", "heretic"}
    assert sorted(fronts[fronts.method == "heretic"].trial) == [1, 2] and fronts.test_kl.notna().all()
    for measure in ("judge_refusal_rate", "over_refusal_rate"):  # circuitlab's judge beside Heretic's markers
        values, low, high = (fronts[f"test_{measure}{end}"] for end in ("", "_ci_low", "_ci_high"))
        assert values.between(0, 1).all() and (low <= values).all() and (values <= high).all()
    assert fronts.test_marker_refusals.notna().all()
    assert fronts.test_capability_accuracy.between(0, 1).all()  # --capability: a side-effect column on every point
    assert fronts.test_over_refusal_benign.between(0, 1).all()  # --benign: so is over-refusal on benign questions
    assert (tmp_path / "search.journal").stat().st_size > 0  # --journal: the studies a rerun would resume
    with pytest.raises(SystemExit) as exit_info:
        abliteration_pareto.parse(["--journal", str(tmp_path / "missing" / "search.journal")])
    assert exit_info.value.code == 2


def test_search_only_writes_the_converged_fronts_and_never_reads_test(tiny, tmp_path, monkeypatch):
    """``--search-only --converge``: trials, the val front, hypervolume curves and the convergence record; no test
    prompt reaches the model and no test measure is written."""
    import json

    import pandas as pd

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import abliteration_pareto

    out = tmp_path / "abliteration"
    argv = ["--model", "tiny", "--variants", "global", "--trials", "2", "--converge", "0.5", "--max-trials", "4",
            "--n-train", "6", "--n-val", "4", "--n-test", "4", "--no-heretic", "--no-arditi", "--search-only",
            "--test-front", "pareto", "--out", str(out), "--store", str(tmp_path / "store")]
    test_prompts = []
    forward = type(tiny).batches
    monkeypatch.setattr(type(tiny), "batches", lambda self, prompts, *a, **k: test_prompts.extend(
        p for p in prompts if p in set((out / "prompts" / "harmful_test.txt").read_text().splitlines()))
        or forward(self, prompts, *a, **k))
    summary = abliteration_pareto.main(argv, model=tiny)
    assert not test_prompts and not (out / "fronts.csv").exists()
    assert json.loads((out / "summary.json").read_text())["search"]["test"] == "not read (--search-only)"
    trials = pd.read_csv(out / "circuitlab" / "trials.csv")
    info = summary["search"]["convergence"]["global"]
    assert 2 <= len(trials) <= 4 and info["trials"] == len(trials) and info["stopped_by"] in ("converge", "max_trials")
    assert len(summary["search"]["front"]) == int(trials.pareto_front.sum())
    hv = pd.read_csv(out / "hypervolume.csv")
    assert hv.trials.max() == len(trials) and hv.change_last_20pct.iloc[-1] == pytest.approx(
        info["hypervolume_change_last_20pct"], nan_ok=True)


def test_hypervolume_of_a_score_search_is_boxed_at_the_unedited_score(tmp_path, monkeypatch):
    """Refusal scores are log-odds: the box is the unedited model's val score x KL 1, so an edit that raises the
    score adds nothing; marker counts stay fractions in the unit box; each curve's last-20 % change is recorded."""
    import pandas as pd

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import abliteration_pareto

    (tmp_path / "circuitlab").mkdir()
    rows = [dict(trial=t, variant="global", refusal_objective="score", val_refusal=r, val_kl=k, val_baseline_refusal=2.0)
            for t, (r, k) in enumerate([(3.0, 0.1), (1.0, 0.5), (-1.0, 0.5), (-1.0, 0.5), (-1.0, 0.5)])]
    rows += [dict(trial=10 + t, variant="heretic", refusal_objective="markers", val_refusal=r, val_kl=0.5,
                  val_baseline_refusal=8) for t, r in enumerate([8, 4])]
    pd.DataFrame(rows).to_csv(tmp_path / "circuitlab" / "trials.csv", index=False)
    table = abliteration_pareto.hypervolume_table(tmp_path, tmp_path / "no-heretic", n_val=16)
    score = table[table.variant == "global"]
    assert score.hypervolume.tolist() == pytest.approx([0.0, 0.5, 1.5, 1.5, 1.5]) and (score.box_refusal == 2.0).all()
    assert score.change_last_20pct.iloc[0] == 0.0  # unchanged over the last 20 % of its trials
    markers = table[table.variant == "heretic"]
    assert markers.hypervolume.tolist() == pytest.approx([0.25, 0.375]) and (markers.box_refusal == 1.0).all()
    assert (tmp_path / "hypervolume.png").is_file()
