"""The bridge's split-QKV input fork: one copy of the attention input per query head and per key/value head.

With it on, ``hooks.attn_q_input`` / ``attn_k_input`` / ``attn_v_input`` exist, so a patch can reach
one head's query (or one GQA key/value group's keys and values) without touching the others: what
path patching and the edge graph need.
"""

from __future__ import annotations

import contextlib

__all__ = ["split_qkv_input"]


@contextlib.contextmanager
def split_qkv_input(model, enabled: bool = True):
    """Turn the fork on for the block (``enabled=False``: a no-op); restore the caller's flags on exit."""
    bridge = model.bridge
    saved = bool(getattr(bridge.cfg, "use_split_qkv_input", False))
    saved_attn_in = bool(getattr(bridge.cfg, "use_attn_in", False))
    try:
        if enabled:
            if saved_attn_in:
                bridge.set_use_attn_in(False)  # mutually exclusive with the split fork
            if not saved:
                bridge.set_use_split_qkv_input(True)
        yield
    finally:
        if enabled:
            bridge.set_use_split_qkv_input(saved)
            if saved_attn_in:
                bridge.set_use_attn_in(True)
