"""Redundant-circuits hardening (``defence.redundant``) and combined hardening modes (``defence.modes``)."""

import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.core.weights import weights_restored
from circuitlab.defence.finetune import full_masks, train
from circuitlab.defence.modes import check_modes, mode_parts
from circuitlab.defence.redundant import MechanismAdversary


@pytest.fixture(scope="module")
def sets():
    from circuitlab.models.planted import planted_prompts

    h, s = (list(p) for p in planted_prompts(32, seed=0))
    return {"h": h[:8], "s": s[:8]}


def test_mechanism_adversary_ablates_every_mechanism_but_the_kept_one(planted, sets):
    """Each step keeps one mechanism and ablates the others: the unit hooks set the top units to their
    harmless means, the direction hooks project the current direction out; both kept ones appear."""
    adv = MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], n_units=2, refresh_every=3, seed=0)
    mechanisms = adv.compute()
    unit_names = {n for n, _ in mechanisms["top_units"]}
    direction_names = {n for n, _ in mechanisms["top_direction"]}
    assert unit_names and direction_names and not unit_names & direction_names
    kept = []
    for step in range(6):
        hooks, rows = adv(step, 4)
        names = {n for n, _ in hooks}
        kept.append(adv.history[-1][1])
        assert names == (direction_names if kept[-1] == "top_units" else unit_names)
        assert rows.dtype == torch.bool and rows.all()  # prob=1
    assert set(kept) == {"top_units", "top_direction"} and adv.refreshes == [0, 3]


def test_joint_adversary_ablates_every_mechanism_at_every_step(planted, sets):
    """``keep=0`` (the joint mode): the unit and the direction hooks act together on every step, none kept."""
    adv = MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], n_units=2, keep=0, seed=0)
    every = {n for hooks in adv.compute().values() for n, _ in hooks}
    for step in range(3):
        hooks, _ = adv(step, 4)
        assert {n for n, _ in hooks} == every and adv.history[-1] == (step, None)
    with pytest.raises(ValueError, match="keep"):
        MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], keep=2)


def test_direction_mechanism_removes_the_current_direction_from_the_residual(planted, sets):
    adv = MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], n_units=2, seed=0)
    direction = adv._direction.compute()[0]
    captured = {}

    def grab(act, hook):
        captured["x"] = act.detach().clone()
    with planted.hooks(adv.compute()["top_direction"] + [(hk.resid_pre(2), grab)]):
        planted.last_logits(sets["h"][:2])
    assert (captured["x"].float() @ direction.float()).abs().max() < 1e-4


def test_redundant_training_runs_and_logs_its_ablations(planted, sets):
    with weights_restored(planted):
        adv = MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], n_units=2, prob=0.5, seed=1)
        log = train(planted, full_masks(planted), [(p, " sorry") for p in sets["h"]], steps=3, lr=1e-3,
                    batch_size=2, adversary=adv)
    assert len(adv.history) == 3 and 0 < sum(log["ablated_rows"]) <= 6 and all(map(torch.isfinite, map(torch.tensor, log["losses"])))


@pytest.mark.parametrize("kwargs, message", [
    ({"mechanisms": ["top_units"]}, "at least two"), ({"mechanisms": ["top_units", "edges"]}, "at least two"),
    ({"n_units": 0}, "n_units"), ({"prob": 0.0}, "prob")])
def test_mechanism_adversary_refuses_bad_settings(planted, sets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MechanismAdversary(planted, sets["h"], sets["s"], [(2, -1)], **kwargs)


def test_modes_combine_with_plus_and_refuse_bad_combinations():
    assert mode_parts("distributed+recovery") == ("distributed", "recovery")
    assert mode_parts("redundant") == ("redundant",)
    for bad, message in (("plain+recovery", "cannot be combined"), ("distributed+redundant", "one adversary"),
                         ("joint+adversarial", "one adversary"),
                         ("recovery+recovery", "twice"), ("deep", "not one of")):
        with pytest.raises(ValueError, match=message):
            mode_parts(bad)
    with pytest.raises(ValueError, match="twice"):
        check_modes(["plain", "plain"])
    with pytest.raises(ValueError, match="empty"):
        check_modes([])


def test_robust_hardening_trains_redundant_and_a_combined_mode(tiny, harmful, harmless, tmp_path):
    from circuitlab.experiments import get

    exp = get("robust-hardening")(steps=2, n_neurons=3, n_heads=1,
                                  modes=["redundant", "distributed+recovery", "joint+recovery"],
                                  recovery_prob=1.0, n_mechanism_units=2, n_train=2, batch_size=2, n_retain=2,
                                  retain_tokens=2, judge=False, n_text=1, n_eval=3, n_val=2, n_attack=4, n_adv=3,
                                  k_grid=[1], n_dirs=[1], n_boot=20, attack_layers=[1], attack_positions=[-1],
                                  suite=["prefill"], progress=False)
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    training = result.tables["training"].set_index("mode")
    assert training.loc["redundant", "ablated_rows"] > 0 and training.loc["redundant", "prefilled_rows"] == 0
    combined = training.loc["distributed+recovery"]
    assert combined.ablated_rows > 0 and combined.prefilled_rows == 4  # both remedies acted
    assert training.loc["joint+recovery", "ablated_rows"] > 0 and training.loc["joint+recovery", "prefilled_rows"] == 4
    assert {"redundant", "distributed+recovery", "joint+recovery"} <= set(result.tables["comparison"]["mode"])
    with pytest.raises(ValueError, match="one adversary"):
        get("robust-hardening")(modes=["adversarial+redundant"])
