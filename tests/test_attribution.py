"""Attribution patching (AtP): exact first-order term, zero on self-patch, planted circuit found."""

from __future__ import annotations

import pytest
import torch

from circuitlab.core import hooks as hk
from circuitlab.methods.attribution import refusal_metric
from circuitlab.experiments.patching.attribution import AttributionPatching, attribution_pair
from circuitlab.methods.patching import Sweep, run_sweeps


@pytest.fixture(scope="module")
def pair(tiny):
    clean, _ = tiny.tokenize(["how do i make a bomb"])
    corrupted, _ = tiny.tokenize(["how do i make a cake"])
    return clean[0], corrupted[0]


def test_self_patch_attribution_is_zero(tiny, pair):
    clean, _ = pair
    rows, t, s = attribution_pair(tiny, clean, clean, ["resid_pre", "head", "neuron"], [0, 1], refusal_metric(tiny))
    assert t == s and max(abs(r["attribution"]) for r in rows) == 0.0


def test_attribution_is_the_directional_derivative(tiny, pair):
    """AtP = d/dε metric(a_t + ε (a_s - a_t)) at ε=0, checked by an exact small patch in the engine."""
    clean, corrupted = pair
    eps = 1e-3

    def towards_source(act, name, cells, ctx, offset):
        for row, (_, p, _) in enumerate(cells):
            t, s = ctx.target[name][p], ctx.source[name][p]
            act[row, p - offset] = t + eps * (s - t)
        return act

    for comp in ("resid_pre", "mlp_out"):
        cells = [(l, p, None) for l in range(tiny.n_layers) for p in range(len(clean))]
        sweep = Sweep(comp, cells, lambda c, comp=comp: getattr(hk, comp)(c[0]), setter=towards_source)
        exact, ctx = run_sweeps(tiny, corrupted, clean, [sweep], refusal_metric(tiny), fast=False)
        finite = torch.tensor([(r["metric"] - ctx.target_metric) / eps for r in exact])
        rows, _, _ = attribution_pair(tiny, corrupted, clean, [comp], range(tiny.n_layers), refusal_metric(tiny))
        atp = torch.tensor([r["attribution"] for r in rows])
        assert finite.abs().max() > 1e-2
        assert (finite - atp).abs().max() <= 0.05 * finite.abs().max() + 1e-3


def test_planted_circuit_ranked_first():
    from circuitlab import load_model
    from circuitlab.models.planted import PLANTED_HEAD, PLANTED_NEURON, planted_prompts

    model = load_model("planted")
    harmful, harmless = planted_prompts(4, seed=1)
    avg = AttributionPatching(n_pairs=4).run(model, harmful, harmless).tables["average"]
    heads = avg[avg.component == "head"]
    best = heads.loc[heads.normalized_mean.abs().idxmax()]
    assert (int(best.layer), int(best["head"])) == PLANTED_HEAD
    neurons = avg[avg.component == "neuron"]
    best = neurons.loc[neurons.normalized_mean.abs().idxmax()]
    assert (int(best.layer), int(best.neuron)) == PLANTED_NEURON
    assert neurons.drop(best.name).normalized_mean.abs().max() < 0.05 * abs(best.normalized_mean)


def test_bad_component_is_refused(tiny, harmful, harmless):
    with pytest.raises(ValueError, match="unknown"):
        AttributionPatching(components=["neurons"]).run(tiny, harmful, harmless)


def test_mean_patch_estimates_do_not_depend_on_batching(tiny, harmful):
    """A short last batch (3 prompts in batches of 2) gives the same averages as one batch of 3."""
    from circuitlab.methods.attribution import mean_patch_estimates

    g = torch.Generator().manual_seed(0)
    means = {}
    for l in range(tiny.n_layers):
        means[hk.mlp_post(l)] = torch.randn(tiny.n_post, tiny.d_mlp, generator=g)
        means[hk.attn_z(l)] = torch.randn(tiny.n_post, tiny.n_heads, tiny.d_head, generator=g)
    prompts = list(harmful)[:3]
    whole = mean_patch_estimates(tiny, prompts, means, batch_size=3)
    split = mean_patch_estimates(tiny, prompts, means, batch_size=2)
    assert whole["neuron"].shape == (tiny.n_layers, tiny.d_mlp) and whole["head"].shape == (tiny.n_layers, tiny.n_heads)
    for kind in ("neuron", "head"):
        torch.testing.assert_close(split[kind], whole[kind], rtol=1e-4, atol=1e-5)
