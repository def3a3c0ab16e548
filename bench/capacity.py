"""Capacity on paper: the memory each circuitlab experiment needs on 8B, 70B and 405B chat models.

Arithmetic from the model shapes (published configs of Llama-3-8B, Llama-3-70B, Llama-3.1-405B), not a
measurement. Bytes: weights and activations in bf16 (2 B), the activation store in float32 (4 B) or
bf16 (``--store-dtype``). Items:

- weights: 2 B × parameters.
- store (the demo's requests): 2N prompts × layers × (resid_pre + attn_z + mlp_post widths) × 6 read
  positions (5 post-instruction + last) — what circuit-map prefetches.
- patching batch: the engine's working set for ``batch`` patched runs of ``T`` tokens (hidden state,
  attention and MLP intermediates of one block at a time) plus the target run's KV cache.
- attribution (AtP / EAP): activations kept for the backward pass of one batch of ``batch_atp`` prompts:
  per layer ~ (10 d_model + 3 d_mlp) values per token (norms, q/k/v/o, MLP in/gate/up/act).
- fine-tuning, full Adam fp32: 16 B × parameters (weights, gradient, two moments); targeted with bf16
  weights and gradients only on the tensors that hold a chosen slice plus 8-bit Adam moments (2 B).

GPUs = ceil(total / usable GPU memory), with 80 GB GPUs at 90 % usable. Ray workers: one model replica
each, so a sweep over W workers needs W × GPUs-per-replica GPUs. Writes results/bench/capacity.csv.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

MODELS = {  # layers, d_model, d_mlp, query heads, kv heads, vocab, parameters
    "Llama-3-8B": (32, 4096, 14336, 32, 8, 128256, 8.03e9),
    "Llama-3-70B": (80, 8192, 28672, 64, 8, 128256, 70.6e9),
    "Llama-3.1-405B": (126, 16384, 53248, 128, 8, 128256, 405.9e9),
}
GB = 1e9


def needs(shape, n_prompts: int = 128, tokens: int = 64, batch: int = 32, batch_atp: int = 8,
          store_bytes: int = 4, train_layers: int = 8) -> dict:
    layers, d, d_mlp, heads, kv, vocab, params = shape
    d_head = d // heads
    weights = 2 * params
    store = n_prompts * layers * (2 * d + d_mlp) * 6 * store_bytes
    block = batch * tokens * (6 * d + 3 * d_mlp) * 2  # one block's intermediates, bf16
    kv_cache = layers * 2 * kv * d_head * tokens * 2
    patch = block + kv_cache + batch * vocab * 4  # + last-position logits in float32
    atp = batch_atp * tokens * layers * (10 * d + 3 * d_mlp) * 2
    full_ft = 16 * params
    per_layer = (params - 2 * vocab * d) / layers
    targeted_ft = weights + train_layers * per_layer * (2 + 2)  # bf16 grads + 8-bit Adam (2 moments × 1 B)
    return {"weights_gb": weights / GB, "store_gb": store / GB, "patch_batch_gb": patch / GB,
            "attribution_batch_gb": atp / GB, "full_finetune_adam_fp32_gb": full_ft / GB,
            "targeted_finetune_lean_gb": targeted_ft / GB}


def gpus(total_gb: float, gpu_gb: float = 80.0, usable: float = 0.9) -> int:
    return max(1, math.ceil(total_gb / (gpu_gb * usable)))


def table(store_bytes: int = 4) -> pd.DataFrame:
    rows = []
    for name, shape in MODELS.items():
        n = needs(shape, store_bytes=store_bytes)
        w = n["weights_gb"]
        for experiment, total in (("forward, activation patching (engine batch)", w + n["patch_batch_gb"]),
                                  ("attribution patching / EAP (backward)", w + n["attribution_batch_gb"]),
                                  ("targeted fine-tuning, bf16 + 8-bit Adam", n["targeted_finetune_lean_gb"]),
                                  ("full fine-tuning, Adam fp32", n["full_finetune_adam_fp32_gb"])):
            rows.append({"model": name, "experiment": experiment, "memory_gb": round(total, 1),
                         "weights_gb": round(w, 1), "store_host_gb": round(n["store_gb"], 1),
                         "gpus_80gb": gpus(total), "ray_workers_per_8_gpus": 8 // gpus(total) if gpus(total) <= 8 else 0})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default="results/bench/capacity.csv")
    args = ap.parse_args()
    t = table(4 if args.store_dtype == "float32" else 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out, index=False)
    print(t.to_string(index=False))


if __name__ == "__main__":
    main()
