"""Builders for TransformerLens canonical hook names, and their validation against a model.

Every hook name circuitlab uses is built here, so a typo cannot reach a forward pass: names are
checked against the model's hook points and a wrong one fails with the nearest valid names.
"""

from __future__ import annotations

import difflib
import re

__all__ = [
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post", "attn_z",
    "attn_pattern", "attn_q", "attn_k", "attn_v", "mlp_in", "attn_q_input", "attn_k_input", "attn_v_input",
    "embed", "final_resid", "layer_of",
    "validate", "HookNameError", "TEMPLATES",
]


class HookNameError(ValueError):
    """A hook name or layer index that the model does not have."""


# hook-point kind -> name template (hook points, not component kinds: those live in components.py);
# the public builders below read this one table.
TEMPLATES = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "mlp_post": "blocks.{l}.mlp.hook_post",  # the MLP neurons (after the activation function)
    "attn_z": "blocks.{l}.attn.hook_z",  # per-head outputs before W_O: [batch, pos, head, d_head]
    "attn_pattern": "blocks.{l}.attn.hook_pattern",
    "attn_q": "blocks.{l}.attn.hook_q",
    "attn_k": "blocks.{l}.attn.hook_k",
    "attn_v": "blocks.{l}.attn.hook_v",
    "mlp_in": "blocks.{l}.ln2.hook_in",  # what the MLP reads (before its norm)
    # per-head (per-key/value-head) copies of the attention input: exist only while the bridge's
    # split-QKV fork is on (core.split_qkv.split_qkv_input)
    "attn_q_input": "blocks.{l}.attn.hook_q_input",
    "attn_k_input": "blocks.{l}.attn.hook_k_input",
    "attn_v_input": "blocks.{l}.attn.hook_v_input",
}


def _check_layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise HookNameError(f"layer must be a non-negative int, got {layer!r}")
    return layer


def resid_pre(layer: int) -> str:
    """Residual stream entering block ``layer``."""
    return TEMPLATES["resid_pre"].format(l=_check_layer(layer))


def resid_mid(layer: int) -> str:
    """Residual stream between attention and MLP of block ``layer``."""
    return TEMPLATES["resid_mid"].format(l=_check_layer(layer))


def resid_post(layer: int) -> str:
    """Residual stream leaving block ``layer``."""
    return TEMPLATES["resid_post"].format(l=_check_layer(layer))


def attn_out(layer: int) -> str:
    """Attention output of block ``layer`` (summed over heads, after W_O)."""
    return TEMPLATES["attn_out"].format(l=_check_layer(layer))


def mlp_out(layer: int) -> str:
    """MLP output of block ``layer``."""
    return TEMPLATES["mlp_out"].format(l=_check_layer(layer))


def mlp_post(layer: int) -> str:
    """MLP neuron activations of block ``layer``: ``[batch, pos, d_mlp]``."""
    return TEMPLATES["mlp_post"].format(l=_check_layer(layer))


def attn_z(layer: int) -> str:
    """Per-head attention outputs before W_O: ``[batch, pos, n_heads, d_head]``."""
    return TEMPLATES["attn_z"].format(l=_check_layer(layer))


def attn_pattern(layer: int) -> str:
    """Attention probabilities: ``[batch, n_heads, query_pos, key_pos]``."""
    return TEMPLATES["attn_pattern"].format(l=_check_layer(layer))


def attn_q(layer: int) -> str:
    return TEMPLATES["attn_q"].format(l=_check_layer(layer))


def attn_k(layer: int) -> str:
    return TEMPLATES["attn_k"].format(l=_check_layer(layer))


def attn_v(layer: int) -> str:
    return TEMPLATES["attn_v"].format(l=_check_layer(layer))


def mlp_in(layer: int) -> str:
    """The MLP's input (the residual before ``ln2``): ``[batch, pos, d_model]``."""
    return TEMPLATES["mlp_in"].format(l=_check_layer(layer))


def attn_q_input(layer: int) -> str:
    """Per-query-head attention input (split-QKV fork on): ``[batch, pos, n_heads, d_model]``."""
    return TEMPLATES["attn_q_input"].format(l=_check_layer(layer))


def attn_k_input(layer: int) -> str:
    """Per-key/value-head key input (split-QKV fork on): ``[batch, pos, n_kv_heads, d_model]``."""
    return TEMPLATES["attn_k_input"].format(l=_check_layer(layer))


def attn_v_input(layer: int) -> str:
    """Per-key/value-head value input (split-QKV fork on): ``[batch, pos, n_kv_heads, d_model]``."""
    return TEMPLATES["attn_v_input"].format(l=_check_layer(layer))


def embed() -> str:
    """Token embeddings."""
    return "hook_embed"


def final_resid() -> str:
    """Residual stream after the last block, before the final norm."""
    return "ln_final.hook_in"


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block index a hook name belongs to, or None for hooks outside the blocks."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def validate(names, valid_names, n_layers: int) -> list[str]:
    """Return ``names`` as a list, or raise HookNameError naming the valid range / nearest names."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    valid = set(valid_names)
    for name in names:
        if name in valid:
            continue
        layer = layer_of(name) if isinstance(name, str) else None
        if layer is not None and layer >= n_layers:
            raise HookNameError(
                f"hook {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}"
            )
        close = difflib.get_close_matches(str(name), sorted(valid), n=3, cutoff=0.6)
        hint = f" Nearest valid names: {', '.join(close)}." if close else ""
        raise HookNameError(
            f"hook {name!r} is not a hook point of this model.{hint} "
            "Build names with circuitlab.core.hooks (e.g. hooks.resid_pre(3))."
        )
    return names
