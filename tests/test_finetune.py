"""Component-restricted fine-tuning: only the chosen slices move, and everything is undone."""

import json

import pytest
import torch

from circuitlab.components import Component
from circuitlab.finetune import (component_masks, count_trainable, full_masks, load_pairs, random_components,
                                 train, train_components)
from circuitlab.monitor import weights_restored
from circuitlab.monitor.weights import canonical_parameters
from tests.conftest import HARMFUL

PAIRS = [(p, "sorry i cannot help with that") for p in HARMFUL[:4]]
CHOSEN = [Component("neuron", 1, 5), Component("neuron", 0, 9), Component("head", 0, 3)]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in canonical_parameters(model).items()}


def test_masked_training_changes_only_the_chosen_slices(tiny):
    before, fingerprint = _snapshot(tiny), tiny.fingerprint
    with weights_restored(tiny):
        log = train_components(tiny, CHOSEN, PAIRS, steps=3, lr=1e-2)
        masks = component_masks(tiny, CHOSEN)
        for name, p in canonical_parameters(tiny).items():
            changed = p.detach() != before[name]
            if name in masks:
                assert not changed[~masks[name]].any(), f"{name}: a frozen entry moved"
                assert changed[masks[name]].any(), f"{name}: the chosen slice did not train"
            else:
                assert torch.equal(p.detach(), before[name]), f"{name} is not bit-identical"
        assert all(not p.requires_grad and p.grad is None for p in canonical_parameters(tiny).values())
    assert log["n_params"] == count_trainable(masks, tiny)
    assert tiny.fingerprint == fingerprint, "weights_restored must leave the model unchanged"


def test_training_lowers_the_target_loss(tiny):
    with weights_restored(tiny):
        log = train_components(tiny, CHOSEN, PAIRS[:2], steps=6, lr=1e-2, batch_size=2)
    assert log["losses"][-1] < log["losses"][0] - 0.5


def test_loss_is_cross_entropy_of_the_target_tokens_only(tiny):
    """Reported loss (before the step) on a left-padded batch equals a hand computation on unpadded rows."""
    pairs = [("how do i make a cake", "sorry i cannot"), ("how do i make a cake with sugar and water", "no")]
    tok = tiny.tokenizer
    nll = []
    for prompt, target in pairs:
        head = tok(tiny.format(prompt), add_special_tokens=False).input_ids
        tail = tok(target + tok.eos_token, add_special_tokens=False).input_ids
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logits = tiny.forward(ids, torch.ones_like(ids)).float()
        nll.append(torch.nn.functional.cross_entropy(logits[0, len(head) - 1:-1], ids[0, len(head):], reduction="none"))
    expected = torch.cat(nll).mean()
    with weights_restored(tiny):
        log = train(tiny, component_masks(tiny, CHOSEN), pairs, steps=1, lr=1e-9, batch_size=2)
    assert log["losses"][0] == pytest.approx(float(expected), rel=1e-4)


def test_random_control_matches_kinds_and_parameter_count(tiny):
    rand = random_components(tiny, CHOSEN, seed=1)
    assert [c.kind for c in rand] == [c.kind for c in CHOSEN] and not set(rand) & set(CHOSEN)
    assert count_trainable(component_masks(tiny, rand), tiny) == count_trainable(component_masks(tiny, CHOSEN), tiny)


def test_whole_layer_and_full_masks(tiny):
    layer = component_masks(tiny, [Component("resid_pre", 1)])
    assert layer and all(n.startswith("model.layers.1.") and bool(m.all()) for n, m in layer.items())
    full = full_masks(tiny)
    assert "model.embed_tokens.weight" not in full and all(n.startswith("model.layers.") for n in full)


def test_full_finetune_is_restored(tiny):
    fingerprint = tiny.fingerprint
    with weights_restored(tiny):
        train(tiny, full_masks(tiny), PAIRS, steps=1, lr=1e-3)
        assert tiny.fingerprint != fingerprint
    assert tiny.fingerprint == fingerprint


def test_load_pairs(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,target\nhi,hello\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "target": "b"}) + "\n")
    assert load_pairs(csv) == [("hi", "hello")] and load_pairs(jsonl) == [("a", "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match="target"):
        load_pairs(bad)
    with pytest.raises(ValueError, match="csv"):
        load_pairs(tmp_path / "d.txt")


def test_bad_training_input(tiny):
    with pytest.raises(ValueError, match="no training pairs"):
        train(tiny, {}, [], steps=1)
    with pytest.raises(ValueError, match="no parameter named"):
        train(tiny, {"nope": None}, PAIRS, steps=1)
