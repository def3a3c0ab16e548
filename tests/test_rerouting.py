"""Circuit Breakers' representation rerouting: the loss it adds, that it reroutes, and that it is undone."""

import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.core.components import Component
from circuitlab.core.weights import weights_restored
from circuitlab.defence.finetune import component_masks, full_masks, greedy_targets, train
from circuitlab.defence.rerouting import Rerouting, default_layers
from tests.conftest import HARMFUL, HARMLESS

PAIRS = [(p, "sorry i cannot help with that") for p in HARMFUL[:4]]


def _cos_to_original(model, prompts, layer, original):
    acts = model.run_with_cache(prompts, [hk.resid_pre(layer)], "post")[hk.resid_pre(layer)].float()
    return torch.nn.functional.cosine_similarity(acts, original, dim=-1).mean().item()


def test_default_layers_follow_the_paper():
    assert default_layers(32) == [11, 21] and default_layers(2) == [1] and default_layers(24) == [8, 16]


def test_first_step_loss_is_alpha_times_the_cosine_one():
    """At step 0 the weights are the original's: cos(h, h_orig) = 1, so the added loss is exactly alpha."""
    r = Rerouting([1], alpha=3.0)
    now = torch.randn(2, 5, 8)
    r._now, r._orig = {1: now}, {1: now.clone()}
    at = torch.ones(2, 5, dtype=torch.bool)
    assert r.loss(0, 10, at, torch.zeros_like(at)).item() == pytest.approx(3.0, rel=1e-5)
    r._now, r._orig = {1: now}, {1: -now}
    assert r.loss(10, 10, at, torch.zeros_like(at)).item() == 0.0  # opposite: relu(cos) = 0, retain weight on nothing


def test_rerouting_moves_harmful_representations_keeps_harmless_and_is_undone(tiny):
    """Trained with rerouting at layer 1 (lr 1e-2, measured: plain cos 0.39 / 0.35, rerouting 0.75 / 0.88 for
    harmful / harmless), the harmless representations stay near the original's, far nearer than under the
    plain loss, the harmful ones turn away more than the harmless ones, and the weights come back."""
    layer, harmful, harmless = 1, list(HARMFUL[:4]), list(HARMLESS[:4])
    name = hk.resid_pre(layer)
    orig_h = tiny.run_with_cache(harmful, [name], "post")[name].float()
    orig_s = tiny.run_with_cache(harmless, [name], "post")[name].float()
    retain = greedy_targets(tiny, harmless, 3)
    masks = {n: m for n, m in full_masks(tiny).items() if ".layers.0." in n}  # layer 0 writes into resid_pre 1
    fingerprint, cos = tiny.fingerprint, {}
    for label, rerouting in (("plain", None), ("rerouting", Rerouting([layer], alpha=10.0))):
        with weights_restored(tiny):
            log = train(tiny, masks, PAIRS, steps=8, lr=1e-2, batch_size=2, retain=retain, seed=0,
                        rerouting=rerouting)
            cos[label] = (_cos_to_original(tiny, harmful, layer, orig_h), _cos_to_original(tiny, harmless, layer, orig_s))
        assert tiny.fingerprint == fingerprint
    assert log["rerouting"][0]["reroute_cos"] == pytest.approx(1.0, abs=1e-4)  # step 0: the original's own
    assert cos["rerouting"][1] > cos["plain"][1] + 0.2, cos
    assert cos["rerouting"][0] < cos["rerouting"][1] - 0.05, cos


def test_rerouting_refuses_layers_outside_the_model(tiny):
    with pytest.raises(ValueError, match="not in 0.."):
        train(tiny, component_masks(tiny, [Component("neuron", 0, 1)]), PAIRS, steps=1,
              rerouting=Rerouting([tiny.n_layers]))
    with pytest.raises(ValueError, match="alpha"):
        Rerouting([0], alpha=0)


def test_experiment_rerouting_mode_records_its_layers_and_reading(tiny, harmful, harmless, tmp_path):
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=1, modes=["rerouting"], n_train=2, batch_size=2,
                                  n_retain=2, retain_tokens=2, judge=False, n_text=1, n_eval=3, n_val=2, n_attack=4,
                                  n_adv=3, k_grid=[1], n_dirs=[1], n_boot=20, attack_layers=[1],
                                  attack_positions=[-1], suite=["direction_ablation"], progress=False)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    assert result.summary["reroute_layers"] == ",".join(map(str, default_layers(tiny.n_layers)))
    assert result.summary["rerouting_reading"].startswith(f"L{default_layers(tiny.n_layers)[0]}:")
    training = result.tables["training"]
    assert training["mode"].tolist() == ["rerouting"] and training.reroute_cos_last.notna().all()
