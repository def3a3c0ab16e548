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

import torch

from circuitlab.io.datasets import PromptSet
from circuitlab.models.tiny import build_tokenizer

__all__ = ["build_planted", "planted_prompts", "PLANTED_HEAD", "PLANTED_NEURON", "FEATURE_LAYER",
           "HARMFUL_WORDS", "HARMLESS_WORDS", "TEMPLATES", "DIMS", "N_LAYERS"]

N_LAYERS, D_MODEL, N_HEADS, D_MLP = 3, 64, 4, 64
D_HEAD = D_MODEL // N_HEADS
PLANTED_HEAD = (1, 2)  # (layer, head)
PLANTED_NEURON = (2, 37)  # (layer, neuron)
FEATURE_LAYER = 2  # first layer whose resid_pre at the last position carries the feature
DIMS = {"const": 0, "harmful": 1, "benign": 2, "moved": 3, "refuse": 4}
_NOISE = slice(5, D_MODEL)  # dims the noise components may read and write

# Paired (harmful, harmless) single-token words; a pair shares its noise embedding.
HARMFUL_WORDS = ("bomb", "weapon", "hack", "steal", "poison", "attack", "kill", "drug", "malware",
                 "virus", "fraud")
HARMLESS_WORDS = ("cake", "bread", "garden", "music", "history", "science", "math", "tree", "moon",
                  "star", "book")
TEMPLATES = (
    "how do i make a {}", "tell me about the {}", "write a story about a {}", "give me tips on {}",
    "explain the {} to me", "can you help with a {}", "what is the best {}", "list steps for the {}",
    "why is the {} good", "where can i find a {}",
)

# Circuit strengths (chosen so the harmful/harmless refusal scores separate by a wide margin).
_EMBED_CONST, _EMBED_NOISE, _KEYWORD = 1.0, 0.15, 1.0
_HEAD_QK = 6.0  # q bias × key gain on the lowest-frequency rotary dim: near-one-hot attention
_HEAD_OUT = 0.02  # size of MOVED written per unit of head value: small keeps RMSNorm scales unchanged
_NEURON_GATE, _NEURON_UP, _NEURON_DOWN = 60.0, 1.0, 1.0
_SORRY_GAIN, _SORRY_BIAS = 3.0, 2.0


def _rotary_slowest() -> int:
    """Index within a head of the lowest-frequency rotary dim (HF rotate_half pairs j and j+d/2)."""
    return D_HEAD // 2 - 1


def _noise(gen: torch.Generator, shape, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _set_embeddings(model, tok, gen) -> None:
    emb = model.model.embed_tokens.weight
    emb.zero_()
    emb[:, DIMS["const"]] = _EMBED_CONST
    emb[:, _NOISE] = _noise(gen, (emb.shape[0], D_MODEL - 5), _EMBED_NOISE)
    for bad, good in zip(HARMFUL_WORDS, HARMLESS_WORDS):
        b, g = _single_token(tok, " " + bad), _single_token(tok, " " + good)
        emb[g, _NOISE] = emb[b, _NOISE]  # twins differ only in dims 1 vs 2
        emb[b, DIMS["harmful"]] = _KEYWORD
        emb[g, DIMS["benign"]] = _KEYWORD


def _set_attention(attn, gen, planted_head: int | None) -> None:
    """Random noise heads that read and write only noise dims; optionally one planted head."""
    for proj, std in ((attn.q_proj, 0.15), (attn.k_proj, 0.15), (attn.v_proj, 0.15)):
        proj.weight.zero_()
        proj.weight[:, _NOISE] = _noise(gen, (proj.weight.shape[0], D_MODEL - 5), std)
        proj.bias.copy_(_noise(gen, proj.bias.shape, 0.05))
    attn.o_proj.weight.zero_()
    attn.o_proj.weight[_NOISE, :] = _noise(gen, (D_MODEL - 5, D_MODEL), 0.05)
    if planted_head is None:
        return
    rows = slice(planted_head * D_HEAD, (planted_head + 1) * D_HEAD)
    slow = planted_head * D_HEAD + _rotary_slowest()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[rows] = 0.0
        proj.bias[rows] = 0.0
    attn.q_proj.bias[slow] = _HEAD_QK  # constant query: "look for the keyword"
    attn.k_proj.weight[slow, DIMS["harmful"]] = _HEAD_QK  # key: "I am a keyword"
    attn.v_proj.weight[planted_head * D_HEAD, DIMS["harmful"]] = 1.0  # value: the feature itself
    attn.o_proj.weight[:, rows] = 0.0
    attn.o_proj.weight[DIMS["moved"], planted_head * D_HEAD] = _HEAD_OUT


def _set_mlp(mlp, gen, planted_neuron: int | None) -> None:
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight.zero_()
        proj.weight[:, _NOISE] = _noise(gen, (D_MLP, D_MODEL - 5), 0.15)
    mlp.down_proj.weight.zero_()
    mlp.down_proj.weight[_NOISE, :] = _noise(gen, (D_MODEL - 5, D_MLP), 0.05)
    if planted_neuron is None:
        return
    n = planted_neuron
    mlp.gate_proj.weight[n] = 0.0
    mlp.up_proj.weight[n] = 0.0
    mlp.down_proj.weight[:, n] = 0.0
    mlp.gate_proj.weight[n, DIMS["moved"]] = _NEURON_GATE  # fires only where the feature arrived
    mlp.up_proj.weight[n, DIMS["const"]] = _NEURON_UP
    mlp.down_proj.weight[DIMS["refuse"], n] = _NEURON_DOWN  # "refuse"


def _set_unembedding(model, tok, gen) -> None:
    w = model.lm_head.weight
    w.zero_()
    w[:, _NOISE] = _noise(gen, (w.shape[0], D_MODEL - 5), 0.1)
    sorry = _single_token(tok, " sorry")
    w[sorry, DIMS["refuse"]] = _SORRY_GAIN
    w[sorry, DIMS["const"]] = -_SORRY_BIAS  # low " sorry" logit unless REFUSE is present


def _single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"planted model needs {text!r} to be one token, got {ids}")
    return ids[0]


def build_planted(seed: int = 0):
    """Return ``(hf_model, tokenizer)``: the hand-set Qwen2 model described in the module doc."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,  # no GQA: heads share no values
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config.refusal_strings = [" sorry"]  # the planted refusal token, declared where metrics look for it
    gen = torch.Generator().manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        _set_embeddings(model, tok, gen)
        for layer, block in enumerate(model.model.layers):
            _set_attention(block.self_attn, gen, PLANTED_HEAD[1] if layer == PLANTED_HEAD[0] else None)
            _set_mlp(block.mlp, gen, PLANTED_NEURON[1] if layer == PLANTED_NEURON[0] else None)
        _set_unembedding(model, tok, gen)
    return model.eval(), tok


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
