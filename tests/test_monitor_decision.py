"""Decision monitors, conformal calibration, the union ensemble, monitor files and the monitor CLI."""

import math

import numpy as np
import pytest
import torch

from circuitlab.core.components import Component
from circuitlab.methods.interventions import ablation_hooks
from circuitlab.models.planted import FEATURE_LAYER, PLANTED_HEAD, PLANTED_NEURON, planted_prompts
from circuitlab.monitor.cascade import union_of
from circuitlab.monitor.circuit import read_units
from circuitlab.monitor.cli import main as monitor_main
from circuitlab.monitor.conformal import conformal_rank, conformal_threshold, min_calibration_size
from circuitlab.monitor.decision import fit_feature_monitor, read_features, take
from circuitlab.monitor.request import clopper_pearson
from circuitlab.monitor.saved import MonitorFileError, load_monitor, save_monitor

UNITS = (Component("head", *PLANTED_HEAD), Component("neuron", *PLANTED_NEURON))  # the planted circuit


@pytest.fixture(scope="module")
def planted_monitors(planted):
    h, s = planted_prompts(60, seed=1)
    fh, fs = (read_features(planted, list(x), [1, FEATURE_LAYER], logodds=True, units=UNITS, batch_size=64)
                for x in (h, s))
    tr, va = range(30), range(30, 60)
    spec = {"probe@2": ("probe", [FEATURE_LAYER]), "direction@2": ("direction", [FEATURE_LAYER]),
            "probe@1": ("probe", [1]), "logodds": ("logodds", []), "multi-probe": ("multi-probe", [1, FEATURE_LAYER]),
            "circuit-probe": ("circuit-probe", [])}

    def fit(name, alpha=0.1):
        kind, layers = spec[name]
        return fit_feature_monitor(kind, take(fh, tr), take(fs, tr), take(fh, va), take(fs, va), layers=layers,
                                   units=UNITS if kind == "circuit-probe" else (), n_model_layers=planted.n_layers,
                                   alpha=alpha)

    mons = {name: fit(name) for name in spec}
    mons["union"] = union_of([mons["probe@2"], mons["logodds"]], take(fs, va), 0.1,
                             fit_member=lambda i, a: fit(("probe@2", "logodds")[i], a))
    return mons


def test_conformal_rank_and_threshold_by_hand():
    assert conformal_rank(19, 0.05) == 19 and conformal_rank(18, 0.05) == 19  # k > n: no finite threshold
    assert min_calibration_size(0.05) == 19 and min_calibration_size(0.1) == 9
    s = np.arange(1.0, 20.0)  # 19 scores 1..19
    assert conformal_threshold(s, 0.05) == 19.0 and conformal_threshold(s, 0.1) == 18.0
    assert conformal_threshold(s[:18], 0.05) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(s, 0.0)


def test_conformal_reaches_nominal_fpr_on_exchangeable_data():
    """Over many calibration draws the false-alarm rate on fresh exchangeable points is 1 - k/(n+1) <= alpha
    (exact for continuous scores); the mean over draws must sit within binomial tolerance of it."""
    rng = np.random.default_rng(0)
    n, alpha, draws, fresh = 40, 0.1, 2000, 50
    k = conformal_rank(n, alpha)
    exact = 1 - k / (n + 1)  # 4/41 = 0.0976
    flags = np.array([(rng.standard_normal(fresh) > conformal_threshold(rng.standard_normal(n), alpha)).mean()
                      for _ in range(draws)])
    # per-draw rates are Beta-binomial; 5 standard errors of the draw-to-draw spread
    tol = 5 * flags.std(ddof=1) / math.sqrt(draws)
    assert abs(flags.mean() - exact) < tol and flags.mean() <= alpha + tol
    # the plain empirical quantile at the same alpha is looser: it exceeds the conformal rate
    naive = np.array([(rng.standard_normal(fresh) > np.quantile(rng.standard_normal(n), 1 - alpha)).mean()
                      for _ in range(draws)])
    assert naive.mean() > flags.mean() + tol


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))


def test_decision_monitors_fire_on_planted_trigger(planted, planted_monitors):
    h, s = planted_prompts(40, seed=7)
    fh, fs = (read_features(planted, list(x), [1, FEATURE_LAYER], logodds=True, units=UNITS, batch_size=64)
                for x in (h, s))
    for name in ("probe@2", "direction@2", "logodds", "multi-probe", "union", "circuit-probe"):
        mon = planted_monitors[name]
        assert (mon.score_features(fh) > mon.threshold).float().mean() >= 0.9, name
        assert (mon.score_features(fs) > mon.threshold).float().mean() <= 0.2, name
    # before FEATURE_LAYER the last position of a harmful prompt equals its twin's: nothing to read
    assert planted_monitors["probe@1"].val_auroc == pytest.approx(0.5, abs=0.1)


def test_ablating_planted_neuron_silences_only_downstream_monitors(planted, planted_monitors):
    h, _ = planted_prompts(40, seed=7)
    hooks = ablation_hooks(planted, [Component("neuron", *PLANTED_NEURON)], "zero")
    feats = read_features(planted, list(h), [1, FEATURE_LAYER], logodds=True, units=UNITS, fwd_hooks=hooks,
                          batch_size=64)
    rate = {name: (mon.score_features(feats) > mon.threshold).float().mean().item()
            for name, mon in planted_monitors.items() if name != "probe@1"}
    # check() with the same hooks gives the same flags (one monitor through the full path)
    direct = planted_monitors["logodds"].check(planted, list(h), fwd_hooks=hooks, batch_size=64)
    assert direct.flagged.float().mean().item() == pytest.approx(rate["logodds"])
    for name in ("probe@2", "direction@2", "multi-probe", "union"):  # read resid_pre(2): upstream of the neuron
        assert rate[name] >= 0.9, (name, rate)
    # reads the output the neuron writes: down to its false-alarm level (alpha = 0.1, with binomial margin on 40)
    assert rate["logodds"] <= 0.25, rate


def test_check_runs_only_to_deepest_layer(planted, planted_monitors):
    assert planted_monitors["probe@1"].depth == 2
    assert planted_monitors["probe@2"].depth == 3 and planted_monitors["logodds"].depth == planted.n_layers
    assert planted_monitors["circuit-probe"].depth == PLANTED_NEURON[0] + 1  # its deepest unit's block, no further


def test_union_fires_iff_a_member_fires(planted, planted_monitors):
    h, s = planted_prompts(40, seed=3)
    prompts = list(h) + list(s)
    u = planted_monitors["union"]
    assert all(m.target_fpr == pytest.approx(0.05) for m in u.members)  # Bonferroni: alpha / 2 each
    any_member = torch.stack([m.check(planted, prompts, batch_size=64).flagged for m in u.members]).any(0)
    assert torch.equal(u.check(planted, prompts, batch_size=64).flagged, any_member)


def test_saved_monitor_scores_identically_and_refuses_other_weights(planted, tiny, planted_monitors, tmp_path):
    h, s = planted_prompts(20, seed=5)
    prompts = list(h) + list(s)
    feats = read_features(planted, prompts, [1, FEATURE_LAYER], logodds=True, units=UNITS, batch_size=64)
    for name, mon in planted_monitors.items():
        path = save_monitor(mon, planted, tmp_path / f"{name}.pt", provenance={"test": name})
        assert path.stat().st_size < 50_000
        loaded, record = load_monitor(path, planted)
        assert record["provenance"] == {"test": name} and record["fingerprint"] == planted.fingerprint
        assert torch.equal(loaded.score_features(feats), mon.score_features(feats)), name
        assert loaded.threshold == mon.threshold and type(loaded) is type(mon) and loaded.depth == mon.depth
        if name in ("multi-probe", "union", "circuit-probe"):  # and through check(), which reads its own features
            assert torch.equal(loaded.check(planted, prompts, batch_size=64).scores,
                               mon.check(planted, prompts, batch_size=64).scores)
    with pytest.raises(MonitorFileError, match="refit the monitor") as err:
        load_monitor(tmp_path / "logodds.pt", tiny)
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_text("not a monitor")
    with pytest.raises(MonitorFileError, match="not a circuitlab monitor file"):
        load_monitor(tmp_path / "junk.pt")


def test_cli_fit_apply_and_one_line_errors(tmp_path, capsys):
    h, s = planted_prompts(40, seed=2)
    (tmp_path / "h.txt").write_text("\n".join(h))
    (tmp_path / "s.txt").write_text("\n".join(s))
    (tmp_path / "traffic.txt").write_text("\n".join(list(h)[:5] + list(s)[:5]))
    out = tmp_path / "m.pt"
    assert monitor_main(["fit", "--model", "planted", "--harmful", str(tmp_path / "h.txt"), "--harmless",
                         str(tmp_path / "s.txt"), "--kind", "probe", "--alpha", "0.1", "--batch-size", "64", "--out", str(out)]) == 0
    assert monitor_main(["apply", "--model", "planted", "--monitor", str(out), "--prompts",
                         str(tmp_path / "traffic.txt"), "--out", str(tmp_path / "flags.csv")]) == 0
    rows = (tmp_path / "flags.csv").read_text().splitlines()
    assert rows[0] == "prompt_id,score,flagged" and len(rows) == 11
    assert [int(r.split(",")[2]) for r in rows[1:]] == [1] * 5 + [0] * 5
    capsys.readouterr()
    assert monitor_main(["apply", "--model", "tiny", "--monitor", str(out), "--prompts",
                         str(tmp_path / "traffic.txt"), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "refit" in err
    assert monitor_main(["fit", "--kind", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_circuit_probe_reads_its_units_and_is_refused_without_any(planted, planted_monitors, tmp_path, capsys):
    mon = planted_monitors["circuit-probe"]
    assert mon.units == UNITS and mon.layers == () and mon.weight.numel() == planted.d_head + 1
    h, s = planted_prompts(8, seed=4)
    feats = read_features(planted, list(h) + list(s), [], units=UNITS, batch_size=64)
    assert set(feats) == {"unit:L1H2", "unit:L2N37"} and feats["unit:L1H2"].shape == (16, planted.d_head)
    empty = {"unit:L2N37": torch.zeros(4, 1)}
    with pytest.raises(ValueError, match="read_units") as err:
        fit_feature_monitor("circuit-probe", empty, empty, empty, empty, units=(), n_model_layers=planted.n_layers)
    assert "\n" not in str(err.value)
    # a circuit map's table: only its verified units are read; none verified is refused in one line
    table = tmp_path / "run"
    table.mkdir()
    (table / "table.csv").write_text("stage,layer,component,head,neuron,verified\n"
                                     "detection,1,head,2,,True\nproduction,2,neuron,,37,True\nproduction,2,neuron,,5,False\n")
    assert tuple(read_units(table)) == UNITS
    (tmp_path / "none.csv").write_text("layer,component,head,neuron,verified\n2,neuron,,5,False\n")
    with pytest.raises(ValueError, match="no verified neuron or head"):
        read_units(tmp_path / "none.csv")
    h, s = planted_prompts(40, seed=2)
    (tmp_path / "h.txt").write_text("\n".join(h))
    (tmp_path / "s.txt").write_text("\n".join(s))
    common = ["fit", "--model", "planted", "--harmful", str(tmp_path / "h.txt"), "--harmless", str(tmp_path / "s.txt"),
              "--kind", "circuit-probe", "--alpha", "0.1", "--batch-size", "64"]
    capsys.readouterr()
    assert monitor_main(common + ["--components", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "verified" in err
    out = tmp_path / "c.pt"
    assert monitor_main(common + ["--components", str(table), "--out", str(out)]) == 0
    loaded, record = load_monitor(out, planted)
    assert loaded.units == UNITS and record["provenance"]["units"] == ["L1H2", "L2N37"]
    (tmp_path / "traffic.txt").write_text("\n".join(list(h)[:5] + list(s)[:5]))
    assert monitor_main(["apply", "--model", "planted", "--monitor", str(out), "--prompts",
                         str(tmp_path / "traffic.txt"), "--out", str(tmp_path / "flags.csv")]) == 0
    rows = (tmp_path / "flags.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[2]) for r in rows] == [1] * 5 + [0] * 5


def test_circuit_probe_check_stops_after_its_deepest_unit(tiny):
    from circuitlab.core import hooks as hk
    from tests.conftest import HARMFUL, HARMLESS

    units = (Component("neuron", 0, 3), Component("head", 0, 1))
    fh, fs = (read_features(tiny, x, [], units=units) for x in (HARMFUL, HARMLESS))
    mon = fit_feature_monitor("circuit-probe", fh, fs, fh, fs, units=units, n_model_layers=tiny.n_layers, alpha=0.2)
    assert mon.depth == 1 < tiny.n_layers
    calls = []
    with tiny.hooks([(hk.mlp_out(1), lambda act, hook: calls.append(1))]):
        check = mon.check(tiny, HARMFUL)
    assert not calls and torch.allclose(check.scores, mon.score_features(fh), atol=1e-5)
    with pytest.raises(ValueError, match="were they located on another model"):
        read_features(tiny, HARMFUL, [], units=[Component("neuron", 0, 10_000)])
