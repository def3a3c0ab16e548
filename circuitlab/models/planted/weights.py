"""Hand-set weights for planted-circuit models: one builder for every circuit of the suite.

A :class:`Spec` lists what to plant in a 3-layer Qwen2 model (``single.py``'s recipe,
generalised): content-attending heads that move the ``harmful`` embedding dimension into a
dedicated residual dimension, MLP neurons with gate / up / down weights on dedicated dimensions,
and the `` sorry`` row of the unembedding. Everything else is small random noise that reads and
writes only the noise dimensions (``reserved`` onwards), drawn in a fixed order so that the
single-path spec reproduces ``build_planted`` bit for bit (tested).

GQA (``n_kv < n_heads``): a planted head's key and value rows are those of its key/value group
(HF ``repeat_kv``: kv head ``h // (n_heads / n_kv)``); the group's other query heads are silenced
(their query on the planted rotary dim and their output columns zeroed) so they do not also read
the planted key and value, and the ground truth stays one head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitlab.models.tiny import build_tokenizer

__all__ = ["Spec", "PlantedHead", "PlantedNeuron", "build_from_spec", "N_LAYERS", "D_MODEL", "N_HEADS", "D_MLP",
           "D_HEAD", "HARMFUL_DIM", "CONST_DIM", "BENIGN_DIM"]

N_LAYERS, D_MODEL, N_HEADS, D_MLP = 3, 64, 4, 64
D_HEAD = D_MODEL // N_HEADS
CONST_DIM, HARMFUL_DIM, BENIGN_DIM = 0, 1, 2

# Strengths shared with single.py (see its module docstring for why each is that size).
_EMBED_CONST, _EMBED_NOISE, _KEYWORD = 1.0, 0.15, 1.0
_HEAD_QK = 6.0
HARMFUL_WORDS = ("bomb", "weapon", "hack", "steal", "poison", "attack", "kill", "drug", "malware",
                 "virus", "fraud")
HARMLESS_WORDS = ("cake", "bread", "garden", "music", "history", "science", "math", "tree", "moon",
                  "star", "book")


@dataclass(frozen=True)
class PlantedHead:
    """Head ``head`` of ``layer`` attends to the harmful keyword and writes ``size`` x its value
    (the ``harmful`` dim) into residual dim ``out_dim``."""

    layer: int
    head: int
    out_dim: int
    size: float = 0.02


@dataclass(frozen=True)
class PlantedNeuron:
    """Neuron ``index`` of MLP ``layer``: ``down * silu(gate . x) * (up . x)``; each dict maps a
    residual dim to a weight."""

    layer: int
    index: int
    gate: dict
    up: dict
    down: dict


@dataclass(frozen=True)
class Spec:
    """What to plant: heads, neurons, the `` sorry`` unembedding row; ``reserved`` dims are kept free of noise."""

    heads: tuple = ()
    neurons: tuple = ()
    sorry: dict = field(default_factory=lambda: {4: 3.0, CONST_DIM: -2.0})
    n_kv: int = N_HEADS
    reserved: int = 5


def _noise(gen, shape, std):
    return torch.randn(*shape, generator=gen) * std


def _single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"planted model needs {text!r} to be one token, got {ids}")
    return ids[0]


def _set_embeddings(model, tok, gen, noise: slice) -> None:
    emb = model.model.embed_tokens.weight
    emb.zero_()
    emb[:, CONST_DIM] = _EMBED_CONST
    emb[:, noise] = _noise(gen, (emb.shape[0], D_MODEL - noise.start), _EMBED_NOISE)
    for bad, good in zip(HARMFUL_WORDS, HARMLESS_WORDS):
        b, g = _single_token(tok, " " + bad), _single_token(tok, " " + good)
        emb[g, noise] = emb[b, noise]  # twins differ only in the harmful vs benign dim
        emb[b, HARMFUL_DIM] = _KEYWORD
        emb[g, BENIGN_DIM] = _KEYWORD


def _set_attention(attn, gen, heads, n_kv: int, noise: slice) -> None:
    for proj, std in ((attn.q_proj, 0.15), (attn.k_proj, 0.15), (attn.v_proj, 0.15)):
        proj.weight.zero_()
        proj.weight[:, noise] = _noise(gen, (proj.weight.shape[0], D_MODEL - noise.start), std)
        proj.bias.copy_(_noise(gen, proj.bias.shape, 0.05))
    attn.o_proj.weight.zero_()
    attn.o_proj.weight[noise, :] = _noise(gen, (D_MODEL - noise.start, D_MODEL), 0.05)
    group = N_HEADS // n_kv
    slow = D_HEAD // 2 - 1  # lowest-frequency rotary dim: content attention, position barely matters
    for p in heads:
        g = p.head // group
        q_rows = slice(p.head * D_HEAD, (p.head + 1) * D_HEAD)
        kv_rows = slice(g * D_HEAD, (g + 1) * D_HEAD)
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            proj.weight[rows] = 0.0
            proj.bias[rows] = 0.0
        for other in range(g * group, (g + 1) * group):  # GQA: the group's other heads see no keyword
            if other != p.head:
                attn.q_proj.weight[other * D_HEAD + slow] = 0.0
                attn.q_proj.bias[other * D_HEAD + slow] = 0.0
                attn.o_proj.weight[:, other * D_HEAD:(other + 1) * D_HEAD] = 0.0
        attn.q_proj.bias[p.head * D_HEAD + slow] = _HEAD_QK  # constant query: "look for the keyword"
        attn.k_proj.weight[g * D_HEAD + slow, HARMFUL_DIM] = _HEAD_QK  # key: "I am a keyword"
        attn.v_proj.weight[g * D_HEAD, HARMFUL_DIM] = 1.0  # value: the feature itself
        attn.o_proj.weight[:, q_rows] = 0.0
        attn.o_proj.weight[p.out_dim, p.head * D_HEAD] = p.size


def _set_mlp(mlp, gen, neurons, noise: slice) -> None:
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight.zero_()
        proj.weight[:, noise] = _noise(gen, (D_MLP, D_MODEL - noise.start), 0.15)
    mlp.down_proj.weight.zero_()
    mlp.down_proj.weight[noise, :] = _noise(gen, (D_MODEL - noise.start, D_MLP), 0.05)
    for n in neurons:
        mlp.gate_proj.weight[n.index] = 0.0
        mlp.up_proj.weight[n.index] = 0.0
        mlp.down_proj.weight[:, n.index] = 0.0
        for proj, weights in ((mlp.gate_proj, n.gate), (mlp.up_proj, n.up)):
            for dim, w in weights.items():
                proj.weight[n.index, dim] = w
        for dim, w in n.down.items():
            mlp.down_proj.weight[dim, n.index] = w


def _set_unembedding(model, tok, gen, sorry_row: dict, noise: slice) -> None:
    w = model.lm_head.weight
    w.zero_()
    w[:, noise] = _noise(gen, (w.shape[0], D_MODEL - noise.start), 0.1)
    sorry = _single_token(tok, " sorry")
    for dim, value in sorry_row.items():
        w[sorry, dim] = value


def build_from_spec(spec: Spec, seed: int = 0):
    """``(hf_model, tokenizer)``: a 3-layer Qwen2 model with ``spec`` planted and noise from ``seed``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if N_HEADS % spec.n_kv:
        raise ValueError(f"n_kv={spec.n_kv} must divide the {N_HEADS} query heads")
    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config.refusal_strings = [" sorry"]  # the planted refusal token, declared where metrics look for it
    gen = torch.Generator().manual_seed(seed)
    noise = slice(spec.reserved, D_MODEL)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        _set_embeddings(model, tok, gen, noise)
        for layer, block in enumerate(model.model.layers):
            _set_attention(block.self_attn, gen, [h for h in spec.heads if h.layer == layer], spec.n_kv, noise)
            _set_mlp(block.mlp, gen, [n for n in spec.neurons if n.layer == layer], noise)
        _set_unembedding(model, tok, gen, spec.sorry, noise)
    return model.eval(), tok
