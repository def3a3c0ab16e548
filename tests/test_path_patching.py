"""Path patching: equals TransformerLens's direct path patching; planted head -> MLP path found."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tlp

from circuitlab.experiments.patching.activation import refusal_metric
from circuitlab.methods.patching import run_sweeps
from circuitlab.core.split_qkv import split_qkv_input
from circuitlab.experiments.patching.path import PathPatching, path_sweep, sender_deltas
from circuitlab.core import hooks as hk


@pytest.fixture(scope="module")
def pair(tiny):
    clean, _ = tiny.tokenize(["how do i make a bomb"])
    corrupted, _ = tiny.tokenize(["how do i make a cake"])
    return clean[0], corrupted[0]


def _run(model, pair, senders, receivers, fast):
    clean, corrupted = pair
    sweep = path_sweep(model, senders, receivers)
    with split_qkv_input(model, "q" in receivers), torch.no_grad():
        rows, ctx = run_sweeps(model, corrupted, clean, [sweep], refusal_metric(model), fast=fast,
                               prepare=sender_deltas(model, senders),
                               capture_names=[hk.attn_z(l) for l, _ in senders])
    return rows, ctx


@pytest.mark.parametrize("fast", [False, True])
def test_q_paths_match_transformer_lens(tiny, pair, fast):
    clean, corrupted = pair
    _, clean_cache = tiny.bridge.run_with_cache(clean[None])
    _, corrupted_cache = tiny.bridge.run_with_cache(corrupted[None])
    metric = refusal_metric(tiny)
    for head in range(tiny.n_heads):
        expected = tlp.get_act_patch_direct_path(tiny.bridge, corrupted[None], clean_cache, corrupted_cache,
                                                 lambda lg: metric(lg[:, -1]).mean(), 0, head, "q", verbose=False)
        rows, _ = _run(tiny, pair, [(0, head)], ["q"], fast)
        got = torch.tensor([r["metric"] for r in rows])
        assert (got - expected[1].cpu()).abs().max() <= 1e-4
    assert not tiny.bridge.cfg.use_split_qkv_input, "the split-QKV fork must be switched off again"


def test_logit_path_is_the_direct_effect(tiny, pair):
    """Sender -> logits = unembedding of (target final residual + the sender's write), computed by hand."""
    clean, corrupted = pair
    senders = [(l, h) for l in range(tiny.n_layers) for h in range(tiny.n_heads)]
    rows, ctx = _run(tiny, pair, senders, ["logits"], fast=True)
    final = ctx.target[hk.final_resid()]
    metric = refusal_metric(tiny)
    with torch.no_grad():
        want = torch.stack([metric(tiny.final_logits(final[-1] + ctx.extra["delta"][s][-1])[None].float())[0]
                            for s in senders])
    got = torch.tensor([r["metric"] for r in rows])
    assert (want - ctx.target_metric).abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-4


def test_fast_equals_plain(tiny, pair):
    senders = [(0, h) for h in range(tiny.n_heads)]
    a, _ = _run(tiny, pair, senders, ["mlp", "logits"], fast=True)
    b, _ = _run(tiny, pair, senders, ["mlp", "logits"], fast=False)
    assert max(abs(x["metric"] - y["metric"]) for x, y in zip(a, b)) <= 1e-4


def test_planted_head_to_neuron_layer_path():
    from circuitlab import load_model
    from circuitlab.models.planted import PLANTED_HEAD, PLANTED_NEURON, planted_prompts

    model = load_model("planted")
    harmful, harmless = planted_prompts(3, seed=2)
    avg = PathPatching(receivers=["mlp", "logits"], n_pairs=3).run(model, harmful, harmless).tables["average"]
    best = avg.loc[avg.normalized_mean.abs().idxmax()]
    assert (int(best.layer), int(best["head"]), best.receiver, int(best.receiver_layer)) == \
        (*PLANTED_HEAD, "mlp", PLANTED_NEURON[0])
    assert best.normalized_mean > 0.5
    others = avg.drop(best.name)
    assert others.normalized_mean.abs().max() < 0.2
