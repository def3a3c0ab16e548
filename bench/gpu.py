"""GPU benchmark: circuitlab on a 7B-shaped chat model, on one GPU (H100/H200 class).

Builds a random-init Qwen2 model with Qwen2.5-7B-Instruct's shape (28 layers, d_model 3584,
d_mlp 18944, 28 query / 4 KV heads, vocab 152064) directly on the GPU in bf16 (no CPU copy, no
download), wraps it as circuitlab does (``TransformerBridge.boot_transformers`` +
``HookedModel.from_bridge``), and measures, each phase with its peak GPU memory
(``torch.cuda.max_memory_allocated``):

1. forward: tokens/s of ``HookedModel.forward`` on a batch of 8 x 256 random token ids;
2. patching: circuitlab's exact engine (``run_sweeps``) vs TransformerLens
   ``get_act_patch_resid_pre`` (``generic_activation_patch`` over the same cells) on one random
   64-token pair, 4 layers x 16 positions, same process; wall time, speed-up, max |difference|;
3. generation: greedy tokens/s of ``HookedModel.generate`` (batch 16 x 32 new tokens); the count
   is of tokens actually decoded (a hook on the embedding counts rows at every step).

The vocabulary stays 152064 (the unembedding is real work at this size); text prompts go through
circuitlab's tiny BPE tokenizer (ids < 512, all valid), and the forward / patching phases feed
random ids over the whole vocabulary. EAP-IG is not timed here.

    python bench/gpu.py                       # on a GPU: --shape 7b, writes results/bench/gpu_<kind>.csv
    python bench/gpu.py --shape tiny --out /tmp/b   # same code on CPU with a tiny shape (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a bench script: nothing may be fetched
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

SHAPES = {  # Qwen2.5-7B-Instruct's config.json, and a tiny one for CPU tests
    "7b": dict(n_layers=28, d_model=3584, d_mlp=18944, n_heads=28, n_kv=4, vocab=152064, dtype="bfloat16"),
    "tiny": dict(n_layers=4, d_model=64, d_mlp=128, n_heads=4, n_kv=2, vocab=1024, dtype="float32"),
}
WORK = {  # (forward batch, seq), (pair length, layers, positions), (generate batch, new tokens), (pairs, length)
    "7b": dict(forward=(8, 256), patching=(64, 4, 16), generate=(16, 32), edges=(8, 64)),
    "tiny": dict(forward=(4, 64), patching=(16, 2, 4), generate=(4, 8), edges=(2, 16)),  # a CPU test must stay fast
}


def build(shape: dict, device: torch.device, seed: int = 0):
    """A random-init Qwen2 HookedModel of ``shape``, created directly on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from circuitlab.core.model import HookedModel
    from circuitlab.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"],
                      num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                      num_key_value_heads=shape["n_kv"], max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dtype = getattr(torch, shape["dtype"])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in the target dtype, on the target device
    try:
        with torch.device(device):
            hf = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-0.5B-Instruct", hf_model=hf, tokenizer=tok,
                                                 device=device, dtype=dtype)
    return HookedModel.from_bridge(bridge, tok, name=f"qwen2-random-{shape['n_layers']}L")


class Phase:
    """Wall time (device-synchronised) and peak GPU memory of a block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t
        self.peak_gb = torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None


def bench_forward(model, device, batch: int, seq: int, reps: int) -> dict:
    ids = torch.randint(0, model.bridge.cfg.d_vocab, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.forward(ids, mask)  # warm-up: kernels, allocator
        with Phase(device) as ph:
            for _ in range(reps):
                model.forward(ids, mask)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    tokens = batch * seq * reps
    return {"phase": "forward", "method": "circuitlab", "wall_s": ph.wall, "tokens": tokens,
            "tokens_per_s": tokens / ph.wall, "tflops": 2 * n_params * tokens / ph.wall / 1e12,
            "peak_mem_gb": ph.peak_gb, "detail": f"batch {batch} x {seq} tokens, {reps} reps"}


def bench_patching(model, device, seq: int, n_layers: int, n_pos: int, batch_size: int) -> list[dict]:
    from transformer_lens import patching as tlp

    from circuitlab.experiments.patching.activation import layer_sweeps
    from circuitlab.methods.patching import run_sweeps

    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, model.bridge.cfg.d_vocab, (seq,), generator=g).to(device)
    corrupted = clean.clone()
    corrupted[seq // 2:] = torch.randint(0, model.bridge.cfg.d_vocab, (seq - seq // 2,), generator=g).to(device)
    layers = sorted({round(i * (model.n_layers - 1) / max(n_layers - 1, 1)) for i in range(n_layers)})
    positions = list(range(seq - n_pos, seq))
    metric = lambda logits: logits[:, 0].float() - logits[:, 1].float()  # noqa: E731  a logit difference
    cells = [(l, p) for l in layers for p in positions]
    sweeps = layer_sweeps(model, ["resid_pre"], layers, positions)
    run = lambda: run_sweeps(model, corrupted, clean, sweeps, metric, batch_size=batch_size)[0]  # noqa: E731
    run()  # warm-up
    with Phase(device) as ours:
        rows = run()
    mine = torch.tensor([r["metric"] for r in rows])

    with torch.no_grad():
        with Phase(device) as theirs:
            _, cache = model.bridge.run_with_cache(clean[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
            base = tlp.generic_activation_patch(
                model.bridge, corrupted[None], cache, lambda lg: metric(lg[:, -1]).mean(),
                patch_setter=tlp.layer_pos_patch_setter, activation_name="resid_pre",
                index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
        del cache
    base = base.float().cpu().reshape(-1)
    detail = f"{len(layers)} layers x {len(positions)} positions, {seq}-token pair, layers {layers}"
    common = {"phase": "patching", "tokens": len(cells) * seq, "detail": detail}
    return [
        {**common, "method": "transformer_lens", "wall_s": theirs.wall, "peak_mem_gb": theirs.peak_gb,
         "cells_per_s": len(cells) / theirs.wall},
        {**common, "method": "circuitlab", "wall_s": ours.wall, "peak_mem_gb": ours.peak_gb,
         "cells_per_s": len(cells) / ours.wall, "speedup": theirs.wall / ours.wall,
         "max_abs_diff": float((mine - base).abs().max()), "metric_spread": float(base.max() - base.min()),
         "skipped_cells": int(sum(r["skipped"] for r in rows))},
    ]


def bench_generate(model, device, batch: int, new_tokens: int) -> dict:
    from circuitlab.core import hooks as hk

    words = "how do i make a cake write a poem about the moon tell me a story with a dog".split()
    prompts = [" ".join(words[i % 7:i % 7 + 5 + i % 9]) for i in range(batch)]
    seen = {"rows": 0}

    def count(act, hook):  # each forward (prefill, then every step) yields one new token per row
        seen["rows"] += act.shape[0]

    model.generate(prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up
    with Phase(device) as ph:
        model.generate(prompts, max_new_tokens=new_tokens, batch_size=batch, fwd_hooks=[(hk.embed(), count)])
    tokens = seen["rows"]
    return {"phase": "generate", "method": "circuitlab", "wall_s": ph.wall, "tokens": tokens,
            "tokens_per_s": tokens / ph.wall, "peak_mem_gb": ph.peak_gb,
            "detail": f"greedy, batch {batch} x {new_tokens} new tokens (max), KV-cached, hooks live"}


def bench_edges(model, device, n_pairs: int, seq: int, batch_size: int = 4) -> list[dict]:
    """EAP-IG (5 steps) over the full edge graph for ``n_pairs`` random pairs, then one exact
    faithfulness evaluation of the top 1 % of edges (circuitlab.graph)."""
    from circuitlab.graph import EdgeGraph, edge_scores, faithfulness, top_n, n_for_fraction

    gen = torch.Generator().manual_seed(1)
    vocab = model.bridge.cfg.d_vocab
    pairs = [(torch.randint(0, vocab, (seq,), generator=gen), torch.randint(0, vocab, (seq,), generator=gen))
             for _ in range(n_pairs)]
    metric = lambda logits: logits[:, 0].float() - logits[:, 1].float()  # noqa: E731 - any logit metric works
    graph = EdgeGraph.from_model(model)
    with Phase(device) as ph:
        scores = edge_scores(model, pairs, metric, method="eap-ig", steps=5, batch_size=batch_size, graph=graph)
    rows = [{"phase": "edges", "method": "circuitlab EAP-IG (5 steps)", "wall_s": ph.wall, "peak_mem_gb": ph.peak_gb,
             "tokens": n_pairs * seq, "detail": f"{n_pairs} pairs x {seq} tokens, {int(graph.valid.sum())} edges, "
                                                 f"batch {batch_size}"}]
    circuit = top_n(graph, scores.mean, max(1, n_for_fraction(graph, 0.01)), pruned=False)
    with Phase(device) as ph:
        faithfulness(model, pairs, metric, circuit, batch_size=batch_size)
    rows.append({"phase": "edges", "method": "circuitlab faithfulness (top 1% of edges)", "wall_s": ph.wall,
                 "peak_mem_gb": ph.peak_gb, "tokens": n_pairs * seq, "detail": f"{n_pairs} pairs x {seq} tokens"})
    return rows


def device_kind(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b(h100|h200|h20|a100|a10g?|l40s?|l4|b200|gh200|rtx ?\d{4})\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")).replace(" ", "")


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b" if cuda else "tiny")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--out", default=None, help="output dir (default: results/bench on a GPU, a temp dir on CPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed forward passes")
    ap.add_argument("--patch-batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    device, shape = torch.device(args.device), SHAPES[args.shape]
    if args.shape == "7b" and device.type != "cuda":
        raise SystemExit("--shape 7b needs a CUDA GPU (about 16 GB of weights); use --shape tiny on CPU")
    out = Path(args.out or ("results/bench" if device.type == "cuda" else tempfile.mkdtemp(prefix="gpu_bench_")))

    with Phase(device) as ph:
        model = build(shape, device)
    rows = [{"phase": "build", "method": "random init on device + bridge", "wall_s": ph.wall,
             "peak_mem_gb": ph.peak_gb, "detail": str(model)}]
    print(rows[-1], flush=True)
    work = WORK[args.shape]
    for step in (lambda: [bench_forward(model, device, *work["forward"], args.reps)],
                 lambda: bench_patching(model, device, *work["patching"], args.patch_batch_size),
                 lambda: [bench_generate(model, device, *work["generate"])],
                 lambda: bench_edges(model, device, *work["edges"])):
        for row in step():
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    kind = device_kind(device)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.insert(0, "shape", args.shape)
    table.insert(0, "device", kind)
    table.to_csv(out / f"gpu_{kind}.csv", index=False)
    (out / f"gpu_{kind}.json").write_text(json.dumps({
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "load_average": os.getloadavg(),
        "cpus": os.cpu_count(), "shape": shape, "n_params": sum(p.numel() for p in model.hf_model.parameters()),
        "platform": platform.platform(), "argv": sys.argv[1:] if argv is None else list(argv)}, indent=2))
    print(table.to_string(index=False))
    return out / f"gpu_{kind}.csv"


if __name__ == "__main__":
    main()
