"""Greedy generation: early stops, shrinking batches, last-position prefill, all exact."""

from __future__ import annotations

import pytest
import torch

from circuitlab.core.generation import greedy_decode
from circuitlab.methods.metrics import is_refusal

from conftest import HARMFUL, HARMLESS

PROMPTS = HARMFUL + HARMLESS
FEW = HARMFUL[:5] + HARMLESS[:5]  # for the slow one-prompt-at-a-time reference


def reference(model, prompts, n, eos=None, stop_when=None):
    """The plain algorithm: one prompt at a time, no KV cache, a full forward per new token."""
    tok = model.tokenizer
    eos = {tok.eos_token_id, tok.pad_token_id} if eos is None else set(eos)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids, _ = model.tokenize([p])
            new = []
            for _ in range(n):
                t = model.bridge(ids)[0, -1].argmax().item()
                if t in eos:
                    break
                new.append(t)
                ids = torch.cat([ids, torch.tensor([[t]], device=ids.device)], 1)
                if stop_when is not None and stop_when(tok.decode(new, skip_special_tokens=True)):
                    break
            out.append(tok.decode(new, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("name", ["tiny", "planted"])
def test_generate_matches_plain_full_forward_decoding(name, request):
    model = request.getfixturevalue(name)
    assert model.generate(FEW, 6, batch_size=8) == reference(model, FEW, 6)


def test_early_stop_and_eos_match_plain_decoding_and_shrink_the_batch(planted):
    """Rows end on ' sorry' (as eos) or on a stop text; finished rows leave cache and mask."""
    tok = planted.tokenizer
    sorry = tok(" sorry", add_special_tokens=False).input_ids
    assert len(sorry) == 1
    eos = {tok.eos_token_id, tok.pad_token_id, sorry[0]}
    stop = lambda t: "water" in t or "virus" in t  # noqa: E731
    want = reference(planted, FEW, 8, eos=eos, stop_when=stop)
    batch_rows = []
    hook = ("blocks.0.hook_resid_pre", lambda act, hook: batch_rows.append(act.shape[0]))
    ids, mask = planted.tokenize(FEW)
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    with torch.no_grad(), planted.hooks([hook]):
        got = greedy_decode(planted.bridge, ids, mask, 8, eos, stop_when=stop, decode=decode)
    assert [decode(t) for t in got] == want
    assert any(stop(t) for t in want) and any(len(t) == 0 for t in want)  # both exits happened
    assert batch_rows[0] == len(FEW) and batch_rows == sorted(batch_rows, reverse=True)
    assert batch_rows[-1] < len(FEW)


@pytest.mark.parametrize("name", ["tiny", "planted"])
def test_stopped_rows_keep_their_verdict_and_others_their_full_text(name, request):
    model = request.getfixturevalue(name)
    full = model.generate(PROMPTS, 12, batch_size=8)
    words = ("sorry",) if name == "planted" else ("kill", "water", "plant", "virus")
    judge = lambda t: is_refusal(t, words)  # noqa: E731
    early = model.generate(PROMPTS, 12, batch_size=8, stop_when=judge)
    assert [judge(t) for t in early] == [judge(t) for t in full]
    assert 0 < sum(map(judge, full)) < len(PROMPTS)
    for e, f in zip(early, full):
        assert e == f if not judge(e) else (f.startswith(e) and len(e) <= len(f))
    assert sum(map(len, early)) < sum(map(len, full))


def test_prefill_unembeds_only_the_last_position_and_every_hook_fires(tiny):
    seen = {}

    def recorder(name):
        return lambda act, hook: seen.setdefault(name, []).append(tuple(act.shape))

    names = ["hook_embed", "blocks.1.hook_resid_post", "ln_final.hook_in", "unembed.hook_in",
             "unembed.hook_out"]
    ids, _ = tiny.tokenize(PROMPTS[:3])
    tiny.generate(PROMPTS[:3], 4, batch_size=3, fwd_hooks=[(n, recorder(n)) for n in names])
    width = ids.shape[1]
    assert all(len(seen[n]) == 4 for n in names)  # prefill + 3 decode steps
    assert seen["ln_final.hook_in"][0] == (3, width, tiny.d_model)
    assert seen["unembed.hook_in"][0] == (3, 1, tiny.d_model)
    assert seen["unembed.hook_out"][0][:2] == (3, 1)


# test_early_verdicts_equal_full_decoding_on_the_embedded_model lives in test_embedded.py (one embedded load)


@pytest.mark.parametrize("name", ["tiny", "planted"])
def test_shared_prefix_prefill_gives_the_same_logits_and_tokens(name, request):
    from circuitlab.core.generation import common_prefix_length, prefill

    model = request.getfixturevalue(name)
    ids, mask = model.tokenize(PROMPTS)
    p = common_prefix_length(ids, mask)
    assert p >= 3  # at least the "<|im_start|>user\n" template tokens
    with torch.no_grad():
        plain, _, _ = prefill(model.bridge, ids, mask)
        shared, cache, full_mask = prefill(model.bridge, ids, mask, share_prefix=True)
    assert cache.get_seq_length() == full_mask.shape[1] == ids.shape[1]
    assert (plain - shared).abs().max() < 1e-4
    want = model.generate(PROMPTS, 8, batch_size=8)
    assert model.generate(PROMPTS, 8, batch_size=8, share_prefix=True) == want
    # also with early stops and a shrinking batch on top of the shared-prefix cache
    stop = lambda t: "sorry" in t or "water" in t  # noqa: E731
    early = model.generate(PROMPTS, 8, batch_size=8, share_prefix=True, stop_when=stop)
    assert early == model.generate(PROMPTS, 8, batch_size=8, stop_when=stop)


def test_without_shrink_rows_stay_in_the_batch_with_the_same_texts(planted):
    stop = lambda t: "sorry" in t  # noqa: E731
    rows = []
    hook = ("blocks.0.hook_resid_pre", lambda act, hook: rows.append(act.shape[0]))
    kept = planted.generate(PROMPTS, 6, batch_size=20, stop_when=stop, shrink=False,
                            fwd_hooks=[hook])
    assert set(rows) == {20}
    assert kept == planted.generate(PROMPTS, 6, batch_size=20, stop_when=stop)


def test_new_prompts_join_the_running_batch_as_rows_finish(planted):
    """Width 6 over 20 prompts: harmful rows stop at once, later prompts take their places."""
    stop = lambda t: "sorry" in t  # noqa: E731
    shapes = []
    hook = ("blocks.0.hook_resid_pre", lambda act, hook: shapes.append(tuple(act.shape[:2])))
    got = planted.generate(PROMPTS, 6, batch_size=6, stop_when=stop, fwd_hooks=[hook])
    fixed = planted.generate(PROMPTS, 6, batch_size=6, stop_when=stop, shrink=False)
    assert got == fixed == [t[:len(g)] for t, g in zip(planted.generate(PROMPTS, 6), got)]
    prefills = [s for s in shapes if s[1] > 1]
    assert len(prefills) > -(-len(PROMPTS) // 6)  # refills on top of the 4 fixed batches
    assert max(rows for rows, _ in shapes) <= 6
    assert len(shapes) < 4 * 7  # fewer forwards than 4 fixed batches of prefill + 6 steps
