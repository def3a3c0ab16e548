"""Greedy decoding through the TransformerBridge, so every hook sees every generated step."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .progress import progress_bar

__all__ = ["generate", "greedy_decode"]


def greedy_decode(bridge, ids, mask, max_new_tokens: int, eos: set, pad_id: int) -> list[list[int]]:
    """Greedy decoding with the bridge's KV cache, so hooks see every step."""
    logits, cache = bridge(ids, attention_mask=mask, return_type="logits_and_cache")
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated = []
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        generated.append(nxt)
        done |= torch.tensor([t.item() in eos for t in nxt], device=ids.device)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, cache = bridge(nxt[:, None], attention_mask=mask, past_key_values=cache,
                               return_type="logits_and_cache")
    tokens = torch.stack(generated, 1).tolist()
    return [[t for t in row if t not in eos] for row in tokens]


def generate(model, prompts: Sequence[str], max_new_tokens: int = 24, *, chat: bool = True,
             batch_size: int = 16, fwd_hooks: Iterable = (), progress: bool = False,
             desc: str = "generate") -> list[str]:
    """Greedy completions of ``prompts`` (KV-cached, batched), with ``fwd_hooks`` active at every step."""
    tok = model.tokenizer
    eos = {tok.eos_token_id, tok.pad_token_id}
    outputs: list[str] = [""] * len(prompts)
    with torch.no_grad(), model.hooks(fwd_hooks):
        for idx, ids, mask in progress_bar(model.batches(prompts, batch_size, chat), progress,
                                           total=-(-len(prompts) // batch_size), desc=desc):
            tokens = greedy_decode(model.bridge, ids, mask, max_new_tokens, eos, tok.pad_token_id)
            for row, i in enumerate(idx):
                outputs[i] = tok.decode(tokens[row], skip_special_tokens=True)
    return outputs
