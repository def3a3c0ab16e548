"""Safety monitor: request monitor maths and cost, integrity monitor detections and false alarms."""

import numpy as np
import pytest
import torch

from circuitlab import ActivationStore
from circuitlab import hooks as hk
from circuitlab.monitor import detection_metrics, fit_request_monitor
from circuitlab.monitor.request import calibrate_threshold
from tests.conftest import HARMFUL, HARMLESS


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
