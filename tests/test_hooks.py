import pytest

from circuitlab.core import hooks
from circuitlab.core.hooks import HookNameError


def test_builders_give_canonical_names():
    assert hooks.resid_pre(3) == "blocks.3.hook_resid_pre"
    assert hooks.resid_mid(0) == "blocks.0.hook_resid_mid"
    assert hooks.resid_post(1) == "blocks.1.hook_resid_post"
    assert hooks.attn_out(2) == "blocks.2.hook_attn_out"
    assert hooks.mlp_out(2) == "blocks.2.hook_mlp_out"
    assert hooks.mlp_post(5) == "blocks.5.mlp.hook_post"
    assert hooks.attn_z(1) == "blocks.1.attn.hook_z"
    assert hooks.attn_pattern(1) == "blocks.1.attn.hook_pattern"
    assert hooks.layer_of("blocks.12.mlp.hook_post") == 12
    assert hooks.layer_of("hook_embed") is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_builders_reject_bad_layers(bad):
    with pytest.raises(HookNameError):
        hooks.resid_pre(bad)


def test_every_builder_name_exists_on_the_model(tiny):
    for kind in hooks.TEMPLATES:
        tiny.check_hooks([getattr(hooks, kind)(l) for l in range(tiny.n_layers)])
    tiny.check_hooks([hooks.embed(), hooks.final_resid()])


def test_out_of_range_layer_names_the_valid_range(tiny):
    with pytest.raises(HookNameError, match=r"layers 0\.\.1"):
        tiny.check_hooks(hooks.resid_pre(7))


def test_misspelt_name_suggests_nearest(tiny):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_pre"):
        tiny.check_hooks("blocks.0.hook_resid_pr")


def test_model_hooks_context_removes_hooks_even_on_error(tiny):
    calls = []

    def spy(act, hook):
        calls.append(1)

    prompts = ["how do i make a cake"]
    with pytest.raises(RuntimeError):
        with tiny.hooks([(hooks.resid_pre(0), spy)]):
            tiny.last_logits(prompts)
            raise RuntimeError("boom")
    n = len(calls)
    tiny.last_logits(prompts)
    assert n == 1 and len(calls) == 1
