"""Exact activation patching: invariants, agreement with TransformerLens, planted circuit."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tlp

from circuitlab.core import hooks as hk
from circuitlab.experiments.patching.activation import ActivationPatching, layer_sweeps, refusal_metric
from circuitlab.methods.patching import Sweep, run_sweeps
from circuitlab.methods.pairs import make_pairs

TOL = 1e-4


def _grid(rows, n_layers):
    return torch.tensor([r["metric"] for r in rows]).view(n_layers, -1)


def _tl_metric(model):
    metric = refusal_metric(model)
    return lambda logits: metric(logits[:, -1]).mean()


def test_self_patch_changes_nothing(tiny, pair):
    clean, _ = pair
    sweeps = layer_sweeps(tiny, ["resid_pre", "attn_out", "mlp_out", "head"], range(tiny.n_layers),
                          range(len(clean)))
    for fast in (False, True):
        rows, ctx = run_sweeps(tiny, clean, clean, sweeps, refusal_metric(tiny), fast=fast)
        values = torch.tensor([r["metric"] for r in rows])
        assert (values - ctx.target_metric).abs().max() <= 1e-5
    assert all(r["skipped"] for r in rows), "fast engine must recognise every self-patch as a no-op"


@pytest.mark.parametrize("fast", [False, True])
def test_resid_pre_layer0_all_positions_reproduces_clean(tiny, pair, fast):
    clean, corrupted = pair
    sweep = Sweep("resid_pre", [(0, None, None)], lambda c: hk.resid_pre(c[0]))
    rows, ctx = run_sweeps(tiny, corrupted, clean, [sweep], refusal_metric(tiny), fast=fast)
    assert abs(ctx.source_metric - ctx.target_metric) > 1e-3, "the pair must differ for this test to mean anything"
    assert abs(rows[0]["metric"] - ctx.source_metric) <= 1e-5


TL_FUNCTIONS = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
                "mlp_out": tlp.get_act_patch_mlp_out, "head": tlp.get_act_patch_attn_head_out_all_pos,
                "head_by_pos": tlp.get_act_patch_attn_head_out_by_pos}


@pytest.fixture(scope="module")
def tl_grids(tiny, pair):
    """TransformerLens's own patching results (clean = harmful, run = harmless), computed once."""
    clean, corrupted = pair
    _, cache = tiny.bridge.run_with_cache(clean[None])
    return {k: fn(tiny.bridge, corrupted[None], cache, _tl_metric(tiny)).cpu() for k, fn in TL_FUNCTIONS.items()}


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "mlp_out", "head"])
def test_matches_transformer_lens(tiny, pair, tl_grids, kind):
    clean, corrupted = pair
    expected = tl_grids[kind]
    assert expected.abs().max() > 1.0 and expected.std() > 1e-3  # a non-trivial grid
    positions = [] if kind == "head" else range(len(clean))
    for fast in (False, True):
        sweeps = layer_sweeps(tiny, [kind], range(tiny.n_layers), positions)
        rows, _ = run_sweeps(tiny, corrupted, clean, sweeps, refusal_metric(tiny), fast=fast, batch_size=7)
        assert (_grid(rows, tiny.n_layers) - expected).abs().max() <= TOL, f"fast={fast}"


def test_heads_by_position_match_transformer_lens(tiny, pair, tl_grids):
    clean, corrupted = pair
    sweeps = layer_sweeps(tiny, ["head"], range(tiny.n_layers), range(len(clean)), head_positions=True)
    rows, _ = run_sweeps(tiny, corrupted, clean, sweeps, refusal_metric(tiny), fast=True)
    got = torch.tensor([r["metric"] for r in rows]).view(tiny.n_layers, len(clean), tiny.n_heads)
    assert (got - tl_grids["head_by_pos"]).abs().max() <= TOL


def test_pairs_have_equal_length_and_pad_aligns_template(tiny, harmful, harmless):
    pairs = make_pairs(tiny, harmful, harmless, pairing="length")
    assert len(pairs) + pairs.n_unpaired == len(harmful)
    assert all(p.harmful_ids.shape == p.harmless_ids.shape and not p.padded for p in pairs)
    padded = make_pairs(tiny, harmful, harmless, pairing="pad")
    assert len(padded) == len(harmful) and any(p.padded for p in padded)
    for p in padded:  # the post-instruction template sits at the same negative offsets
        n = tiny.n_post
        assert torch.equal(p.harmful_ids[-n:], p.harmless_ids[-n:])
    with pytest.raises(ValueError, match="pairing"):
        make_pairs(tiny, harmful, harmless, pairing="align")


def test_experiment_normalization_and_modes(tiny, harmful, harmless):
    """Patching the whole resid_pre at layer 0 gives normalized 1 (denoise) and 0 (noise)."""
    for mode, expected in (("denoise", 1.0), ("noise", 0.0)):
        exp = ActivationPatching(components=["resid_pre"], per_position=False, layers=[0], mode=mode, n_pairs=3)
        table = exp.run(tiny, harmful, harmless).table
        assert len(table) == 3 and set(table.pair_id) == {0, 1, 2}
        assert (table.normalized - expected).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="mode"):
        ActivationPatching(mode="sideways").run(tiny, harmful, harmless)


@pytest.fixture(scope="module")
def planted_run():
    from circuitlab import load_model
    from circuitlab.models.planted import planted_prompts

    model = load_model("planted")
    harmful, harmless = planted_prompts(6, seed=1)
    exp = ActivationPatching(n_pairs=6)
    return exp.run(model, harmful, harmless), model


def test_planted_head_carries_the_effect(planted_run):
    from circuitlab.models.planted import PLANTED_HEAD

    result, _ = planted_run
    heads = result.tables["average"].query("component == 'head'")
    best = heads.loc[heads.normalized_mean.abs().idxmax()]
    assert (int(best.layer), int(best["head"])) == PLANTED_HEAD and best.normalized_mean > 0.5
    others = heads[(heads.layer != PLANTED_HEAD[0]) | (heads["head"] != PLANTED_HEAD[1])]
    assert others.normalized_mean.abs().max() < 0.2


def test_planted_neuron_layer_and_positions(planted_run):
    from circuitlab.models.planted import FEATURE_LAYER, PLANTED_NEURON

    result, model = planted_run
    avg = result.tables["average"]
    mlp = avg[avg.component == "mlp_out"]
    best = mlp.loc[mlp.normalized_mean.abs().idxmax()]
    assert (int(best.layer), int(best.position)) == (PLANTED_NEURON[0], -1) and best.normalized_mean > 0.5
    assert mlp.drop(best.name).normalized_mean.abs().max() < 0.2
    resid = avg[avg.component == "resid_pre"]
    last = resid[resid.position == -1].set_index("layer").normalized_mean
    # The feature reaches the last position at FEATURE_LAYER, not before.
    assert last.loc[FEATURE_LAYER:].min() > 0.5 and last.loc[:FEATURE_LAYER - 1].abs().max() < 0.2
    # Before it arrives, the effect sits at the keyword position (some earlier position).
    early = resid[resid.layer == 0]
    assert early.loc[early.normalized_mean.idxmax()].position < -1


@pytest.mark.parametrize("name, params", [
    ("activation-patching", dict(n_pairs=3, positions="last")),
    ("attribution-patching", dict(n_pairs=3, components=["resid_pre", "head"])),
    ("path-patching", dict(n_pairs=2, receivers=["logits"])),
    ("pattern-patching", dict(n_pairs=2)),
])
def test_pair_units_are_independent_and_picklable(tiny, harmful, harmless, name, params):
    """Every pair-patching variant is a UnitExperiment whose units can run anywhere, in any order
    (what circuitlab.distributed relies on): units and state survive pickling, and running the units
    in reverse order then merging gives exactly the table of ``run``."""
    import pickle

    import pandas as pd

    from circuitlab import experiments
    from circuitlab.experiments.base import UnitExperiment

    exp = experiments.get(name)(**params)
    assert isinstance(exp, UnitExperiment)
    plan = exp.plan(tiny, harmful, harmless)
    units, state = pickle.loads(pickle.dumps((plan.units, plan.state)))
    outputs = {i: pickle.loads(pickle.dumps(exp.run_unit(tiny, state, units[i])))
               for i in reversed(range(len(units)))}
    merged = exp.merge(tiny, harmful, harmless, plan, [outputs[i] for i in range(len(units))])
    expected = exp.run(tiny, harmful, harmless)
    pd.testing.assert_frame_equal(merged.table, expected.table, check_exact=True)
    pd.testing.assert_frame_equal(merged.tables["average"], expected.tables["average"], check_exact=True)
