"""One row of measures for a model as it is now (edited by ``abliteration.abliterated`` or any other
edit): ``score_model``, the measures every abliteration trial and export is compared on — refusal
score, Heretic's first-token KL and refusal markers (``heretic_scoring``), circuitlab's judge with
bootstrap CIs, cross-entropy, and the capability column (``capability``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from circuitlab.core.model import HookedModel
from circuitlab.methods import metrics
from circuitlab.methods.capability import arithmetic_accuracy
from circuitlab.methods.direction_eval import last_logits_shared
from circuitlab.methods.heretic_scoring import first_token_kl, load_markers, marker_refusals
from circuitlab.methods.stats import bootstrap_ci

__all__ = ["score_model"]


def score_model(model: HookedModel, harmful: Sequence[str], harmless: Sequence[str], base_harmless: torch.Tensor, *,
                refusal_tokens: Sequence[int] | None = None, markers: bool = False, judge: bool = False,
                max_new_tokens: int = 24, plaintext: Sequence[str] | None = None, batch_size: int = 32,
                seed: int = 0, capability: int = 0, benign: Sequence[str] | None = None) -> dict:
    """Score the model as it is now (wrap the call in ``abliterated`` or any other edit).

    ``refusal_score``: mean refusal score of ``harmful`` (``metrics``' calibrated refusal tokens);
    ``kl``: Heretic's first-token KL(base || now) on ``harmless`` (``base_harmless``: the unedited
    model's ``last_logits_shared(model, harmless, batch_size=batch_size)``); with ``markers``,
    ``marker_refusals``: how many greedy responses of ``max_new_tokens`` tokens contain a Heretic
    refusal marker; with ``judge``, circuitlab's own judge (``metrics.judge_refusals``, same length):
    ``judge_refusal_rate`` on ``harmful`` and ``over_refusal_rate`` on ``harmless``, each with a bootstrap
    95 % CI (``_ci_low`` / ``_ci_high``, ``seed``); with ``plaintext``, ``cross_entropy`` (nats per token);
    with ``capability`` N > 0, ``capability_accuracy``: exact-match accuracy on N generated two-digit
    arithmetic questions (``capability.arithmetic_accuracy``, ``seed``; off by default, so rows stay comparable);
    with ``benign`` prompts (e.g. the ``sensitive-benign`` set), ``over_refusal_benign`` judged as above, with its CI.
    """
    harmful, harmless = list(harmful), list(harmless)
    tok = list(refusal_tokens) if refusal_tokens is not None else metrics.refusal_tokens(model)
    # harmless alone, batched as base_harmless was: the unedited model's KL is then exactly 0
    harmful_logits = last_logits_shared(model, harmful, batch_size=batch_size)
    harmless_logits = last_logits_shared(model, harmless, batch_size=batch_size)
    out = {"refusal_score": metrics.refusal_score_from_logits(harmful_logits, tok).mean().item(),
           "kl": first_token_kl(base_harmless, harmless_logits)}
    if markers:
        found = load_markers()
        # a marker, once present, stays: stop decoding that row (an empty text is no verdict yet)
        texts = model.generate(harmful, max_new_tokens, batch_size=batch_size, share_prefix=True,
                               stop_when=lambda t: bool(t.strip()) and marker_refusals([t], found)[0])
        out["marker_refusals"] = int(sum(marker_refusals(texts, found)))
    judged = [("judge_refusal_rate", harmful), ("over_refusal_rate", harmless)] if judge else []
    if benign:
        judged.append(("over_refusal_benign", list(benign)))
    for name, prompts in judged:
        verdicts = metrics.judge_refusals(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                          share_prefix=True)
        out[name] = sum(verdicts) / len(verdicts)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_ci(verdicts, seed=seed)
    if plaintext:
        out["cross_entropy"] = metrics.cross_entropy(model, list(plaintext), batch_size=max(1, batch_size // 4))
    if capability:
        out["capability_accuracy"] = arithmetic_accuracy(model, capability, seed, batch_size=batch_size)
    return out
