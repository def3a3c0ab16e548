"""Component-restricted fine-tuning: train only chosen weight slices, everything else frozen.

Only the tensors that hold a chosen slice get ``requires_grad``; their gradients are multiplied by
a boolean mask, and Adam without weight decay then leaves every masked-out entry bit-identical
(zero gradient → zero first moment → zero update). Training runs through ``model.hf_model``'s
parameters, which the bridge wraps, so the trained model is the one every experiment reads.
Loss: next-token cross-entropy on the target tokens only (teacher forcing), unembedding only
those positions. Wrap calls in ``monitor.tamper.weights_restored(model)`` to undo them.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from .components import Component
from .model import HookedModel
from .monitor.weights import canonical_parameters, component_slices, slice_masks
from .progress import progress_bar

__all__ = ["train", "train_components", "component_masks", "full_masks", "random_components", "load_pairs",
           "count_trainable", "REFUSAL_TARGETS"]

# Short refusals the project writes itself: the hardening demo's only targets.
REFUSAL_TARGETS = ("I'm sorry, but I can't help with that.", "I'm sorry, but I can't assist with that request.",
                   "I can't help with that. It could cause harm.")


def component_masks(model: HookedModel, components: Sequence[Component]) -> dict[str, torch.Tensor]:
    """``{parameter: bool mask}`` covering exactly the components' slices."""
    return slice_masks(model, component_slices(model, components))


def full_masks(model: HookedModel) -> dict[str, torch.Tensor | None]:
    """Every parameter of every block (embedding/unembedding excluded); None means unmasked."""
    return {n: None for n in canonical_parameters(model) if n.startswith("model.layers.")}


def count_trainable(masks: dict, model: HookedModel) -> int:
    params = canonical_parameters(model)
    return int(sum(params[n].numel() if m is None else m.sum() for n, m in masks.items()))


def random_components(model: HookedModel, components: Sequence[Component], seed: int = 0) -> list[Component]:
    """As many neurons / heads / layers as ``components`` holds, drawn at random, none of the originals.

    Same kinds and counts give the same number of trainable parameters, except that heads sharing a
    grouped-query key/value group share those slices, so the counts then differ (reported by ``train``).
    """
    rng = random.Random(seed)
    taken, out = set(components), []
    for c in components:
        limit = {"neuron": model.d_mlp, "head": model.n_heads}.get(c.kind)
        while True:
            cand = Component(c.kind, rng.randrange(model.n_layers), None if limit is None else rng.randrange(limit))
            if cand not in taken:
                break
        taken.add(cand)
        out.append(cand)
    return out


def _batch(model: HookedModel, pairs, chat: bool):
    """Left-padded ids and mask, plus a bool mask of the target positions (the tokens to predict)."""
    tok = model.tokenizer
    end = tok.eos_token or ""
    seqs, n_target = [], []
    for prompt, target in pairs:
        head = tok(model.format(prompt, chat), add_special_tokens=False).input_ids
        tail = tok(target + end, add_special_tokens=False).input_ids if chat else []
        if not chat:
            n_target.append(len(head) - 1)
            seqs.append(head)
        else:
            n_target.append(len(tail))
            seqs.append(head + tail)
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    target = torch.zeros_like(mask, dtype=torch.bool)
    for row, n in enumerate(n_target):
        target[row, width - n:] = True  # positions whose token is predicted
    return ids.to(model.device), mask.to(model.device), target.to(model.device)


def train(model: HookedModel, masks: dict[str, torch.Tensor | None], pairs: Sequence[tuple[str, str]], *,
          steps: int, lr: float = 1e-4, batch_size: int = 4, chat: bool = True, raw_text: bool = False,
          seed: int = 0, progress: bool = False) -> dict:
    """Adam on the masked parameters for ``steps`` steps over ``pairs`` (cycled, shuffled with ``seed``).

    ``raw_text=True``: ``pairs`` are ``(text, "")`` and the loss covers every token of the raw text.
    Returns losses per step, seconds, and the number of trainable parameters.
    """
    if not pairs:
        raise ValueError("no training pairs given")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    params = canonical_parameters(model)
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"no parameter named {unknown[0]!r}; names look like {next(iter(params))!r}")
    chosen = [params[n] for n in masks]
    was = {id(p): p.requires_grad for p in params.values()}
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    losses, start = [], time.perf_counter()
    opt = torch.optim.Adam(chosen, lr=lr, weight_decay=0.0)
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        for step in progress_bar(range(steps), progress, total=steps, desc="fine-tune"):
            rows = [pairs[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
            ids, mask, target = _batch(model, rows, chat and not raw_text)
            resid = model.final_residual(ids, mask)
            # the token at t+1 is predicted from position t: read positions shifted left by one
            pred_pos = torch.roll(target, -1, dims=1)
            pred_pos[:, -1] = False
            logits = model.final_logits(resid[pred_pos]).float()
            loss = torch.nn.functional.cross_entropy(logits, ids[target])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            with torch.no_grad():
                for name, p in zip(masks, chosen):
                    if masks[name] is not None:
                        p.grad.mul_(masks[name])
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params.values():
            p.requires_grad_(was[id(p)])
            p.grad = None
    return {"losses": losses, "seconds": time.perf_counter() - start, "n_params": count_trainable(masks, model)}


def train_components(model: HookedModel, components: Sequence[Component], pairs, **kwargs) -> dict:
    """``train`` on exactly the components' weight slices."""
    return train(model, component_masks(model, components), pairs, **kwargs)


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, target) pairs from a csv (columns ``prompt``, ``target``) or jsonl (same keys)."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        raise ValueError(f"{path}: use a .csv or .jsonl file with 'prompt' and 'target' fields")
    pairs = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "prompt" not in r or "target" not in r:
            raise ValueError(f"{path}: record {i} needs 'prompt' and 'target' fields")
        pairs.append((str(r["prompt"]), str(r["target"])))
    if not pairs:
        raise ValueError(f"{path}: no (prompt, target) pairs")
    return pairs

