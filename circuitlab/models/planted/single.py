"""A planted-circuit model: a 3-layer Qwen2 transformer whose refusal circuit is set by hand.

A teaching example and a test oracle (``load_model("planted")``): the answer every locating
method should find is known.

The circuit (residual dimensions are dedicated, so each step can be read off the weights):

1. Embedding. Harmful keywords (``HARMFUL_WORDS``) write ``HARMFUL`` (dim 1); their paired
   harmless words write ``BENIGN`` (dim 2) with the same size, so both have the same norm and
   RMSNorm treats them alike. A pair shares its other (noise) embedding dims exactly.
2. ``PLANTED_HEAD`` (layer 1, head 2) attends by content: its query is a constant (the q bias),
   its key reads ``HARMFUL``, both on the lowest-frequency rotary pair so position barely matters.
   Its value reads ``HARMFUL`` and its output writes ``MOVED`` (dim 3) at every later position,
   so the feature reaches the last token. ``FEATURE_LAYER`` = 2: resid_pre of layer 2 carries it.
3. ``PLANTED_NEURON`` (layer 2) has gate = ``MOVED``, up = the constant dim; it fires only when
   the feature arrived and writes ``REFUSE`` (dim 4), which the unembedding maps to `` sorry``.

Everything else is small random noise that neither reads nor writes dims 1-4, so before layer 2
the last position is exactly the same for a harmful prompt and its harmless twin. The planted
head writes ``MOVED`` at a small size, so the RMSNorm scale of later layers hardly changes.
"""

from __future__ import annotations

import random

from circuitlab.io.datasets import PromptSet
from circuitlab.models.planted.weights import (D_HEAD, D_MLP, D_MODEL, HARMFUL_WORDS, HARMLESS_WORDS, N_HEADS,
    N_LAYERS, PlantedHead, PlantedNeuron, Spec, build_from_spec)

__all__ = ["build_planted", "planted_prompts", "PLANTED_HEAD", "PLANTED_NEURON", "FEATURE_LAYER",
           "HARMFUL_WORDS", "HARMLESS_WORDS", "TEMPLATES", "DIMS", "N_LAYERS", "SPEC",
           "D_MODEL", "N_HEADS", "D_MLP", "D_HEAD"]

PLANTED_HEAD = (1, 2)  # (layer, head)
PLANTED_NEURON = (2, 37)  # (layer, neuron)
FEATURE_LAYER = 2  # first layer whose resid_pre at the last position carries the feature
DIMS = {"const": 0, "harmful": 1, "benign": 2, "moved": 3, "refuse": 4}
# Paired (harmful, harmless) single-token words (``weights.HARMFUL_WORDS``); a pair shares its noise embedding.
TEMPLATES = (
    "how do i make a {}", "tell me about the {}", "write a story about a {}", "give me tips on {}",
    "explain the {} to me", "can you help with a {}", "what is the best {}", "list steps for the {}",
    "why is the {} good", "where can i find a {}",
)

_HEAD_OUT = 0.02  # size of MOVED written per unit of head value: small keeps RMSNorm scales unchanged
_NEURON_GATE, _NEURON_UP, _NEURON_DOWN = 60.0, 1.0, 1.0
_SORRY_GAIN, _SORRY_BIAS = 3.0, 2.0

SPEC = Spec(
    heads=(PlantedHead(*PLANTED_HEAD, out_dim=DIMS["moved"], size=_HEAD_OUT),),
    neurons=(PlantedNeuron(*PLANTED_NEURON, gate={DIMS["moved"]: _NEURON_GATE}, up={DIMS["const"]: _NEURON_UP},
                           down={DIMS["refuse"]: _NEURON_DOWN}),),
    sorry={DIMS["refuse"]: _SORRY_GAIN, DIMS["const"]: -_SORRY_BIAS},  # low " sorry" logit unless REFUSE
)


def build_planted(seed: int = 0):
    """Return ``(hf_model, tokenizer)``: the hand-set Qwen2 model described in the module doc."""
    return build_from_spec(SPEC, seed)


def planted_prompts(n: int = 16, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """``n`` matched pairs: prompt i of both sets is one template, with a harmful vs harmless word.

    Twins have the same token length, and before ``FEATURE_LAYER`` the same last-position state.
    """
    combos = [(t, i) for t in TEMPLATES for i in range(len(HARMFUL_WORDS))]
    if not 1 <= n <= len(combos):
        raise ValueError(f"n must be between 1 and {len(combos)} (templates × word pairs), got {n}")
    chosen = random.Random(seed).sample(combos, n)
    harmful = tuple(t.format(HARMFUL_WORDS[i]) for t, i in chosen)
    harmless = tuple(t.format(HARMLESS_WORDS[i]) for t, i in chosen)
    return (PromptSet(f"planted-harmful[n={n},seed={seed}]", harmful),
            PromptSet(f"planted-harmless[n={n},seed={seed}]", harmless))
