"""ActivationStore: the one cache-first path from (model, prompts, hooks, positions) to tensors.

Layout: ``root/<model fingerprint>/<chat|raw>/<position spec>/<shard>.safetensors``. A shard
holds one batch of computed activations: tensors named by hook, one row per prompt, the
prompt hashes and a checksum in its metadata. Keys therefore separate models (by weights,
not name), chat-template setting, position spec, hook and prompt content. Shards are written
to a temp file and renamed; a shard that fails to open or fails its checksum is deleted and
its entries recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .embedded import cache_dir
from .model import HookedModel, resolve_positions

__all__ = ["ActivationStore", "prompt_key"]


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:24]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ActivationStore:
    """Cache of activations on disk (safetensors) and in memory.

    ``get`` returns cached rows and computes every missing (hook, prompt) entry in one batched
    pass. ``hits`` / ``misses`` count entries; ``forward_batches`` counts model batches run.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, memory: bool = True, disk: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "activations"
        self.memory = memory
        self.disk = disk
        self._mem: dict[tuple, torch.Tensor] = {}
        self._indexed: set[Path] = set()
        self._index: dict[tuple, tuple[Path, int]] = {}  # (ns, hook, prompt) -> (shard, row)
        self.hits = 0
        self.misses = 0
        self.forward_batches = 0
        self.corrupt_shards = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "forward_batches": self.forward_batches,
                "corrupt_shards": self.corrupt_shards}

    def _namespace(self, model: HookedModel, chat: bool, spec: str) -> Path:
        safe_spec = spec.replace(",", "_").replace("-", "m")
        return self.root / model.fingerprint / ("chat" if chat else "raw") / safe_spec

    # ---- disk index -----------------------------------------------------------------------

    def _scan(self, ns: Path) -> None:
        """Index every readable shard of a namespace (headers only; data read on demand)."""
        if ns in self._indexed or not ns.is_dir():
            self._indexed.add(ns)
            return
        for shard in sorted(ns.glob("*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as f:
                    meta = f.metadata() or {}
                keys = json.loads(meta["prompts"])
                hooks = json.loads(meta["hooks"])
            except Exception:
                self._discard(shard)
                continue
            for h in hooks:
                for row, k in enumerate(keys):
                    self._index[(ns, h, k)] = (shard, row)
        self._indexed.add(ns)

    def _discard(self, shard: Path) -> None:
        self.corrupt_shards += 1
        shard.unlink(missing_ok=True)
        for key in [k for k, (s, _) in self._index.items() if s == shard]:
            del self._index[key]

    def _read_shard(self, shard: Path) -> dict[str, torch.Tensor] | None:
        """All tensors of a shard, or None (and the shard deleted) if it fails its checksum."""
        try:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if _checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
            return tensors
        except Exception:
            self._discard(shard)
            return None

    def _write_shard(self, ns: Path, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        ns.mkdir(parents=True, exist_ok=True)
        final = ns / f"{uuid.uuid4().hex}.safetensors"
        tmp = final.with_suffix(".tmp")
        tensors = {h: t.contiguous() for h, t in tensors.items()}
        meta = {"prompts": json.dumps(keys), "hooks": json.dumps(sorted(tensors)), "checksum": _checksum(tensors)}
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, final)  # atomic: readers see the whole shard or none of it
        finally:
            tmp.unlink(missing_ok=True)
        for h in tensors:
            for row, k in enumerate(keys):
                self._index[(ns, h, k)] = (final, row)

    # ---- public ---------------------------------------------------------------------------

    def get(self, model: HookedModel, prompts: Sequence[str], names, positions="last", *,
            chat: bool = True, batch_size: int = 16, progress: bool = True) -> dict[str, torch.Tensor]:
        """Activations ``{hook: [n_prompts, n_positions, ...]}`` (``[n_prompts, ...]`` for 'mean')."""
        names = model.check_hooks(names)
        prompts = list(getattr(prompts, "prompts", prompts))
        if not prompts:
            raise ValueError("no prompts given")
        pos = resolve_positions(positions, model.n_post if chat else 0)
        ns = self._namespace(model, chat, pos.spec)
        keys = [prompt_key(p) for p in prompts]
        found: dict[tuple, torch.Tensor] = {}
        if self.disk:
            self._scan(ns)
        shard_cache: dict[Path, dict | None] = {}
        for h in names:
            for k in set(keys):
                entry = self._mem.get((ns, h, k)) if self.memory else None
                if entry is None and self.disk and (ns, h, k) in self._index:
                    shard, row = self._index[(ns, h, k)]
                    if shard not in shard_cache:
                        shard_cache[shard] = self._read_shard(shard)
                    data = shard_cache[shard]
                    entry = data[h][row] if data is not None and h in data else None
                if entry is not None:
                    found[(h, k)] = entry
        missing_prompts = list(dict.fromkeys(
            p for p, k in zip(prompts, keys) if any((h, k) not in found for h in names)))
        missing_hooks = [h for h in names if any((h, prompt_key(p)) not in found for p in missing_prompts)]
        self.hits += sum((h, k) in found for h in names for k in keys)
        self.misses += sum((h, k) not in found for h in names for k in keys)
        if missing_prompts:
            self.forward_batches += -(-len(missing_prompts) // batch_size)
            fresh = model.run_with_cache(missing_prompts, missing_hooks, pos, chat=chat, batch_size=batch_size,
                                         progress=progress, desc=f"caching {len(missing_hooks)} hooks")
            miss_keys = [prompt_key(p) for p in missing_prompts]
            if self.disk:
                self._write_shard(ns, miss_keys, fresh)
            for h, t in fresh.items():
                for row, k in enumerate(miss_keys):
                    found[(h, k)] = t[row]
        if self.memory:
            for (h, k), t in found.items():
                self._mem[(ns, h, k)] = t
        return {h: torch.stack([found[(h, k)] for k in keys]) for h in names}

    def clear_memory(self) -> None:
        self._mem.clear()
