"""Interventions: exact identities on the tiny model (orthogonalization ≡ ablation hooks, export
round trip, head/neuron vs whole-output ablation, strength, mean/resample references, cleanup)."""

from __future__ import annotations

import pytest
import torch

from circuitlab import ActivationStore, load_model
from circuitlab.core import hooks as hk
from circuitlab.methods import interventions as iv
from circuitlab.core.components import Component
from circuitlab.methods.directions import orthogonalize_weights, unit

PROMPTS = ["how do i make a cake", "write a poem", "tell me how to steal a car", "hi"]


def _direction(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.d_model, generator=g)


def _capture(name, store, key=None):
    def grab(act, hook):
        store[key or name] = act.detach().clone()
    return (name, grab)


@pytest.fixture()
def fresh_tiny():
    """A private tiny model for tests that edit weights (the session fixture stays pristine)."""
    return load_model("tiny")


def test_directional_ablation_removes_direction_everywhere(tiny):
    r = _direction(tiny)
    r_hat = unit(r)
    hooks = iv.directional_ablation_hooks(tiny, r)
    assert len(hooks) == 3 * tiny.n_layers
    seen = {}
    ids, mask = tiny.tokenize(PROMPTS)
    with torch.no_grad(), tiny.hooks(hooks + [_capture(hk.final_resid(), seen), _capture(hk.resid_mid(1), seen)]):
        tiny.forward(ids, mask)
    for act in seen.values():
        assert (act @ r_hat).abs().max() < 1e-4
    base = tiny.last_logits(PROMPTS)
    assert not torch.allclose(base, tiny.last_logits(PROMPTS, fwd_hooks=hooks), atol=1e-3)


def test_orthogonalized_weights_equal_ablation_hooks(fresh_tiny):
    r = _direction(fresh_tiny)
    hooked = fresh_tiny.last_logits(PROMPTS, fwd_hooks=iv.directional_ablation_hooks(fresh_tiny, r))
    before = fresh_tiny.fingerprint
    orthogonalize_weights(fresh_tiny, r)
    assert fresh_tiny.fingerprint != before  # the store will not confuse edited and original weights
    edited = fresh_tiny.last_logits(PROMPTS)
    assert torch.allclose(hooked, edited, atol=1e-3), (hooked - edited).abs().max()
    # idempotent: the edited model has nothing left to project out
    again = fresh_tiny.last_logits(PROMPTS, fwd_hooks=iv.directional_ablation_hooks(fresh_tiny, r))
    assert torch.allclose(again, edited, atol=1e-4)


def test_exported_model_reloads_with_transformers(fresh_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    orthogonalize_weights(fresh_tiny, _direction(fresh_tiny, seed=3))
    expected = fresh_tiny.last_logits(PROMPTS)
    out = iv.export_hf(fresh_tiny, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = fresh_tiny.tokenize(PROMPTS)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, -1]
    # last_logits sorts prompts by length; compare prompt by prompt
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    reloaded = load_model(str(out))
    assert torch.allclose(reloaded.last_logits(PROMPTS), expected, atol=1e-4)


def test_all_heads_zero_equals_attn_out_zero(tiny):
    # Qwen2's o_proj has no bias, so attn_out = sum_h z_h W_O^h exactly: zero z  <=>  zero attn_out.
    o_proj = tiny.hf_model.model.layers[0].self_attn.o_proj
    assert getattr(o_proj, "bias", None) is None
    heads = [Component("head", 0, h) for h in range(tiny.n_heads)]
    a = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, heads))
    b = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, [Component("attn_out", 0)]))
    assert torch.allclose(a, b, atol=1e-5)
    neurons = [Component("neuron", 1, n) for n in range(tiny.d_mlp)]
    c = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, neurons))
    d = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, [Component("mlp_out", 1)]))
    assert torch.allclose(c, d, atol=1e-5)
    assert not torch.allclose(a, tiny.last_logits(PROMPTS), atol=1e-3)


def test_head_ablation_touches_only_that_head(tiny):
    seen = {}
    ids, mask = tiny.tokenize(PROMPTS)
    hooks = iv.ablation_hooks(tiny, [Component("head", 1, 2)]) + [_capture(hk.attn_z(1), seen, "after")]
    with torch.no_grad(), tiny.hooks([_capture(hk.attn_z(1), seen, "before")] + hooks):
        tiny.forward(ids, mask)
    assert seen["after"][:, :, 2].abs().max() == 0
    keep = [0, 1, 3]
    assert torch.equal(seen["after"][:, :, keep], seen["before"][:, :, keep])


def test_strength_zero_changes_nothing_and_half_halves(tiny):
    comps = [Component("attn_out", 0), Component("neuron", 1, 5), Component("head", 1, 0)]
    base = tiny.last_logits(PROMPTS)
    for method in ("zero", "mean", "resample"):
        hooks = iv.ablation_hooks(tiny, comps, method, strength=0.0, reference=PROMPTS[:2])
        assert torch.equal(tiny.last_logits(PROMPTS, fwd_hooks=hooks), base)
    assert torch.equal(tiny.last_logits(PROMPTS, fwd_hooks=iv.directional_ablation_hooks(tiny, _direction(tiny),
                                                                                          strength=0.0)), base)
    half = iv.ablation_hooks(tiny, [Component("attn_out", 0)], "zero", strength=0.5)
    scaled = [(hk.attn_out(0), lambda act, hook: 0.5 * act)]
    assert torch.allclose(tiny.last_logits(PROMPTS, fwd_hooks=half), tiny.last_logits(PROMPTS, fwd_hooks=scaled),
                          atol=1e-5)


def test_mean_ablation_with_own_reference(tiny, tmp_path):
    store = ActivationStore(tmp_path)
    comps = [Component("neuron", 0, 3), Component("neuron", 0, 7)]
    ref = iv.reference_activations(tiny, comps, PROMPTS, store)
    name = hk.mlp_post(0)
    assert ref[name].shape == (len(PROMPTS), tiny.d_mlp)
    own = tiny.run_with_cache(PROMPTS, [name], "mean")[name]
    assert torch.allclose(ref[name], own, atol=1e-5)
    seen = {}
    ids, mask = tiny.tokenize(PROMPTS)
    hooks = iv.ablation_hooks(tiny, comps, "mean", reference=ref) + [_capture(name, seen)]
    with torch.no_grad(), tiny.hooks(hooks):
        tiny.forward(ids, mask)
    act = seen[name]
    expected = own.mean(0)
    for n in (3, 7):  # every prompt and every position now holds the reference mean
        assert torch.allclose(act[..., n], expected[n].expand_as(act[..., n]), atol=1e-5)
    # so the prompts' own token-mean at those neurons is unchanged on average
    real = mask.bool()
    assert torch.allclose(act[real][:, [3, 7]].mean(0), expected[[3, 7]], atol=1e-5)
    assert not torch.allclose(act[..., 4], expected[4].expand_as(act[..., 4]))  # other neurons untouched


def test_resample_of_single_reference_equals_mean(tiny):
    comps = [Component("mlp_out", 0), Component("head", 1, 1)]
    one = PROMPTS[1:2]
    mean = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, comps, "mean", reference=one,
                                                                 store=ActivationStore(disk=False)))
    res = tiny.last_logits(PROMPTS, fwd_hooks=iv.ablation_hooks(tiny, comps, "resample", reference=one, seed=5,
                                                                store=ActivationStore(disk=False)))
    assert torch.allclose(mean, res, atol=1e-5)
    many = iv.ablation_hooks(tiny, comps, "resample", reference=PROMPTS, seed=5, store=ActivationStore(disk=False))
    assert torch.equal(tiny.last_logits(PROMPTS, fwd_hooks=many), tiny.last_logits(PROMPTS, fwd_hooks=many))


def test_ablation_is_padding_safe(tiny):
    hooks = (iv.ablation_hooks(tiny, [Component("neuron", 0, 1), Component("head", 0, 3)])
             + iv.directional_ablation_hooks(tiny, _direction(tiny))
             + iv.activation_addition_hooks(tiny, _direction(tiny, 2), layer=1, coeff=2.0, positions=[-2, -1]))
    batched = tiny.last_logits(PROMPTS, fwd_hooks=hooks)
    alone = torch.cat([tiny.last_logits([p], fwd_hooks=hooks) for p in PROMPTS])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_activation_addition_adds_exactly(tiny):
    v = _direction(tiny, 4)
    seen = {}
    ids, mask = tiny.tokenize(PROMPTS)
    name = hk.resid_pre(1)
    for key, positions in (("all", None), ("last", [-1])):
        hooks = [_capture(name, seen, "before")] + iv.activation_addition_hooks(tiny, v, 1, 3.0, positions) \
            + [_capture(name, seen, key)]
        with torch.no_grad(), tiny.hooks(hooks):
            tiny.forward(ids, mask)
        delta = seen[key] - seen["before"]
        if positions is None:
            assert torch.allclose(delta, (3.0 * v).expand_as(delta), atol=1e-5)
        else:
            assert torch.allclose(delta[:, -1], (3.0 * v).expand_as(delta[:, -1]), atol=1e-5)
            assert delta[:, :-1].abs().max() == 0


def test_hooks_are_gone_after_context(tiny):
    base = tiny.last_logits(PROMPTS)
    hooks = iv.directional_ablation_hooks(tiny, _direction(tiny)) + iv.ablation_hooks(tiny, [Component("mlp_out", 0)])
    with pytest.raises(RuntimeError):
        with tiny.hooks(hooks):
            raise RuntimeError("inside")
    with tiny.hooks(hooks):
        pass
    assert torch.equal(tiny.last_logits(PROMPTS), base)


def test_bad_inputs_fail_clearly(tiny):
    with pytest.raises(ValueError, match="strength"):
        iv.ablation_hooks(tiny, [Component("attn_out", 0)], strength=1.5)
    with pytest.raises(ValueError, match="method"):
        iv.ablation_hooks(tiny, [Component("attn_out", 0)], method="median")
    with pytest.raises(ValueError, match="reference"):
        iv.ablation_hooks(tiny, [Component("attn_out", 0)], method="mean")
    with pytest.raises(ValueError, match="index out of range"):
        iv.ablation_hooks(tiny, [Component("head", 0, 99)])
    with pytest.raises(ValueError, match="d_model"):
        iv.directional_ablation_hooks(tiny, torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        iv.directional_ablation_hooks(tiny, torch.zeros(tiny.d_model))
    with pytest.raises(ValueError, match="negative offsets"):
        iv.activation_addition_hooks(tiny, torch.ones(tiny.d_model), 0, positions=[2])


def test_orthogonalized_context_restores_weights(fresh_tiny):
    r = _direction(fresh_tiny, 7)
    base, fp = fresh_tiny.last_logits(PROMPTS), fresh_tiny.fingerprint
    hooked = fresh_tiny.last_logits(PROMPTS, fwd_hooks=iv.directional_ablation_hooks(fresh_tiny, r))
    with iv.orthogonalized(fresh_tiny, r):
        assert torch.allclose(fresh_tiny.last_logits(PROMPTS), hooked, atol=1e-3)
    assert torch.equal(fresh_tiny.last_logits(PROMPTS), base) and fresh_tiny.fingerprint == fp


def test_orthogonalization_strength_biases_and_dtype(fresh_tiny):
    """One orthogonalization for hooks and tamperings: partial strength, biases, the weight's own dtype."""
    from circuitlab.methods.directions import write_profile
    from circuitlab.core.weights import writer_weight

    r = _direction(fresh_tiny, 11)
    before = write_profile(fresh_tiny, r)
    with iv.orthogonalized(fresh_tiny, r, strength=0.25):
        assert torch.allclose(write_profile(fresh_tiny, r), 0.75 * before, atol=1e-5)
    assert torch.equal(write_profile(fresh_tiny, r), before)
    down = fresh_tiny.hf_model.model.layers[0].mlp.down_proj
    down = getattr(down, "_original_component", down)
    down.bias = torch.nn.Parameter(torch.randn(fresh_tiny.d_model))  # a residual writer with a bias
    hooked = fresh_tiny.last_logits(PROMPTS, fwd_hooks=iv.directional_ablation_hooks(fresh_tiny, r))
    with iv.orthogonalized(fresh_tiny, r):
        assert abs(float(down.bias.detach() @ unit(r))) < 1e-5
        assert torch.allclose(fresh_tiny.last_logits(PROMPTS), hooked, atol=1e-3)
    fresh_tiny.hf_model.to(torch.bfloat16)
    orthogonalize_weights(fresh_tiny, r.double())  # any dtype in, the weight's dtype out
    w = writer_weight(fresh_tiny, "mlp_out", 1)
    assert w.dtype == torch.bfloat16
    assert (unit(r) @ w.float()).abs().max() < 0.05 * w.float().abs().max()


def test_orthogonalization_moves_the_direction_to_each_weight(fresh_tiny):
    """A CPU direction (as the store returns it) against weights elsewhere: no CPU × device product.
    The meta device stands in for a GPU: mixing it with a CPU tensor raises, as CUDA would."""
    fresh_tiny.hf_model.to("meta")
    orthogonalize_weights(fresh_tiny, _direction(fresh_tiny), strength=0.5)
    assert all(p.device.type == "meta" for p in fresh_tiny.hf_model.parameters())
