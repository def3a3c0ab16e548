"""Attribution patching: the one gradient × difference engine.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale";
Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components") estimates the effect of replacing activation ``a`` by ``a'`` with the first-order term

    metric(a') − metric(a) ≈ (a' − a) · ∂metric/∂a

so one forward and one backward pass give the estimate for every hook, position and unit at once.
``gradients`` runs that pass; ``patch_estimate`` and ``projection_estimate`` turn it into estimates for
a replacement (a source run, a mean) or for projecting directions out (Arditi et al. 2024's
directional ablation). The attribution-patching experiment, the circuit map and the ablation
ranking all call these.

Known limit (Kramár et al. 2024 §3.1): when a patch saturates an attention softmax the linear
estimate of a head's effect can be badly off; their QK fix is NOT implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.methods import metrics as mx

__all__ = ["Gradients", "gradients", "patch_estimate", "projection_estimate", "mean_patch_estimates", "refusal_metric"]

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [B, vocab] -> [B]


def refusal_metric(model) -> Metric:
    """The default metric of patching and attribution: refusal log-odds from last-position logits."""
    tokens = mx.refusal_tokens(model)
    return lambda logits: mx.refusal_score_from_logits(logits, tokens)


@dataclass
class Gradients:
    """Activations and ∂metric/∂activation at the hooks (``[batch, positions, ...]``); the metric ``[batch]``."""

    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    metric: torch.Tensor


def gradients(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, names: Sequence[str],
              metric: Metric, *, last: int | None = None, backward: bool = True) -> Gradients:
    """One forward and one backward pass of ``input_ids`` ``[batch, T]``: activations and gradients of
    ``metric(last-position logits).sum()`` at ``names``; ``last`` keeps only the last ``last`` positions.

    Weights stay frozen: the graph grows from the embeddings, which become the leaf. Only the last
    position goes through the unembedding. ``backward=False`` runs the same forward without a graph
    (the source run of a pair): activations and metric only, ``grads`` empty.
    """
    names = list(dict.fromkeys(names))
    acts, grads = {}, {}
    cut = slice(None) if last is None else slice(-last, None)

    def keep(store, name):
        def save(act, hook):  # forward: the activation; backward: the gradient w.r.t. the hook's output
            store[name] = act[:, cut].detach()
        return save

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    fwd = ([(hk.embed(), leaf)] if backward else []) + [(n, keep(acts, n)) for n in names]
    bwd = [(n, keep(grads, n)) for n in names] if backward else []
    with torch.set_grad_enabled(backward), model.hooks(fwd, bwd):
        resid = model.final_residual(input_ids, attention_mask)
        values = metric(model.final_logits(resid[:, -1]).float())
        if backward:
            values.sum().backward()
    missing = [n for n in names if n not in grads] if backward else []
    if missing:
        raise RuntimeError(f"no gradient reached hooks {missing[:3]}: the metric does not depend on them")
    return Gradients(acts, grads, values.detach())


def patch_estimate(g: Gradients, name: str, replacement: torch.Tensor) -> torch.Tensor:
    """First-order change of the metric when the activation at ``name`` is replaced by ``replacement``
    (broadcastable to it): ``(replacement − a) · ∂metric/∂a``, elementwise (sum the axes you patch together)."""
    act = g.acts[name]
    return (replacement.to(act) - act) * g.grads[name]


def projection_estimate(g: Gradients, name: str, r_hats: torch.Tensor) -> torch.Tensor:
    """First-order change of the metric when each unit direction (rows of ``r_hats`` ``[k, d]``) is
    projected out of the activation at ``name``: ``−(a · r̂)(∂metric/∂a · r̂)``, ``[batch, positions, k]``."""
    act = g.acts[name]
    r = r_hats.to(act)
    return -(act @ r.T) * (g.grads[name] @ r.T)


def mean_patch_estimates(model, prompts: Sequence[str], means: dict[str, torch.Tensor],
                         directions: dict[int, torch.Tensor] | None = None, *, metric: Metric | None = None,
                         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Estimated metric DROP (positive = lower) from replacing every neuron (``mlp_post``) and head
    (``attn_z``) by ``means`` at the post-instruction positions, averaged over ``prompts``.

    ``means``: ``{hook: [n_post, ...]}`` replacement values for every layer's ``mlp_post`` and ``attn_z``
    (e.g. harmless means). Returns ``{"neuron": [n_layers, d_mlp], "head": [n_layers, n_heads]}``; with
    ``directions`` (``{layer: vector}``) also ``"direction"`` ``[n_layers]``: per layer l, the drop from
    projecting layer l's unit direction out of ``resid_pre`` at every layer and post position
    (directional ablation). ``metric`` defaults to the refusal score.
    """
    metric = metric if metric is not None else refusal_metric(model)
    kinds = {"neuron": hk.mlp_post, "head": hk.attn_z}
    names = [f(l) for l in range(model.n_layers) for f in kinds.values()]
    resid = [hk.resid_pre(l) for l in range(model.n_layers)] if directions is not None else []
    r_hats = None if directions is None else torch.stack(
        [directions[l] / directions[l].norm().clamp(min=1e-12) for l in range(model.n_layers)])
    totals = {n: 0.0 for n in names}
    bypass = torch.zeros(model.n_layers)
    for start in range(0, len(prompts), batch_size):
        ids, mask = model.tokenize(list(prompts[start:start + batch_size]))
        g = gradients(model, ids, mask, names + resid, metric, last=model.n_post)
        for n in resid:  # every candidate direction, ablated at this layer
            bypass -= projection_estimate(g, n, r_hats).sum((0, 1)).float().cpu()
        for n in names:
            # summed over positions and prompts here: a short last batch cannot broadcast against the others
            totals[n] = totals[n] - patch_estimate(g, n, means[n]).sum(1).sum(0).float().cpu()
    per_unit = {"neuron": lambda t: t, "head": lambda t: t.sum(-1)}  # heads: d_head summed
    out = {kind: torch.stack([per_unit[kind](totals[hook(l)]) for l in range(model.n_layers)]) / len(prompts)
           for kind, hook in kinds.items()}
    if directions is not None:
        out["direction"] = bypass / len(prompts)
    return out
