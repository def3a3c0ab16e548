"""Adversarial hardening (ReFAT) and the adaptive attacks: planted-circuit and tiny-model tests."""

import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.methods import metrics
from circuitlab.core import hooks as hk
from circuitlab.core.components import from_table
from circuitlab.methods.directions import candidate_directions, mean_differences, unit
from circuitlab.experiments.hardening import adaptive_direction_attack, attribution_units, subspace_hooks
from circuitlab.defence.adversaries import RefusalAblationAdversary
from circuitlab.defence.finetune import full_masks, greedy_targets, train
from circuitlab.methods.interventions import ablation_hooks, directional_ablation_hooks, reference_activations
from circuitlab.core.weights import weights_restored

from conftest import run_script

SCRIPT = "experiments/robust_safety.py"


@pytest.fixture(scope="module")
def sets():
    from circuitlab.models.planted import planted_prompts

    h, s = (list(p) for p in planted_prompts(64, seed=0))
    return {"h_train": h[:32], "s_train": s[:32], "h_val": h[32:40], "s_val": s[32:40], "h_test": h[40:],
            "s_test": s[40:]}


def _prob(model, prompts, hooks=()):
    tok = metrics.refusal_tokens(model)
    return torch.sigmoid(metrics.refusal_score_from_logits(model.last_logits(prompts, fwd_hooks=hooks), tok)).mean().item()


def test_adversarial_step_ablates_the_current_direction(planted, sets):
    """At every refresh the adversary's direction is the diff-in-means of the weights AT THAT STEP
    (recomputed independently through a fresh store), and the training forward pass sees it projected
    out of the hardening rows only; retain rows pass unchanged."""
    name, h, s = hk.resid_pre(2), sets["h_train"][:8], sets["s_train"][:8]
    records = []

    class Checked(RefusalAblationAdversary):
        def __call__(self, step, n_rows):
            hooks, rows = super().__call__(step, n_rows)
            fresh = mean_differences(self.model, h, s, [name], [-1], store=ActivationStore(disk=False))[name][0]
            rec = {"used": self.directions[0].clone(), "fresh": unit(fresh), "rows": rows}
            records.append(rec)

            def pre(act, hook):
                rec["pre"] = act.detach().clone()

            def post(act, hook):
                rec["post"] = act.detach().clone()
            return [(name, pre)] + hooks + [(name, post)], rows

    pairs = [(p, " sorry") for p in sets["h_train"][:8]]
    retain = greedy_targets(planted, sets["s_train"][:4], 3)
    with weights_restored(planted):
        adversary = Checked(planted, h, s, [(2, -1)], refresh_every=1, prob=0.5, seed=1)
        train(planted, full_masks(planted), pairs, steps=4, lr=1e-2, batch_size=4, retain=retain,
              retain_per_batch=2, adversary=adversary)
    assert len(adversary.history) == 4 and len(records) == 4
    for rec in records:
        assert abs(float(rec["used"] @ rec["fresh"])) > 1 - 1e-6, "the hook must use the direction of the current weights"
        rows = torch.cat([rec["rows"], torch.zeros(2, dtype=torch.bool)])  # 4 hardening rows, then 2 retain rows
        if rows.any():
            assert (rec["post"][rows] @ rec["used"].to(rec["post"])).abs().max() < 1e-4
        assert torch.equal(rec["post"][~rows], rec["pre"][~rows]), "retain rows and unselected rows are not ablated"
    assert sum(int(r["rows"].sum()) for r in records) not in (0, 16), "prob=0.5 ablates some rows, not all"
    drift = 1 - abs(float(records[0]["fresh"] @ records[-1]["fresh"]))
    assert drift > 1e-6, "training moved the direction, so a stale direction would have been caught"


def test_adaptive_attack_recomputes_on_the_trained_weights(planted, sets):
    args = [sets[k] for k in ("h_train", "s_train", "h_val", "s_val")]
    before, _ = adaptive_direction_attack(planted, *args, layers=[1, 2], positions=[-2, -1], prune_layer_frac=0.0)
    units_before = attribution_units(planted, sets["h_train"][:8], sets["s_train"][:8])
    with weights_restored(planted):
        train(planted, full_masks(planted), [(p, " sorry") for p in sets["h_train"][:8]], steps=3, lr=1e-2)
        after, table = adaptive_direction_attack(planted, *args, layers=[1, 2], positions=[-2, -1],
                                                 prune_layer_frac=0.0)
        expected = candidate_directions(planted, sets["h_train"], sets["s_train"], ActivationStore(disk=False))
        units_after = attribution_units(planted, sets["h_train"][:8], sets["s_train"][:8])
    assert set(after) == {(l, o) for l in (1, 2) for o in (-2, -1)} and table.selected.sum() == 1
    for key, d in after.items():
        torch.testing.assert_close(d, expected[key], rtol=1e-4, atol=1e-5)
    assert any((after[k] - before[k]).norm() > 1e-3 * before[k].norm() for k in after), "not recomputed"
    assert not units_after.attribution.equals(units_before.attribution), "unit ranking not recomputed"


def test_attack_rules_strongest_takes_the_lowest_bypass_score_whatever_its_kl(planted, sets):
    args = [sets[k] for k in ("h_train", "s_train", "h_val", "s_val")]
    kw = dict(layers=[0, 1, 2], positions=[-2, -1], prune_layer_frac=0.0)
    _, strongest = adaptive_direction_attack(planted, *args, rule="strongest", **kw)
    _, arditi = adaptive_direction_attack(planted, *args, rule="arditi", **kw)
    eligible = strongest[~strongest.excluded & strongest.bypass_score.notna()]
    assert strongest.selected.sum() == 1 and strongest.loc[strongest.selected, "bypass_score"].item() == eligible.bypass_score.min()
    assert set(strongest.fallback_step) == {"strongest"} and strongest.selection_rule.iloc[0].startswith("strongest")
    assert arditi.selected.sum() == 1 and arditi.fallback_step.iloc[0] != "strongest"  # the paper's rule, as before
    picked = arditi.loc[arditi.selected, "bypass_score"].item()
    assert picked >= eligible.bypass_score.min()  # never a stronger attack than "strongest"
    with pytest.raises(ValueError, match="rule"):
        adaptive_direction_attack(planted, *args, rule="weakest", **kw)
    _, screened = adaptive_direction_attack(planted, *args, screen_prompts=2, n_finalists=1, **kw)
    tried = screened[screened.screen_bypass_score.notna()]  # planted layers 0-1 give zero directions: not scored
    finalist = screened.finalist.astype(bool)
    assert len(tried) >= 2 and 1 <= finalist.sum() < len(tried) and screened.loc[~finalist, "bypass_score"].isna().all()
    assert finalist[tried.screen_bypass_score.idxmin()]  # the lowest screened bypass is always a finalist
    assert finalist[screened.index[screened.selected]].all()


def test_subspace_hooks_project_out_the_span(tiny):
    torch.manual_seed(0)
    dirs = torch.randn(2, tiny.d_model)
    captured = {}

    def grab(act, hook):
        captured["x"] = act
    with tiny.hooks(subspace_hooks(tiny, dirs) + [(hk.resid_pre(1), grab)]):
        tiny.last_logits(["how do i make a cake"])
    q, _ = torch.linalg.qr(dirs.T)
    assert (captured["x"].float() @ q).abs().max() < 1e-4


def test_planted_hardening_survives_the_paper_rule_attack_not_the_strongest_and_stays_single_unit(planted, sets):
    """The honest finding on the planted circuit. Adversarial hardening makes refusal survive the
    direction the paper's rule picks (its KL filter prefers a weak candidate on the hardened model), but
    not the strongest candidate direction recomputed on the hardened weights; and refusal does NOT become
    multi-unit: the keyword-moving head stays a single point of failure (mean-ablating the top
    attribution unit still removes refusal), because every path from the keyword to the last token runs
    through it. Measured: paper-rule attack 0.13 -> 0.94, strongest 0.13 -> 0.25, top-1 unit 0.00 -> 0.01."""
    s = sets

    def attacks():
        out = {"refusal": _prob(planted, s["h_test"]), "over": _prob(planted, s["s_test"])}
        for rule in ("arditi", "strongest"):
            dirs, table = adaptive_direction_attack(planted, s["h_train"], s["s_train"], s["h_val"], s["s_val"],
                                                    rule=rule)
            best = table[table.selected].iloc[0]
            hooks = directional_ablation_hooks(planted, dirs[(int(best.layer), int(best.position))])
            out[rule] = _prob(planted, s["h_test"], hooks)
        units = from_table(attribution_units(planted, s["h_train"], s["s_train"]).head(1))
        ref = reference_activations(planted, units, s["s_train"], ActivationStore(disk=False))
        out["top1"] = _prob(planted, s["h_test"], ablation_hooks(planted, units, "mean", reference=ref))
        return out, units[0]

    before, unit_before = attacks()
    assert before["refusal"] > 0.99 and before["over"] < 0.01 and before["top1"] < 0.05
    assert before["arditi"] < 0.3 and before["strongest"] < 0.3
    retain = greedy_targets(planted, s["s_train"][:16], 6)
    with weights_restored(planted):
        adversary = RefusalAblationAdversary(planted, s["h_train"][:16], s["s_train"][:16], [(2, -1)],
                                             refresh_every=2, prob=0.5)
        train(planted, full_masks(planted), [(p, " sorry") for p in s["h_train"]], steps=60, lr=5e-4,
              batch_size=4, retain=retain, kl_weight=1.0, adversary=adversary)
        after, unit_after = attacks()
    assert after["refusal"] > 0.9 and after["over"] < 0.1, "hardening kept refusal and did not over-refuse"
    assert after["arditi"] > 0.5, "the paper-rule direction no longer removes refusal"
    assert after["strongest"] < 0.5, "the strongest recomputed direction still does"
    assert after["top1"] < 0.1 and unit_after == unit_before, "still one unit: refusal did not become multi-unit"


def test_experiment_runs_and_compares_at_equal_parameters(tiny, harmful, harmless, tmp_path):
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=2, variants=["targeted", "random"], n_train=4,
                                  modes=["plain", "adversarial"], batch_size=2, n_retain=3, retain_tokens=3,
                                  judge=False, n_text=2, n_eval=3, n_val=2, n_attack=4, n_adv=3, k_grid=[1, 3],
                                  n_dirs=[1, 2], n_boot=50, attack_layers=[0, 1], attack_positions=[-2, -1],
                                  suite=["direction_ablation", "rank_k_ablation", "unit_ablation", "orthogonalization"],
                                  edge_fraction=0.02, progress=False)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    comp = result.tables["comparison"].set_index(["variant", "mode"])
    assert set(comp.index) == {("original", "none")} | {(v, m) for v in ("targeted", "random")
                                                          for m in ("plain", "adversarial")}
    training = result.tables["training"].set_index(["variant", "mode"])
    assert training.n_params.nunique() == 1, "targeted and random train exactly as many parameters"
    assert (training.xs("adversarial", level="mode").adversary_refreshes == 1).all()
    assert (training.xs("plain", level="mode").ablated_rows == 0).all()
    curves = result.tables["curves"]
    assert set(curves.curve) == {"units", "directions"} and set(curves.k) == {1, 2, 3}
    for col in ("refusal_direction_ablation", "refusal_unit_ablation", "refusal_orthogonalization", "units_to_halve",
                "top_unit_share", "kl_from_original", "cross_entropy", "edge_faithfulness", "edge_circuit_edges",
                "refusal_rank_k_ablation", "refusal_worst", "worst_attack", "removal_kl", "entangled"):
        assert col in comp.columns
    suite = ["refusal_" + a for a in ("direction_ablation", "rank_k_ablation", "unit_ablation", "orthogonalization")]
    assert (comp.refusal_worst == comp[suite].min(axis=1)).all(), "worst = the lowest refusal over the suite"
    assert not comp.loc[("original", "none"), "entangled"], "the original is its own reference"
    red = result.tables["redundancy"]
    assert set(red.mechanism) == {"top_units", "top_direction", "all"}
    assert comp.edge_circuit_edges.nunique() == 1, "every model's edge circuit has the same size"
    cands = result.tables["attack_candidates"]
    assert (cands.groupby(["variant", "mode"]).selected.sum() == 1).all(), "one attack direction per model"
    result.save(tmp_path / "run")


def test_distributed_extended_hardening_faces_prefill_and_abliteration(tiny, harmful, harmless, tmp_path):
    from circuitlab.defence.finetune import extended_refusals
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=1, modes=["distributed"], targets="extended",
                                  n_train=2, batch_size=2, n_retain=2, retain_tokens=2, judge=False, n_text=1,
                                  n_eval=3, n_val=2, n_attack=4, n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20,
                                  attack_layers=[1], attack_positions=[-1], suite=["prefill", "abliteration"],
                                  abliteration_trials=2, progress=False)
    assert exp._pairs(tiny, list(harmful)[:4])[0][1] in extended_refusals()
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    comp = result.tables["comparison"].set_index(["variant", "mode"])
    assert set(comp.index) == {("original", "none"), ("targeted", "distributed")}
    assert {"refusal_prefill", "refusal_abliteration"} <= set(comp.columns)
    assert comp.worst_attack.isin(["prefill", "abliteration", "direction_ablation"]).all()
    assert result.tables["training"].adversary_refreshes.iloc[0] == 1 and result.summary["targets"] == "extended"


@pytest.mark.parametrize("bad, message", [(["--set", "judge"], "key=value"), (["--set", "nope=1"], "no parameter 'nope'"),
                                          (["--quick", "--set", "attack_rule=weakest"], "attack_rule"),
                                          (["--seeds", "1,1"], "distinct"), (["--set", "seed=3"], "--seeds"),
                                          (["--combine"], "no ")])
def test_robust_safety_script_refuses_bad_sets_before_loading(bad, message, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    code, _, err = run_script(capsys, SCRIPT, *bad, "--out", str(out))
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_random_subspace_adversary_ablates_a_random_member_at_every_step(planted, sets):
    """DeepRefusal-style: every step draws k <= max_k keys (random layers and offsets) and projects their span
    out of the hardening rows from the first drawn layer on; the draws vary across steps."""
    from circuitlab.defence.adversaries import RandomSubspaceAdversary

    adv = RandomSubspaceAdversary(planted, sets["h_train"][:8], sets["s_train"][:8], max_k=3, refresh_every=2, seed=0)
    drawn = []
    for step in range(6):
        hooks, rows = adv(step, 4)
        _, first, keys = adv.history[-1]
        assert 1 <= len(keys) <= 3 and all(k in adv.candidates for k in keys) and rows.dtype == torch.bool
        layers = {hk.layer_of(n) for n, _ in hooks}
        assert min(layers) == first and max(layers) == planted.n_layers - 1
        drawn.append(tuple(keys))
    assert len(set(drawn)) > 1, "a random member each step, not one fixed direction"
    with weights_restored(planted):
        log = train(planted, full_masks(planted), [(p, " sorry") for p in sets["h_train"][:8]], steps=2, lr=1e-3,
                    batch_size=2, adversary=RandomSubspaceAdversary(planted, sets["h_train"][:8],
                                                                    sets["s_train"][:8], max_k=8))
    assert sum(log["ablated_rows"]) == 4  # prob=1: every hardening row ablated


def test_extended_refusals_are_multi_sentence_and_harmless():
    from circuitlab.defence.finetune import REFUSAL_TARGETS, extended_refusals, refusal_targets

    ext = extended_refusals()
    assert len(ext) >= 3 and all(t.count(". ") >= 2 for t in ext), "several sentences each"
    assert all(("can't" in t or "won't" in t) for t in ext)
    assert refusal_targets("short") == REFUSAL_TARGETS and refusal_targets("extended") == ext
    with pytest.raises(ValueError, match="extended"):
        refusal_targets("long")


def test_redundancy_fails_on_one_mechanism_and_passes_on_two(planted, sets):
    """The planted model refuses through one neuron: keeping only a random neuron (ablating the planted one)
    removes refusal, so it is not redundant. A copy of the planted neuron into a free neuron makes a second,
    independent mechanism: each alone keeps refusal."""
    from circuitlab.core.components import Component
    from circuitlab.core.weights import canonical_parameters
    from circuitlab.defence.attacks import redundancy
    from circuitlab.models.planted import PLANTED_NEURON

    layer, n = PLANTED_NEURON
    spare = (n + 1) % planted.d_mlp
    h = sets["h_test"][:12]

    def mechanisms():
        return {f"neuron {i}": ablation_hooks(planted, [Component("neuron", layer, i)], "zero") for i in (n, spare)}
    one = redundancy(planted, h, mechanisms())
    assert not one.attrs["redundant"]
    assert one.set_index("mechanism").loc[f"neuron {n}", "suffices"] and not one.set_index("mechanism").loc[
        f"neuron {spare}", "suffices"]
    params = canonical_parameters(planted)
    with weights_restored(planted):
        with torch.no_grad():
            for part in ("gate_proj", "up_proj"):
                w = params[f"model.layers.{layer}.mlp.{part}.weight"]
                w[spare] = w[n]
            down = params[f"model.layers.{layer}.mlp.down_proj.weight"]
            down[:, spare] = down[:, n]
        two = redundancy(planted, h, mechanisms())
    assert two.attrs["redundant"] and two.set_index("mechanism").loc["all", "kept_share"] < 0.5
    with pytest.raises(ValueError, match="at least 2"):
        redundancy(planted, h, {"one": []})


def test_recovery_mode_trains_with_openers_and_faces_the_prefill_attack(tiny, harmful, harmless, tmp_path):
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=1, modes=["recovery"], recovery_prob=1.0,
                                  n_train=2, batch_size=2, n_retain=2, retain_tokens=2, judge=False, n_text=1,
                                  n_eval=3, n_val=2, n_attack=4, n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20,
                                  attack_layers=[1], attack_positions=[-1], suite=["prefill"], progress=False)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    training = result.tables["training"].iloc[0]
    assert training["mode"] == "recovery" and training.prefilled_rows == 4  # 2 steps x 2 rows, all prefilled
    assert ("targeted", "recovery") in set(result.tables["comparison"].set_index(["variant", "mode"]).index)
    with pytest.raises(ValueError, match="recovery_prob"):
        get("robust-hardening")(recovery_prob=0.0)


def test_eval_split_val_measures_val_prompts_the_attacks_did_not_choose_on(tiny, tmp_path):
    """Settings are chosen with ``eval_split="val"``: the measured prompts are val prompts outside the attacks'
    own val sample, and no test prompt is read."""
    from circuitlab.experiments import get
    from circuitlab.io import datasets

    harmful, harmless = datasets.load("advbench", n=30, seed=0), datasets.load("harmless", n=30, seed=0)

    kw = dict(steps=1, n_neurons=3, n_heads=1, modes=["plain"], n_train=2, batch_size=2, n_retain=2, retain_tokens=2,
              judge=False, n_text=1, n_eval=3, n_val=2, n_attack=4, n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20,
              attack_layers=[1], attack_positions=[-1], suite=["prefill"], progress=False, benign=None)
    exp = get("robust-hardening")(eval_split="val", **kw)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    s = exp._sets
    for k, prompts in (("h", harmful), ("s", harmless)):
        assert not set(s[f"{k}_test"]) & set(prompts.split("test", 0)), "no test prompt measured"
        assert set(s[f"{k}_test"]) <= set(prompts.split("val", 0)) and not set(s[f"{k}_test"]) & set(s[f"{k}_val"])
    assert set(result.table.set) >= {"harmful_val", "harmless_val"} and "harmful_test" not in set(result.table.set)
    comparison = result.tables["comparison"]
    assert result.summary["eval_split"] == "val" and len(comparison) == 2
    assert comparison[["refusal_prefill", "refusal_worst", "kl_from_original"]].notna().all().all(), \
        "every model's row is read from the val sets, the trained ones too"
    with pytest.raises(ValueError, match="eval_split"):
        get("robust-hardening")(eval_split="train")


def _write_val_runs(root, setting: str, rows: dict, *, mode: str, over_refusal: float, **params) -> None:
    """``root/<setting>_<value>/seed_0/``: a comparison (original + one ``mode`` model with ``(refusal_worst, kl)``)
    and a run.json of an eval_split=val run, as ``--choose`` reads them."""
    import json

    import pandas as pd

    for value, (worst, kl) in rows.items():
        folder = root / f"{setting}_{value}" / "seed_0"
        folder.mkdir(parents=True)
        pd.DataFrame([{"variant": "original", "mode": "none", "refusal_worst": 0.0, "kl_from_original": 0.0,
                       "over_refusal_rate": 0.0},
                      {"variant": "targeted", "mode": mode, "refusal_worst": worst, "kl_from_original": kl,
                       "over_refusal_rate": over_refusal}]).to_csv(folder / "comparison.csv", index=False)
        (folder / "run.json").write_text(json.dumps({"params": {setting: value, **params, "eval_split": "val"}}))


def test_robust_safety_chooses_the_learning_rate_on_val_runs_only(tmp_path, capsys):
    """``--choose-lr``: the highest mean refusal under the worst attack among rates that keep KL <= 0.2; a run
    measured on test prompts is refused (exit 2), so the choice cannot read the test split."""
    import json

    import pandas as pd

    rows = {0.001: (0.9, 8.0), 0.0005: (0.6, 0.1), 0.00025: (0.4, 0.05)}  # lr: (refusal_worst, kl)
    _write_val_runs(tmp_path, "lr", rows, mode="plain", over_refusal=0.1)
    code, _, err = run_script(capsys, SCRIPT, "--choose-lr", "--out", str(tmp_path))
    assert code == 0, err
    chosen = pd.read_csv(tmp_path / "selection.csv").set_index("lr").chosen
    assert chosen[0.0005] and chosen.sum() == 1, "0.001 breaks the KL bar; 0.0005 refuses most of the rest"
    (tmp_path / "lr_0.00025" / "seed_0" / "run.json").write_text(json.dumps({"params": {"lr": 0.00025,
                                                                                        "eval_split": "test"}}))
    code, _, err = run_script(capsys, SCRIPT, "--choose-lr", "--out", str(tmp_path))
    assert code == 2 and "not measured on val" in err


def test_robust_safety_merges_runs_whose_originals_agree(tmp_path, capsys):
    """``--merge``: runs at the same settings and seeds with other modes make one table, the original once; a run
    whose original differs, or whose settings differ, is refused (exit 2) and nothing is written."""
    import json

    import pandas as pd

    base = {"variant": "original", "mode": "none", "refusal_worst": 0.0, "worst_attack": "prefill",
            "over_refusal_rate": 0.0, "kl_from_original": 0.0}

    def run_folder(name, mode, original=base, lr=0.00025, variant="targeted"):
        for seed in (0, 1):
            folder = tmp_path / name / f"seed_{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([original, {**base, "variant": variant, "mode": mode, "refusal_worst": 0.1 * (seed + 1),
                                     "kl_from_original": 0.05}]).to_csv(folder / "comparison.csv", index=False)
            (folder / "run.json").write_text(json.dumps({"params": {"lr": lr, "modes": [mode], "variants": [variant]},
                                                         "model": {"id": "embedded"}}))
    run_folder("a", "plain")
    run_folder("b", "redundant")
    run_folder("e", "rerouting", variant="full")  # another defence: which parameters train may differ too

    def merge(*runs, out="merged"):
        return run_script(capsys, SCRIPT, "--merge", *[str(tmp_path / r) for r in runs], "--seeds", "0,1",
                          "--out", str(tmp_path / out))
    code, _, err = merge("a", "b", "e")
    assert code == 0, err
    by_seed = pd.read_csv(tmp_path / "merged" / "by_seed.csv")
    assert sorted(by_seed["mode"]) == ["none", "none", "plain", "plain", "redundant", "redundant", "rerouting",
                                       "rerouting"]
    assert sorted(by_seed[by_seed["mode"] == "rerouting"].variant) == ["full", "full"]
    assert json.loads((tmp_path / "merged" / "run.json").read_text())["merged"] == [str(tmp_path / r)
                                                                                   for r in ("a", "b", "e")]
    run_folder("c", "distributed", original={**base, "refusal_worst": 0.25})
    run_folder("d", "distributed", lr=0.001)
    for other, message in (("c", "original differs"), ("d", "differs from")):
        code, _, err = merge("a", other, out=f"merged_{other}")
        assert code == 2 and message in err and not (tmp_path / f"merged_{other}" / "by_seed.csv").exists()


@pytest.mark.parametrize("setting, values", [("steps", (8, 32, 64)), ("full_lr", (1e-6, 3e-6, 1e-5))])
def test_robust_safety_chooses_steps_and_the_full_rate_by_the_same_rule(tmp_path, capsys, setting, values):
    import pandas as pd

    low, middle, high = values
    _write_val_runs(tmp_path, setting, {low: (0.0, 0.03), middle: (0.25, 0.12), high: (0.5, 0.4)},
                    mode="recovery", over_refusal=0.0, lr=0.00025)
    code, _, err = run_script(capsys, SCRIPT, "--choose", setting, "--out", str(tmp_path))
    assert code == 0, err
    chosen = pd.read_csv(tmp_path / "selection.csv").set_index(setting).chosen
    assert chosen[middle] and chosen.sum() == 1, f"{setting}={high} breaks the KL bar; {middle} refuses most of the rest"


def test_defend_trains_the_defence_run_trains_and_names_its_prompts(tiny, harmful, harmless):
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=1, modes=["adversarial"], n_train=4, batch_size=2,
                                  n_retain=3, retain_tokens=3, judge=False, n_text=2, n_eval=3, n_val=2, n_attack=4,
                                  n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20, attack_layers=[0, 1],
                                  attack_positions=[-1], suite=["direction_ablation"], progress=False)
    ran = exp.run(tiny, harmful, harmless).tables["training"].iloc[0]
    before = {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters()}
    with weights_restored(tiny):
        row = exp.defend(tiny, harmful, harmless, "adversarial")
        moved = sum(not torch.equal(p, before[n]) for n, p in tiny.hf_model.named_parameters())
    assert moved > 0, "defend left the weights as they were"
    assert all(torch.equal(p, before[n]) for n, p in tiny.hf_model.named_parameters()), "weights_restored failed"
    for col in ("n_params", "target_loss_first", "target_loss_last", "ablated_rows", "adversary_refreshes"):
        assert row[col] == pytest.approx(ran[col], abs=1e-6), f"{col}: defend trained another defence than run"
    assert row["trained_prompts"] and set(row["trained_prompts"]) <= set(harmful) | set(harmless)
    with pytest.raises(ValueError, match="not one of"):
        exp.defend(tiny, harmful, harmless, "armour")
