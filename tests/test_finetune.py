"""Component-restricted fine-tuning: only the chosen slices move, and everything is undone."""

import json

import pytest
import torch

from circuitlab.core.components import Component
from circuitlab.methods import metrics
from circuitlab.defence.adversaries import RefusalAblationAdversary
from circuitlab.defence.finetune import (OPTIMIZERS, REFUSAL_TARGETS, component_masks, count_trainable, full_masks, greedy_targets, load_pairs, make_optimizer,
    random_components, train, train_components)
from circuitlab.core.weights import canonical_parameters, weights_restored
from tests.conftest import HARMFUL, HARMLESS

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


@pytest.mark.parametrize("seed", range(6))
def test_random_control_has_exactly_the_same_parameter_count(tiny, seed):
    """Tiny has 2 query heads per k/v head: heads 0 and 1 of layer 0 share k/v, head 2 of layer 1 does not."""
    chosen = CHOSEN + [Component("head", 0, 2), Component("head", 1, 1), Component("mlp_out", 1)]
    rand = random_components(tiny, chosen, seed=seed)
    assert sorted(c.kind for c in rand) == sorted(c.kind for c in chosen) and not set(rand) & set(chosen)
    assert len(set(rand)) == len(rand)
    assert count_trainable(component_masks(tiny, rand), tiny) == count_trainable(component_masks(tiny, chosen), tiny)


def test_random_control_needs_free_key_value_groups(tiny):
    """Tiny has 2 layers x 2 k/v groups: heads in 3 groups leave 1 free group for the control."""
    with pytest.raises(ValueError, match="fewer heads"):
        random_components(tiny, [Component("head", 0, 0), Component("head", 0, 2), Component("head", 1, 0)])


def test_greedy_targets_are_the_models_own_answers(tiny):
    pairs = greedy_targets(tiny, HARMLESS[:3], max_new_tokens=4)
    answers = tiny.generate(HARMLESS[:3], 4)
    eos = tiny.tokenizer.eos_token
    assert [p for p, _ in pairs] == HARMLESS[:3]
    assert [a.removesuffix(eos) for _, a in pairs] == answers


def test_kl_term_starts_at_zero_and_retain_loss_is_mixed_in(tiny):
    retain = greedy_targets(tiny, HARMLESS[:4], max_new_tokens=6)
    with weights_restored(tiny):
        log = train(tiny, full_masks(tiny), PAIRS, steps=2, lr=1e-3, retain=retain, retain_per_batch=2, kl_weight=1.0)
    assert log["kl"][0] == pytest.approx(0.0, abs=1e-5), "reference logits must be the model's before training"
    assert log["losses"][0] == pytest.approx(log["target_loss"][0] + log["retain_loss"][0], rel=1e-5)
    with pytest.raises(ValueError, match="retain set"):
        train(tiny, full_masks(tiny), PAIRS, steps=1, kl_weight=1.0)


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_retain_set_and_kl_reduce_drift_on_held_out_harmless_prompts(tiny, lr):
    """The over-refusal fix on a small lr grid (4 steps): hardening pairs alone vs + retain set + KL."""
    pairs = [(p, REFUSAL_TARGETS[i % 3]) for i, p in enumerate(HARMFUL[:6])]
    retain = greedy_targets(tiny, HARMLESS[:5], max_new_tokens=8)
    held_out = HARMLESS[5:]
    base = tiny.last_logits(held_out)
    drift, learned = {}, {}
    for name, kw in (("plain", {}), ("retain", {"retain": retain, "kl_weight": 1.0})):
        with weights_restored(tiny):
            log = train(tiny, full_masks(tiny), pairs, steps=4, lr=lr, **kw)
            drift[name] = metrics.kl_divergence(base, tiny.last_logits(held_out)).mean().item()
        learned[name] = log["target_loss"][0] - log["target_loss"][-1]
    assert drift["retain"] < 0.8 * drift["plain"], drift
    assert learned["retain"] > 0.3 * learned["plain"] > 0, learned  # the targets are still learned


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


def test_experiment_equal_parameter_control_and_attack_chosen_on_the_original(tiny, harmful, harmless):
    from circuitlab.experiments import get

    result = get("targeted-finetune")(steps=1, n_neurons=3, n_heads=3, max_new_tokens=2, n_text=2, n_eval=3,
                                      n_retain=3, retain_tokens=3, attack_layers=[0, 1], attack_positions=[-2, -1]
                                      ).run(tiny, harmful, harmless)
    training = result.tables["training"].set_index("variant")
    assert training.loc["targeted", "n_params"] == training.loc["random", "n_params"]
    candidates = result.tables["attack_candidates"]
    assert len(candidates) == 4 and candidates.selected.sum() == 1
    assert (result.summary["attack_layer"], result.summary["attack_position"]) in set(
        zip(candidates.layer, candidates.position))
    wide = result.tables["comparison"].set_index("variant")
    original = wide.loc["original"]
    assert original["harmful_test_refusal_score_ablated"] == original["harmful_test_refusal_score_ablated_fixed"]
    assert training["kl_first"].abs().max() < 1e-5 and (training["n_retain"] == 3).all()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_moves_only_the_chosen_slices(tiny, optimizer):
    """adam / sgd / adafactor leave zero-gradient entries exactly; adam8bit's quantized state would move
    them, so train puts them back after every step (skipped without bitsandbytes)."""
    if optimizer == "adam8bit":
        pytest.importorskip("bitsandbytes")
    before = _snapshot(tiny)
    masks = component_masks(tiny, CHOSEN)
    with weights_restored(tiny):
        train(tiny, masks, PAIRS, steps=2, lr=1e-2, optimizer=optimizer)
        for name, p in canonical_parameters(tiny).items():
            changed = p.detach() != before[name]
            if name in masks:
                assert not changed[~masks[name]].any(), f"{optimizer}: a frozen entry of {name} moved"
                assert changed[masks[name]].any(), f"{optimizer}: {name} did not train"
            else:
                assert not changed.any()
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lion", [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_bf16_weights_train_with_bf16_adam_states():
    """The memory-lean path: bf16 weights, Adam keeps its two states in the weights' dtype (4 bytes a parameter)."""
    from circuitlab import load_model

    model = load_model("tiny", dtype="bfloat16")
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = make_optimizer("adam", [p], 1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    assert {opt.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    masks = component_masks(model, CHOSEN)
    before = _snapshot(model)
    with weights_restored(model):
        log = train(model, masks, PAIRS, steps=3, lr=1e-2)
        for name, m in masks.items():
            assert not (canonical_parameters(model)[name] != before[name])[~m].any()
    assert all(torch.isfinite(torch.tensor(log["losses"])))
    assert log["target_loss"][-1] < log["target_loss"][0]


def test_adversary_checks_its_keys(tiny):
    with pytest.raises(ValueError, match="keys"):
        RefusalAblationAdversary(tiny, HARMFUL, HARMLESS, [(tiny.n_layers, -1)])
    with pytest.raises(ValueError, match="prob"):
        RefusalAblationAdversary(tiny, HARMFUL, HARMLESS, [(0, -1)], prob=0.0)


def test_recovery_openers_are_context_not_targets(tiny):
    """With an opener drawn for every row, the first step's loss is the cross-entropy of ' ' + target +
    end-of-turn AFTER the prompt and the opener: the opener is read, never learnt."""
    from circuitlab.defence.finetune import prefill_openers

    opener, (prompt, target) = prefill_openers()[0], PAIRS[0]
    tok = tiny.tokenizer
    head = tok(tiny.format(prompt, prefill=opener), add_special_tokens=False).input_ids
    tail = tok(" " + target + tok.eos_token, add_special_tokens=False).input_ids
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logits = tiny.final_logits(tiny.final_residual(ids, torch.ones_like(ids)))[0, len(head) - 1:-1]
    expected = torch.nn.functional.cross_entropy(logits.float(), ids[0, len(head):]).item()
    with weights_restored(tiny):
        log = train(tiny, full_masks(tiny), [(prompt, target)], steps=2, lr=1e-3, batch_size=1, openers=(opener,),
                    opener_prob=1.0)
    assert log["target_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert log["prefilled_rows"] == [1, 1]
    with weights_restored(tiny):
        plain = train(tiny, full_masks(tiny), [(prompt, target)], steps=1, lr=1e-3, batch_size=1)
    assert plain["target_loss"][0] != pytest.approx(expected, rel=1e-4) and plain["prefilled_rows"] == [0]
    with pytest.raises(ValueError, match="opener_prob"):
        train(tiny, full_masks(tiny), PAIRS, steps=1, openers=(opener,), opener_prob=0.0)


def test_recovery_openers_hold_out_the_prefill_attack_opener():
    from circuitlab.defence.attacks import PREFILL_OPENER
    from circuitlab.defence.finetune import prefill_openers

    openers = prefill_openers()
    assert len(openers) >= 8 and len(set(openers)) == len(openers)
    assert PREFILL_OPENER not in openers and not any("overview" in o.lower() for o in openers), \
        "the attack's opener must stay held out of training"
    assert not any(metrics.is_refusal(o) for o in openers), "openers are affirmative, not refusals"
