"""Component-restricted fine-tuning: train only chosen weight slices, everything else frozen.

Only the tensors that hold a chosen slice get ``requires_grad``; their gradients are multiplied by
a boolean mask, and Adam without weight decay then leaves every masked-out entry bit-identical
(zero gradient → zero first moment → zero update). Training runs through ``model.hf_model``'s
parameters, which the bridge wraps, so the trained model is the one every experiment reads.
Loss: next-token cross-entropy on the target tokens only (teacher forcing), unembedding only
those positions. Against side effects (over-refusal after hardening), an optional *retain set* —
harmless prompts paired with the model's own greedy answers, generated at run time by
``greedy_targets`` — is mixed into every batch (self-distillation), and an optional KL penalty keeps
the next-token distribution at the end of each retain prompt close to the model's before training
(the KL-to-reference term of RLHF / "learning without forgetting", Li & Hoiem 2016). Wrap calls in
``weights.weights_restored(model)`` to undo them.

Adversarial hardening (ReFAT: Yu et al. 2024, "Robust LLM Safeguarding via Refusal Feature
Adversarial Training"): ``adversaries.RefusalAblationAdversary`` recomputes the difference-in-means refusal
direction(s) on the weights being trained every ``refresh_every`` steps and ``train(adversary=...)``
projects them out of the residual stream (``interventions.directional_ablation_hooks``) on the
hardening rows of the batch only (never on the retain rows), so refusal must be learnt without them.

Memory (``optimizer=``; weights in bf16 via ``load_model(..., dtype="bfloat16")``). Only the tensors
holding a chosen slice get gradients and optimizer state, but for the WHOLE tensor (the mask zeroes
the rest). Bytes per parameter of a touched tensor: gradient = weight dtype (2 in bf16); state:
``adam`` 2 × weight dtype (torch keeps Adam state in the parameter's dtype: 4 bytes in bf16, 8 in fp32),
``adam8bit`` (bitsandbytes ``Adam8bit``) 2 + a frozen copy of 2 (its quantized zero state is not exactly
zero, so masked entries would drift: they are put back after every step), ``adafactor``
(transformers) ~0 (row + column second moments), ``sgd`` 0. A 7B Qwen2.5 (7.6e9 parameters, 28
layers, d_model 3584, d_mlp 18944) in bf16 is 15.2 GB. Located neurons touch gate/up/down of their
layer (3·3584·18944 = 204M parameters), heads touch q/k/v/o (~2·3584² + 2·3584·512 = 29M): with
neurons in all 28 layers, 5.7e9 touched parameters → gradient 11.4 GB, + adam (bf16 states) 22.8 GB
= 49 GB + activations (~7 GB for batch 8 × 256 tokens) = ~56 GB: fits one 80 GB GPU; adam8bit also 49 GB
(states 11.4 + frozen copy 11.4: the copy eats the saving, but updates are computed in fp32 per block),
adafactor / sgd ~27 GB + activations; fp32 Adam states (45.6 GB) → 72 GB + activations: does not fit.
Neurons in 8 layers: 15.2 + 1.6·(2+4) = 25 GB with adam. Full fine-tuning of all 7.6e9 with bf16 Adam = 15.2·4 = 61 GB + activations: tight.
Caveat: bf16 weights round away updates below ~0.4 % of a weight (lr ≥ 1e-4 needed in practice).
Here (2-core CPU, no GPU) all four run; ``adam8bit`` needs ``pip install bitsandbytes`` (0.50.2
imports and steps on this CPU; it is not a project dependency).
"""

from __future__ import annotations

import csv
import json
import random
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from circuitlab.core.components import Component
from circuitlab.core.model import HookedModel
from circuitlab.core.progress import progress_bar
from circuitlab.defence.adversaries import on_rows
from circuitlab.core.weights import canonical_parameters, component_slices, kv_group_size, slice_masks

__all__ = ["train", "train_components", "component_masks", "full_masks", "random_components", "load_pairs",
           "count_trainable", "greedy_targets", "REFUSAL_TARGETS", "OPTIMIZERS", "make_optimizer",
           "extended_refusals", "refusal_targets",
           "TARGET_STYLES", "prefill_openers"]

OPTIMIZERS = ("adam", "adam8bit", "adafactor", "sgd")

# Short refusals the project writes itself: the hardening demo's only targets.
REFUSAL_TARGETS = ("I'm sorry, but I can't help with that.", "I'm sorry, but I can't assist with that request.",
                   "I can't help with that. It could cause harm.")


TARGET_STYLES = ("short", "extended")


def _data_lines(name: str) -> tuple[str, ...]:
    """The non-comment lines of ``circuitlab/data/<name>``."""
    text = resources.files("circuitlab").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#"))


def extended_refusals() -> tuple[str, ...]:
    """Multi-sentence refusals written by the project (``circuitlab/data/extended_refusals.txt``): the
    *extended refusal* remedy's targets (Abu Shairah et al. 2025, arXiv 2505.19056: refusals that explain
    and refuse over several sentences spread refusal over more of the representation)."""
    return _data_lines("extended_refusals.txt")


def prefill_openers() -> tuple[str, ...]:
    """Harmless affirmative openers written by the project (``circuitlab/data/prefill_openers.txt``): the
    ``recovery`` hardening mode starts the assistant turn with one and teaches the refusal after it (Qi et al.
    2025, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"). The prefill attack's own
    opener is not among them: it stays held out for the test."""
    return _data_lines("prefill_openers.txt")


def refusal_targets(style: str = "short") -> tuple[str, ...]:
    """The hardening targets of a style: ``short`` (``REFUSAL_TARGETS``) or ``extended`` (``extended_refusals``)."""
    if style not in TARGET_STYLES:
        raise ValueError(f"targets={style!r}; use one of {', '.join(TARGET_STYLES)}")
    return REFUSAL_TARGETS if style == "short" else extended_refusals()


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
    """A random control set with the same kinds, the same counts and exactly as many trainable parameters.

    Neurons and whole-layer kinds: as many drawn at random (none of the originals). Heads: grouped-query
    attention shares the k/v slices among the heads of a key/value group, so heads are drawn group by
    group — for every (layer, kv group) the originals occupy with k heads, an unused random (layer, kv
    group) gets k random heads of its own. Overlaps (a drawn neuron inside a drawn whole layer) change the
    count, so draws are repeated until the count is exactly equal; raises if that never happens.
    """
    rng = random.Random(seed)
    group = kv_group_size(model)
    head_groups: dict[tuple[int, int], int] = {}
    for c in components:
        if c.kind == "head":
            key = (c.layer, c.index // group)
            head_groups[key] = head_groups.get(key, 0) + 1
    n_free = model.n_layers * (model.n_heads // group) - len(head_groups)
    if n_free < len(head_groups):
        raise ValueError(f"{len(head_groups)} key/value groups hold the chosen heads but only {n_free} other groups "
                         "exist: choose fewer heads for a random control")
    want = count_trainable(component_masks(model, components), model)
    for _ in range(200):
        out = _draw_control(model, components, head_groups, group, rng)
        if count_trainable(component_masks(model, out), model) == want:
            return out
    raise ValueError(f"no random set with exactly {want} trainable parameters found in 200 draws: the chosen "
                     "components overlap (e.g. a whole layer plus units inside it) in a way random draws do not")


def _draw_control(model, components, head_groups, group, rng) -> list[Component]:
    taken, out = set(components), []
    for c in components:
        if c.kind == "head":
            continue
        limit = model.d_mlp if c.kind == "neuron" else None
        while True:
            cand = Component(c.kind, rng.randrange(model.n_layers), None if limit is None else rng.randrange(limit))
            if cand not in taken:
                break
        taken.add(cand)
        out.append(cand)
    free = [(l, g) for l in range(model.n_layers) for g in range(model.n_heads // group) if (l, g) not in head_groups]
    for k in head_groups.values():
        layer, g = free.pop(rng.randrange(len(free)))
        out += [Component("head", layer, h) for h in sorted(rng.sample(range(g * group, (g + 1) * group), k))]
    return out


def greedy_targets(model: HookedModel, prompts: Sequence[str], max_new_tokens: int = 16,
                   batch_size: int = 16) -> list[tuple[str, str]]:
    """Retain pairs ``(prompt, the model's own greedy answer)``, made now from the current weights.

    An answer that ended within ``max_new_tokens`` keeps its end-of-turn token (the model learns to stop
    there too); a truncated one does not. Meant for harmless prompts: nothing is written to disk.
    """
    eos = model.tokenizer.eos_token or ""
    answers = model.generate(list(prompts), max_new_tokens, batch_size=batch_size)
    tok = model.tokenizer
    return [(p, a + eos if len(tok(a, add_special_tokens=False).input_ids) < max_new_tokens else a)
            for p, a in zip(prompts, answers)]


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """One of ``OPTIMIZERS``, without weight decay (a zero gradient must leave an entry where it is)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=0.0)
    if name == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer='adam8bit' needs bitsandbytes: pip install bitsandbytes "
                              "(or use optimizer='adafactor', which needs no extra package)") from err
        return bnb.optim.Adam8bit(params, lr=lr)
    raise ValueError(f"optimizer={name!r}; use one of {', '.join(OPTIMIZERS)}")


def _batch(model: HookedModel, pairs, chat: bool, add_end: Sequence[bool] | None = None,
           prefills: Sequence[str | None] | None = None):
    """Left-padded ids and mask, plus a bool mask of the target positions (the tokens to predict).

    ``add_end[i]``: append the end-of-turn token to target i (default: every target). ``prefills[i]``:
    text the assistant turn of row i starts with, context only (never predicted); its target follows a space.
    """
    tok = model.tokenizer
    add_end = [True] * len(pairs) if add_end is None else add_end
    prefills = [None] * len(pairs) if prefills is None else prefills
    seqs, n_target = [], []
    for (prompt, target), end, opener in zip(pairs, add_end, prefills):
        head = tok(model.format(prompt, chat, opener), add_special_tokens=False).input_ids
        target = " " + target.lstrip() if opener else target
        tail = tok(target + (tok.eos_token or "" if end else ""), add_special_tokens=False).input_ids if chat else []
        if chat and not tail:
            raise ValueError(f"empty target for prompt {prompt[:40]!r}: give at least one token to learn")
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
          retain: Sequence[tuple[str, str]] = (), retain_per_batch: int | None = None, retain_weight: float = 1.0,
          kl_weight: float = 0.0, seed: int = 0, optimizer: str = "adam",
          adversary: Callable[[int, int], tuple[list, torch.Tensor]] | None = None, rerouting=None,
          openers: Sequence[str] = (), opener_prob: float = 0.5, progress: bool = False) -> dict:
    """``optimizer`` (``OPTIMIZERS``) on the masked parameters for ``steps`` steps over ``pairs`` (cycled,
    shuffled with ``seed``).

    ``raw_text=True``: ``pairs`` are ``(text, "")`` and the loss covers every token of the raw text.
    ``retain``: ``(prompt, answer)`` pairs (e.g. ``greedy_targets`` on harmless prompts); each step adds
    ``retain_per_batch`` of them (default ``batch_size``) and the loss becomes
    ``CE(pairs) + retain_weight · CE(retain answers) + kl_weight · KL(before ‖ now)``, the KL taken on the
    next-token distribution at the end of each retain prompt against the weights at the call's start.
    Retain answers get no extra end-of-turn token (``greedy_targets`` keeps the model's own).
    ``adversary(step, n_rows) -> (hooks, rows)`` (e.g. ``RefusalAblationAdversary``): the hooks act during
    that step's forward pass on the hardening rows marked True, never on retain rows.
    ``rerouting`` (``defence.rerouting.Rerouting``): Circuit Breakers' representation loss is added —
    the hardening rows' prompt tokens rerouted away from the original's representations, the retain
    rows' kept (``log["rerouting"]``: its parts per step).
    ``openers`` (e.g. ``prefill_openers()``): each hardening row, with chance ``opener_prob``, has its
    assistant turn start with a random one of them and learns its target after it — refusal that holds
    past the first tokens (Qi et al. 2025); retain rows never get one (``log["prefilled_rows"]``).
    Returns losses per step (total, target, retain, kl), rows ablated per step, seconds, and the number
    of trainable parameters.
    """
    if not pairs:
        raise ValueError("no training pairs given")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if retain_weight < 0 or kl_weight < 0:
        raise ValueError(f"retain_weight and kl_weight must be >= 0, got {retain_weight}, {kl_weight}")
    if retain and (raw_text or not chat):
        raise ValueError("a retain set needs chat prompts (chat=True, raw_text=False)")
    if kl_weight and not retain:
        raise ValueError("kl_weight > 0 needs a retain set: the KL is measured on the retain prompts")
    if openers and (raw_text or not chat or not 0 < opener_prob <= 1):
        raise ValueError(f"openers need chat prompts and opener_prob in (0, 1], got chat={chat}, raw_text={raw_text}, "
                         f"opener_prob={opener_prob}")
    if rerouting is not None:
        rerouting.check(model)
    params = canonical_parameters(model)
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"no parameter named {unknown[0]!r}; names look like {next(iter(params))!r}")
    chosen = [params[n] for n in masks]
    was = {id(p): p.requires_grad for p in params.values()}
    order, keep = list(range(len(pairs))), list(range(len(retain)))
    random.Random(seed).shuffle(order)
    random.Random(seed + 1).shuffle(keep)
    n_keep = (batch_size if retain_per_batch is None else retain_per_batch) if retain else 0
    # the reference distribution: next token after each retain prompt, before any update
    reference = (torch.log_softmax(model.last_logits([p for p, _ in retain]), -1) if kl_weight else None)
    log = {"losses": [], "target_loss": [], "retain_loss": [], "kl": [], "ablated_rows": [], "prefilled_rows": []}
    opener_rng = random.Random(seed + 2)
    start = time.perf_counter()
    opt = make_optimizer(optimizer, chosen, lr)
    # bitsandbytes' quantized zero state is not exactly zero: put frozen entries back after each step
    frozen = ({n: params[n].detach().clone() for n, m in masks.items() if m is not None}
              if optimizer == "adam8bit" else {})
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        for step in progress_bar(range(steps), progress, total=steps, desc="fine-tune"):
            rows = [pairs[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
            kept = [keep[(step * n_keep + i) % len(keep)] for i in range(n_keep)]
            drawn = [opener_rng.choice(openers) if openers and opener_rng.random() < opener_prob else None
                     for _ in rows]
            log["prefilled_rows"].append(sum(o is not None for o in drawn))
            ids, mask, target = _batch(model, rows + [retain[i] for i in kept], chat and not raw_text,
                                       [True] * len(rows) + [False] * len(kept), drawn + [None] * len(kept))
            hooks = []
            if adversary is not None:
                adv_hooks, hit = adversary(step, len(rows))
                rows_on = torch.cat([hit.bool().cpu(), torch.zeros(len(kept), dtype=torch.bool)])
                hooks = on_rows(adv_hooks, rows_on) if hit.any() else []
                log["ablated_rows"].append(int(hit.sum()))
            if rerouting is not None:  # the original's representations first: swapping weights after would break backward
                rerouting.reference(model, {n: params[n] for n in masks}, ids, mask)
                hooks = hooks + rerouting.hooks()
            with model.hooks(hooks):
                resid = model.final_residual(ids, mask)
            # the token at t+1 is predicted from position t: read positions shifted left by one
            pred_pos = torch.roll(target, -1, dims=1)
            pred_pos[:, -1] = False
            logits = model.final_logits(resid[pred_pos]).float()
            token_loss = torch.nn.functional.cross_entropy(logits, ids[target], reduction="none")
            is_retain = pred_pos.nonzero()[:, 0] >= len(rows)
            target_loss = token_loss[~is_retain].mean()
            loss, parts = target_loss, {"target_loss": float(target_loss.detach())}
            if kept:
                retain_loss = token_loss[is_retain].mean()
                loss = loss + retain_weight * retain_loss
                parts["retain_loss"] = float(retain_loss.detach())
            if kl_weight:
                # first prediction position of a row = its prompt's last token
                first = (pred_pos & ~torch.roll(pred_pos, 1, dims=1))[pred_pos] & is_retain
                now = torch.log_softmax(logits[first], -1)
                ref = reference[kept].to(now.device)
                kl = (ref.exp() * (ref - now)).sum(-1).mean()
                loss = loss + kl_weight * kl
                parts["kl"] = float(kl.detach())
            if rerouting is not None:
                hardening_row = (torch.arange(len(ids), device=mask.device) < len(rows))[:, None]
                loss = loss + rerouting.loss(step, steps, hardening_row & mask.bool() & ~target,
                                             ~hardening_row & mask.bool())
            opt.zero_grad(set_to_none=False)
            loss.backward()
            with torch.no_grad():
                for name, p in zip(masks, chosen):
                    if masks[name] is not None:
                        p.grad.mul_(masks[name])
            opt.step()
            with torch.no_grad():
                for name, original_values in frozen.items():
                    params[name].copy_(torch.where(masks[name], params[name], original_values))
            log["losses"].append(float(loss.detach()))
            for key in ("target_loss", "retain_loss", "kl"):
                log[key].append(parts.get(key, float("nan")))
    finally:
        for p in params.values():
            p.requires_grad_(was[id(p)])
            p.grad = None
    if rerouting is not None:
        log["rerouting"] = list(rerouting.history)
    return {**log, "seconds": time.perf_counter() - start, "n_params": count_trainable(masks, model)}


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

