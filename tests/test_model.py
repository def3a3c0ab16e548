import torch

from circuitlab.core import hooks
from circuitlab import load_model


def test_tiny_is_deterministic(tiny):
    again = load_model("tiny")
    assert again.fingerprint == tiny.fingerprint
    assert (tiny.n_layers, tiny.d_model, tiny.n_heads) == (2, 64, 4)


def test_fingerprint_changes_when_a_weight_changes():
    model = load_model("tiny")
    before = model.fingerprint
    with torch.no_grad():
        next(model.hf_model.parameters())[0, 0] += 1.0
    assert model.fingerprint != before


def test_chat_format_and_post_instruction_tokens(tiny):
    text = tiny.format("hello there")
    assert text.startswith("<|im_start|>user\nhello there<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny.format("hello", chat=False) == "hello"
    ids, _ = tiny.tokenize(["hello there"])
    suffix = tiny.tokenizer.decode(ids[0, -tiny.n_post:])
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"


def test_left_padded_batch_matches_single_runs(tiny, harmful):
    prompts = list(harmful)[:4]
    batched = tiny.last_logits(prompts, batch_size=4)
    single = torch.cat([tiny.last_logits([p], batch_size=1) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4)


def test_last_logits_equal_full_forward(tiny, harmful):
    prompts = list(harmful)[:3]
    ids, mask = tiny.tokenize(prompts)
    full = tiny.forward(ids, mask)[:, -1].float().cpu()  # last_logits returns CPU float32
    assert torch.allclose(tiny.last_logits(prompts, batch_size=3), full, atol=1e-5)


def test_run_with_cache_positions_and_order(tiny, harmful):
    prompts = list(harmful)[:5]
    name = hooks.resid_pre(1)
    last = tiny.run_with_cache(prompts, [name], "last", batch_size=2)[name]
    post = tiny.run_with_cache(prompts, [name], "post", batch_size=5)[name]
    mean = tiny.run_with_cache(prompts, [name], "mean")[name]
    assert last.shape == (5, 1, 64) and post.shape == (5, tiny.n_post, 64) and mean.shape == (5, 64)
    assert torch.allclose(post[:, -1], last[:, 0], atol=1e-5)
    # each prompt alone gives the same row: batching and sorting keep input order
    for i, p in enumerate(prompts):
        alone = tiny.run_with_cache([p], [name], "last")[name]
        assert torch.allclose(alone[0], last[i], atol=1e-4)



def test_run_with_cache_runs_a_batch_shared_prefix_once(tiny, harmful, harmless):
    """End-relative positions: the chat template's system turn runs once at batch size 1, the rest on
    its keys/values; the activations are the full forward's (fwd_hooks turn the sharing off)."""
    prompts = list(harmful) + list(harmless)
    names = [hooks.resid_pre(1), hooks.mlp_post(0), hooks.attn_z(1)]
    ids, mask = tiny.tokenize(prompts)
    widths = []
    with tiny.hooks([(hooks.resid_pre(0), lambda act, hook: widths.append(tuple(act.shape[:2])))]):
        shared = tiny.run_with_cache(prompts, names, "post", batch_size=len(prompts))
    p = widths[0][1]
    assert widths == [(1, p), (len(prompts), ids.shape[1] - p)] and p >= 3
    full = tiny.run_with_cache(prompts, names, "post", batch_size=len(prompts),
                               fwd_hooks=[(names[0], lambda act, hook: act)])
    for n in names:
        assert shared[n].shape == full[n].shape and torch.allclose(shared[n], full[n], atol=1e-4), n
    # identical prompts share everything but the positions asked for, which stay in the rest
    twice = tiny.run_with_cache([prompts[0]] * 2, names, "post", batch_size=2)
    once = tiny.run_with_cache([prompts[0]], names, "post", batch_size=1)
    assert all(torch.allclose(twice[n], once[n].expand_as(twice[n]), atol=1e-4) for n in names)

def test_generate_is_greedy_and_batched(tiny, harmful):
    prompts = list(harmful)[:3]
    batch = tiny.generate(prompts, max_new_tokens=6, batch_size=3)
    single = [tiny.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batch == single
