"""Greedy decoding through the TransformerBridge, so every hook sees every generated step.

Exact speed-ups (same greedy tokens as a plain full-forward loop):

- the prefill unembeds only the last prompt position (HF ``logits_to_keep=1``); every hook
  still fires, the ``unembed`` hooks see that one position;
- rows leave the batch as they finish (end-of-sequence, or ``stop_when`` true for their text):
  their rows are dropped from the KV cache and the attention mask, and once half the batch is
  free the next prompts are prefilled and join it, so fewer sequential steps are run;
- one host sync per step (the finished-rows decision), none per token;
- opt-in ``share_prefix``: the prompt tokens common to a batch (chat-template system turn) are
  computed once and their keys/values reused by every row.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Callable, Iterable, Sequence

import torch

from circuitlab.core.progress import progress_bar

__all__ = ["generate", "decode_groups", "greedy_decode", "prefill", "common_prefix_length", "run_prefix"]

StopWhen = Callable[[str], bool]
Group = tuple[list, torch.Tensor, torch.Tensor]  # (keys, input_ids, attention_mask), left-padded


def _prefill_kwargs(bridge) -> dict:
    """``logits_to_keep=1`` where the wrapped HF model accepts it (unembed the last position only)."""
    try:
        params = inspect.signature(bridge.original_model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def common_prefix_length(ids: torch.Tensor, mask: torch.Tensor, keep: int = 1) -> int:
    """Leading real tokens that every row of a left-padded batch shares (each row keeps >= ``keep`` more)."""
    starts = (mask == 0).sum(1, keepdim=True)
    n = int(mask.sum(1).min()) - keep
    if n < 1 or ids.shape[0] < 2:
        return 0
    aligned = ids.gather(1, starts + torch.arange(n, device=ids.device))
    same = (aligned == aligned[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def run_prefix(bridge, ids: torch.Tensor, mask: torch.Tensor, p: int, stop_at_layer: int | None = None, **kwargs):
    """The first ``p`` tokens every row shares, run once at batch size 1: ``(rest, rest_mask, mask, cache)``,
    each row's tokens after them (still left-padded), their mask, the whole mask laid out as
    ``[prefix | padding | rest]`` (positions come from it, so they are unchanged) and the prefix's
    KV cache repeated per row (only the layers before ``stop_at_layer`` when it is set). ``kwargs`` go to
    the prefix forward."""
    starts = (mask == 0).sum(1, keepdim=True)
    prefix = ids.gather(1, starts[:1] + torch.arange(p, device=ids.device))
    if stop_at_layer is None:
        _, cache = bridge(prefix, return_type="logits_and_cache", **kwargs)
    else:  # a stopped forward returns the residual only, so the cache it fills is passed in
        from transformers import DynamicCache

        cache = DynamicCache()
        bridge(prefix, past_key_values=cache, use_cache=True, stop_at_layer=stop_at_layer, **kwargs)
    cache.batch_repeat_interleave(ids.shape[0])
    col = torch.arange(ids.shape[1] - p, device=ids.device).expand(ids.shape[0], -1)
    rest_mask = (col >= starts).to(mask.dtype)
    rest = ids.gather(1, torch.where(col >= starts, col + p, 0))
    return rest, rest_mask, torch.cat([mask.new_ones(ids.shape[0], p), rest_mask], dim=1), cache


def prefill(bridge, ids: torch.Tensor, mask: torch.Tensor, share_prefix: bool = False):
    """The prompt forward: ``(last-position logits [batch, 1, vocab], KV cache, attention mask)``.

    ``share_prefix`` computes the tokens common to all rows (the chat template's system turn)
    once, at batch size 1, then every row's rest on top of that cache (``run_prefix``).
    Hooks then fire twice (prefix, then rest) on shorter inputs: use it only with hooks that
    act on every position and row alike (e.g. directional ablation), not with offset-addressed ones.
    """
    kw = _prefill_kwargs(bridge)
    p = common_prefix_length(ids, mask) if share_prefix else 0
    if p == 0:
        logits, cache = bridge(ids, attention_mask=mask, return_type="logits_and_cache", **kw)
        return logits, cache, mask
    rest, _, mask, cache = run_prefix(bridge, ids, mask, p, **kw)
    logits, cache = bridge(rest, attention_mask=mask, past_key_values=cache,
                           return_type="logits_and_cache", **kw)
    return logits, cache, mask


def _mergeable(cache) -> bool:
    """Whether ``cache`` is a plain per-layer key/value cache that rows can be appended to."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _merge(cache, mask: torch.Tensor, other, other_mask: torch.Tensor):
    """Stack two KV caches and masks along the batch, right-aligned: the shorter is left-padded.

    Padded columns are masked and positions come from the mask, so every row computes as before.
    Columns masked in every row of ``cache`` (left by finished rows) are dropped first.
    """
    lead = int(mask.any(0).long().argmax())
    if lead:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        mask = mask[:, lead:]
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, width - n, 0))  # the sequence dim of [b, h, seq, d]

    for a, b in zip(cache.layers, other.layers):
        a.keys = torch.cat([pad(a.keys, mask.shape[1]), pad(b.keys, other_mask.shape[1])])
        a.values = torch.cat([pad(a.values, mask.shape[1]), pad(b.values, other_mask.shape[1])])
    mask = torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)),
                      torch.nn.functional.pad(other_mask, (width - other_mask.shape[1], 0))])
    return cache, mask


def decode_groups(bridge, next_group: Callable[[int], Group | None], width: int, max_new_tokens: int,
                  eos: Iterable[int], *, stop_when: StopWhen | None = None,
                  decode: Callable[[list[int]], str] | None = None, shrink: bool = True,
                  share_prefix: bool = False) -> dict:
    """Greedy new tokens ``{key: ids}`` for prompt groups, KV-cached, with the bridge's hooks live.

    ``next_group(k)`` gives up to ``k`` more prompts as ``(keys, input_ids, attention_mask)``
    (left-padded), or None when there are none. A row ends at an ``eos`` token (not included),
    after ``max_new_tokens``, or once ``stop_when(decode(tokens))`` is true (that token included).
    With ``shrink``, finished rows leave the KV cache and the mask, and once half of the
    ``width`` rows are free the next prompts are prefilled and join the running batch, so fewer
    sequential steps are run. Hooks then see batches of changing rows: hooks that depend on a
    row's index in the batch (e.g. resample ablation) need ``shrink=False`` (fixed batches).
    ``share_prefix``: see :func:`prefill`.
    """
    if stop_when is not None and decode is None:
        raise ValueError("stop_when needs decode (token ids -> text)")
    eos_t = torch.tensor(sorted({int(e) for e in eos if e is not None}), dtype=torch.long)
    tokens: dict = {}
    live: dict = {}  # key -> still decoding (a finished row stays in the batch only without shrink)
    rows: list = []  # key of each batch row
    logits = cache = mask = None
    exhausted = max_new_tokens <= 0
    while True:
        free = width - len(rows)
        if not exhausted and (not rows or (shrink and free >= max(1, width // 2) and _mergeable(cache))):
            group = next_group(free)
            exhausted = group is None
            if group is not None:
                keys, ids, group_mask = group
                new_logits, new_cache, group_mask = prefill(bridge, ids, group_mask, share_prefix)
                tokens.update((k, []) for k in keys)
                live.update((k, True) for k in keys)
                if rows:
                    logits = torch.cat([logits[:, -1:], new_logits[:, -1:]])
                    cache, mask = _merge(cache, mask, new_cache, group_mask)
                else:
                    logits, cache, mask = new_logits, new_cache, group_mask
                rows = rows + list(keys)
        if not rows:
            break
        nxt = logits[:, -1].argmax(-1)
        eos_t = eos_t.to(nxt.device)
        # the step's only host sync: next tokens and their end-of-sequence flags together
        host_tok, host_eos = torch.stack([nxt, torch.isin(nxt, eos_t).to(nxt.dtype)]).tolist()
        keep = []
        for j, (k, t, end) in enumerate(zip(rows, host_tok, host_eos)):
            if live[k] and not end:
                tokens[k].append(t)
                live[k] = len(tokens[k]) < max_new_tokens and (
                    stop_when is None or not stop_when(decode(tokens[k])))
            else:
                live[k] = False
            if live[k]:
                keep.append(j)
        if not keep:
            rows = []  # this batch is done; the next group starts a fresh one
            continue
        if shrink and len(keep) < len(rows):
            # drop finished rows everywhere, so the next steps compute only live rows
            sel = torch.tensor(keep, device=nxt.device)
            cache.batch_select_indices(sel)
            mask, nxt = mask[sel], nxt[sel]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits, cache = bridge(nxt[:, None], attention_mask=mask, past_key_values=cache,
                               return_type="logits_and_cache")
    return tokens


def greedy_decode(bridge, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  eos: Iterable[int], **kwargs) -> list[list[int]]:
    """Greedy new tokens for each row of one left-padded batch (see :func:`decode_groups`)."""
    groups = iter([(list(range(ids.shape[0])), ids, mask)])
    tokens = decode_groups(bridge, lambda k: next(groups, None), ids.shape[0], max_new_tokens,
                           eos, **kwargs)
    return [tokens.get(i, []) for i in range(ids.shape[0])]


def generate(model, prompts: Sequence[str], max_new_tokens: int = 24, *, chat: bool = True,
             batch_size: int = 16, fwd_hooks: Iterable = (), progress: bool = False,
             desc: str = "generate", stop_when: StopWhen | None = None, shrink: bool = True,
             share_prefix: bool = False, prefill: str | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (KV-cached, batched), with ``fwd_hooks`` active at every step.

    ``prefill``: the assistant turn starts with this text (``HookedModel.format``); the completion
    returned is the continuation after it, without the prefill itself.

    ``stop_when(text_so_far) -> bool`` ends a row early once it is true, e.g.
    ``lambda t: is_refusal(t, phrases)``: a refusal marker, once present, stays in every longer
    text, so the verdict is the one full decoding would give. A stopped row's text is its
    completion up to that step; rows that never stop get exactly their full-decoding text.
    ``shrink`` (rows leave and new prompts join as rows finish) and ``share_prefix``: see
    :func:`decode_groups` and :func:`prefill`.
    """
    tok = model.tokenizer
    eos = {tok.eos_token_id, tok.pad_token_id}

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    # prompts enter the batch shortest first, so little padding is added
    lengths = model.token_lengths(prompts, chat, prefill)
    order = iter(progress_bar(sorted(range(len(prompts)), key=lengths.__getitem__), progress,
                              total=len(prompts), desc=desc))

    def next_group(k: int) -> Group | None:
        idx = list(itertools.islice(order, k))
        return (idx, *model.tokenize([prompts[i] for i in idx], chat, prefill)) if idx else None

    with torch.no_grad(), model.hooks(fwd_hooks):
        tokens = decode_groups(model.bridge, next_group, batch_size, max_new_tokens, eos,
                               stop_when=stop_when, decode=decode, shrink=shrink,
                               share_prefix=share_prefix)
    return [decode(tokens.get(i, [])) for i in range(len(prompts))]
