"""Prompt pairs for patching: one harmful and one harmless chat prompt of EQUAL token length.

Activation patching copies an activation at position ``p`` from one run into the other, so the
two runs must have the same positions. Harmful and harmless requests differ in length, so we
choose, and document, how pairs are built:

- ``pairing="length"`` (default): pair each harmful prompt with an unused harmless prompt of
  exactly the same token length (chat template included). Prompts with no equal-length partner
  are dropped and counted (``PairSet.n_unpaired``). No token is invented; template positions align
  because the chat template is the same for both prompts.
- ``pairing="pad"``: as ``length``, then pair the leftovers in order and pad the SHORTER user
  request with a filler token (a space) at the end of the user span, just before the
  post-instruction template, so the template positions (``<|im_end|>`` ... ``assistant``) align.
  The padded prompt is no longer exactly the text it came from; use it only when too few
  equal-length pairs exist.

Positions in result tables are negative offsets from the end (``-1`` = last token), so they
name the same template token in every pair.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

__all__ = ["Pair", "PairSet", "make_pairs", "PAIRINGS"]

PAIRINGS = ("length", "pad")


@dataclass(frozen=True)
class Pair:
    """Token ids (1-D, no padding, same length) of one harmful and one harmless prompt."""

    pair_id: int
    harmful_index: int
    harmless_index: int
    harmful_ids: torch.Tensor
    harmless_ids: torch.Tensor
    padded: bool = False

    @property
    def length(self) -> int:
        return int(self.harmful_ids.shape[0])


@dataclass(frozen=True)
class PairSet:
    pairs: list[Pair]
    n_unpaired: int  # harmful prompts that got no partner

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _ids(model, prompt: str) -> torch.Tensor:
    ids, _ = model.tokenize([prompt])
    return ids[0]


def make_pairs(model, harmful, harmless, *, n_pairs: int | None = None, pairing: str = "length") -> PairSet:
    """Build up to ``n_pairs`` equal-length (harmful, harmless) pairs; see the module docstring."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not one of {PAIRINGS}")
    harmful, harmless = list(harmful), list(harmless)
    if not harmful or not harmless:
        raise ValueError("patching needs at least one harmful and one harmless prompt")
    h_ids = [_ids(model, p) for p in harmful]
    c_ids = [_ids(model, p) for p in harmless]
    free = defaultdict(list)  # token length -> unused harmless indices
    for j, ids in enumerate(c_ids):
        free[len(ids)].append(j)
    pairs, leftovers = [], []
    for i, ids in enumerate(h_ids):
        if free[len(ids)]:
            j = free[len(ids)].pop(0)
            pairs.append((i, j, ids, c_ids[j], False))
        else:
            leftovers.append(i)
    if pairing == "pad":
        unused = sorted(j for js in free.values() for j in js)
        for i, j in zip(leftovers, unused):
            a, b = _pad_to_same_length(model, h_ids[i], c_ids[j])
            pairs.append((i, j, a, b, True))
        leftovers = leftovers[len(unused):]
    pairs.sort(key=lambda t: t[0])
    if n_pairs is not None:
        pairs = pairs[:n_pairs]
    if not pairs:
        raise ValueError("no equal-length harmful/harmless pairs; pass more prompts or pairing='pad'")
    return PairSet([Pair(k, i, j, a, b, pad) for k, (i, j, a, b, pad) in enumerate(pairs)], len(leftovers))


def _pad_to_same_length(model, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert filler tokens at the end of the shorter prompt's user span (before the template suffix)."""
    filler = model.tokenizer(" ", add_special_tokens=False).input_ids[0]
    cut = model.n_post

    def pad(x, n):
        fill = torch.full((n,), filler, dtype=x.dtype, device=x.device)
        return torch.cat([x[: len(x) - cut], fill, x[len(x) - cut:]])

    if len(a) < len(b):
        return pad(a, len(b) - len(a)), b
    return a, pad(b, len(a) - len(b))
