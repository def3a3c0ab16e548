"""ITI (Li et al. 2023): α = 0 is the identity, the shift is exactly α·σ·θ on the chosen heads and
nowhere else, held-out head probes find the planted head, and bad parameters fail in one line."""

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlab.core import hooks as hk
from circuitlab.experiments.base import ParameterError
from circuitlab.experiments.iti import InferenceTimeIntervention, match_kl
from circuitlab.methods import metrics
from circuitlab.methods.iti import HeadShift, fit_shifts, iti_hooks, probe_heads, select_heads
from circuitlab.models.planted import PLANTED_HEAD, planted_prompts


def _heads(model, prompts):
    names = [hk.attn_z(l) for l in range(model.n_layers)]
    acts = model.run_with_cache(list(prompts), names, "last")
    return {l: acts[hk.attn_z(l)][:, 0] for l in range(model.n_layers)}


@pytest.fixture(scope="module")
def tiny_shifts(tiny, harmful, harmless):
    return fit_shifts(_heads(tiny, harmful), _heads(tiny, harmless), [(0, 1), (1, 0), (1, 3)])


def test_alpha_zero_changes_nothing(tiny, harmful, tiny_shifts):
    base = tiny.last_logits(list(harmful))
    for positions in ("last", "all"):
        hooked = tiny.last_logits(list(harmful), fwd_hooks=iti_hooks(tiny, tiny_shifts, 0.0, positions))
        assert torch.equal(base, hooked)
    assert not torch.equal(base, tiny.last_logits(list(harmful), fwd_hooks=iti_hooks(tiny, tiny_shifts, 3.0)))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_shift_is_exactly_alpha_sigma_theta_on_chosen_heads(tiny, harmful, tiny_shifts, positions):
    alpha, names = 2.5, [hk.attn_z(l) for l in range(tiny.n_layers)]
    prompts = list(harmful)[:4]
    # whole rows, as the hooked run below computes them, so untouched heads compare bit for bit
    base = tiny.run_with_cache(prompts, names, [-3, -2, -1], share_prefix=False)
    hooks = iti_hooks(tiny, tiny_shifts, alpha, positions)
    # read each layer's z right after that layer's shift and before anything downstream of it
    shifted = tiny.run_with_cache(prompts, names, [-3, -2, -1], fwd_hooks=hooks)
    first = hk.attn_z(0)
    expect = torch.zeros_like(base[first])
    s = tiny_shifts[0]
    rows = slice(None) if positions == "all" else slice(-1, None)
    expect[:, rows, s.head] = alpha * s.sigma * s.direction
    torch.testing.assert_close(shifted[first] - base[first], expect, atol=1e-5, rtol=0)
    unshifted = [h for h in range(tiny.n_heads) if h != s.head]
    assert torch.equal(shifted[first][:, :, unshifted], base[first][:, :, unshifted])  # nothing else in layer 0
    if positions == "last":  # causal: earlier positions never see a last-position shift
        for n in names:
            assert torch.equal(shifted[n][:, :2], base[n][:, :2])


def test_fit_shifts_is_the_mass_mean_direction_and_its_std():
    g = torch.Generator().manual_seed(0)
    h, s = torch.randn(20, 2, 8, generator=g) + 1.0, torch.randn(30, 2, 8, generator=g)
    (shift,) = fit_shifts({3: h}, {3: s}, [(3, 1)])
    theta = h[:, 1].mean(0) - s[:, 1].mean(0)
    theta = theta / theta.norm()
    torch.testing.assert_close(shift.direction, theta)
    proj = torch.cat([h[:, 1], s[:, 1]]) @ theta
    assert shift.sigma == pytest.approx(float(np.std(proj.numpy())), rel=1e-5)


def test_heldout_head_probes_find_the_planted_head(planted):
    h, s = planted_prompts(40, seed=0)
    train_h, train_s = _heads(planted, h[:24]), _heads(planted, s[:24])
    table = probe_heads(train_h, train_s, _heads(planted, h[24:]), _heads(planted, s[24:]))
    assert len(table) == planted.n_layers * planted.n_heads
    assert select_heads(table, 1) == [PLANTED_HEAD]
    assert float(table.loc[(table.layer == PLANTED_HEAD[0]) & (table["head"] == PLANTED_HEAD[1]),
                           "val_accuracy"].iloc[0]) == 1.0
    # shifting the planted head toward "harmful" makes harmless prompts refuse (a defence direction)
    shifts = fit_shifts(train_h, train_s, [PLANTED_HEAD])
    before = metrics.refusal_score(planted, list(s[24:]))
    after = metrics.refusal_score(planted, list(s[24:]), fwd_hooks=iti_hooks(planted, shifts, 20.0))
    assert (after > before + 1.0).all()


def test_select_heads_breaks_accuracy_ties_by_validation_log_loss():
    table = pd.DataFrame({"layer": [0, 5, 3, 1], "head": [0, 1, 2, 3], "val_accuracy": [1.0, 1.0, 0.9, 1.0],
                          "val_log_loss": [0.30, 0.01, 0.001, 0.30]})
    assert select_heads(table, 3) == [(5, 1), (0, 0), (1, 3)]


def test_match_kl_interpolates_a_power_law_exactly():
    coeffs = [0.25, 0.5, 1.0, 2.0]
    coeff, inside = match_kl(coeffs, [c ** 2 for c in coeffs], 0.5 ** 2 * 2)
    assert coeff == pytest.approx(0.5 * 2 ** 0.5) and inside
    assert match_kl(coeffs, [c ** 2 for c in coeffs], 100.0) == (pytest.approx(2.0), False)


def test_bad_parameters_fail_in_one_line(tiny, tiny_shifts):
    cases = [
        (lambda: iti_hooks(tiny, tiny_shifts, 1.0, "first"), "positions='first' is not one of last, all"),
        (lambda: iti_hooks(tiny, [HeadShift(0, 9, torch.ones(tiny.d_head), 1.0)], 1.0), "does not fit the model"),
        (lambda: iti_hooks(tiny, tiny_shifts, float("nan")), "alpha must be a finite number"),
        (lambda: select_heads(pd.DataFrame({"layer": [0], "head": [0], "val_accuracy": [1.0],
                                            "val_log_loss": [0.1]}), 2), "k=2 must be an int between 1"),
        (lambda: fit_shifts({0: torch.zeros(3, 2, 4)}, {0: torch.ones(3, 2, 4)}, [(1, 0)]), "no train activations"),
        (lambda: InferenceTimeIntervention(n_heads=0), "n_heads=0 must be >= 1"),
        (lambda: InferenceTimeIntervention(alphas=[]), "alphas must be a non-empty list"),
        (lambda: InferenceTimeIntervention(positions="first"), "positions='first' is not one of"),
        (lambda: InferenceTimeIntervention(addition_coeffs=[1.0]), "at least 2 positive numbers"),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, ParameterError)) as err:
            make()
        assert message in str(err.value) and "\n" not in str(err.value)
