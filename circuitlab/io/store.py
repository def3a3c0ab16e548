"""ActivationStore: the one cache-first path from (model, prompts, hooks, positions) to tensors.

Layout: ``root/<model fingerprint>/<chat|raw>/<position spec>[-<dtype>]/<hook>/<chunk>.safetensors``.
One file holds one hook's activations for one forward batch ("chunk") of prompts: a tensor
``acts`` with one row per prompt, and in its metadata the prompts' content hashes and a sha256
over those hashes and the tensor bytes. The chunk name is a hash of its prompt hashes, so
processes computing the same batch write the same file. Keys therefore separate models (by
weights, not name), chat-template setting, position spec, storage dtype, hook and prompt
content, and a request reads only the files of the hooks it asks for.

Guarantees:

- Memory is bounded: an LRU of rows holds at most ``memory_bytes`` (``CIRCUITLAB_STORE_MEMORY``,
  e.g. ``512M``; default 2 GiB).
- Writes are atomic: a uniquely named temp file in the same directory, then ``os.replace``.
  Concurrent writers (processes or machines on a shared filesystem) at worst write the same
  complete file twice; readers see a whole file or none, and tolerate files vanishing. There
  is no fsync: a file cut short by a machine crash fails its checksum. Temp files a killed
  writer left behind are removed after a day.
- A request for some post-instruction offsets (``'last'``, ``[-2, -1]``) is cut from ``'post'`` rows already
  stored for the same prompts (one forward pass holds them all) before anything is recomputed.
- Each batch is written as soon as it is computed: an interruption loses at most one batch.
- A file's checksum is verified the first time this process reads it (memory hits skip it).
  A file that fails the check or does not parse is deleted and recomputed, never trusted, and
  the store warns once.
- A store that cannot be written (read-only, full, missing) fails with a message naming the
  directory and the fix, before any forward pass where it can, and leaves no partial file.
- ``dtype=torch.bfloat16`` / ``torch.float16`` halves disk and memory use; ``get`` always returns
  float32 (rounded through the storage dtype, so hits and misses agree exactly).
- Beside the activations, ``root/units/`` holds unit experiments' unit outputs keyed by content
  (``unit_cache``, module ``circuitlab.io.unit_cache``): a rerun of the same code, parameters, weights
  and prompts reads its scored grid points back instead of recomputing them. ``units=False`` turns
  it off; a memory-only store (``disk=False``) has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from circuitlab.io.files import atomic_path
from circuitlab.io.paths import cache_dir
from circuitlab.core.model import HookedModel, resolve_positions
from circuitlab.core.progress import progress_bar
from circuitlab.io.unit_cache import UnitCache

__all__ = ["ActivationStore", "StoreNotWritableError", "prompt_key"]

_DEFAULT_MEMORY = 2 << 30
_MAX_HEADER = 64 << 20  # a larger header length can only come from a damaged file
_STALE_TMP_S = 24 * 3600  # temp files this old were left by a killed writer
_DTYPES = {None: None, torch.float32: None, torch.bfloat16: "bf16", torch.float16: "f16"}


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:24]


class StoreNotWritableError(OSError):
    """The store directory cannot be created or written (read-only, full, or not a directory)."""


class _Corrupt(Exception):
    """A cache file that exists but cannot be trusted (bad header, checksum or length)."""


# Errors that mean "this file is damaged"; anything else is a bug and must propagate.
_CORRUPTION = (_Corrupt, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, OSError)


def _checksum(keys_json: str, data) -> str:
    digest = hashlib.sha256(keys_json.encode())
    digest.update(data)
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _parse_bytes(text: str) -> int:
    """``"2147483648"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` -> bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _parse_header(raw: bytes) -> tuple[list[str], str, str]:
    """``(prompt keys, their JSON text, checksum)`` from a safetensors header, or ``_Corrupt``."""
    header = json.loads(raw)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(f), str) for f in ("prompts", "checksum")):
        raise _Corrupt("header is not a store header")
    keys, info = json.loads(meta["prompts"]), header["acts"]
    shape = info.get("shape") if isinstance(info, dict) else None
    if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
            or not isinstance(shape, list) or not shape or shape[0] != len(keys)):
        raise _Corrupt("prompt list and tensor rows disagree")
    return keys, meta["prompts"], meta["checksum"]


def _default_root() -> Path:
    try:
        return cache_dir() / "activations"
    except OSError:  # an unwritable cache root is reported by get, with the fix, on the first miss
        return Path(os.environ.get("CIRCUITLAB_CACHE", Path.home() / ".cache" / "circuitlab")) / "activations"


class ActivationStore:
    """Cache of activations on disk (safetensors, one file per hook and batch) and in memory (LRU).

    ``get`` returns cached rows and computes every missing (hook, prompt) entry in batched
    forward passes, saving each batch as it finishes. ``hits`` / ``misses`` count entries;
    ``forward_batches`` counts model batches run; ``corrupt_shards`` counts files discarded;
    ``files_read`` / ``bytes_read`` count disk reads (headers included).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, memory: bool = True, disk: bool = True,
                 memory_bytes: int | str | None = None, dtype: torch.dtype | None = None, units: bool = True):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use None (float32), torch.bfloat16 or torch.float16")
        self.root = Path(root) if root is not None else _default_root()
        self.memory = memory
        self.disk = disk
        if memory_bytes is None:
            memory_bytes = os.environ.get("CIRCUITLAB_STORE_MEMORY", _DEFAULT_MEMORY)
        self.memory_bytes = _parse_bytes(memory_bytes) if isinstance(memory_bytes, str) else int(memory_bytes)
        self.dtype = dtype if _DTYPES[dtype] else None
        self._mem: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._mem_used = 0
        self._index: dict[Path, dict[str, Path]] = {}  # hook dir -> prompt key -> file
        self._seen: set[Path] = set()  # files whose header is in the index
        self._verified: set[tuple] = set()  # (path, inode, size, mtime) whose checksum passed
        self._warned = False
        self.hits = self.misses = self.forward_batches = self.corrupt_shards = 0
        self.files_read = self.bytes_read = 0
        self._units = UnitCache(self.root / "units") if disk and units else None

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "forward_batches": self.forward_batches,
                "corrupt_shards": self.corrupt_shards, "files_read": self.files_read,
                "bytes_read": self.bytes_read, "memory_bytes": self._mem_used,
                "units_reused": self._units.reused if self._units else 0,
                "units_computed": self._units.computed if self._units else 0}

    def unit_cache(self) -> UnitCache | None:
        """The content-keyed cache of unit outputs under ``root/units`` (None: memory-only or ``units=False``)."""
        return self._units

    def clear_memory(self) -> None:
        self._mem.clear()
        self._mem_used = 0

    def _namespace(self, model: HookedModel, chat: bool, spec: str) -> Path:
        safe_spec = spec.replace(",", "_").replace("-", "m")
        if self.dtype is not None:
            safe_spec += "-" + _DTYPES[self.dtype]
        return self.root / model.fingerprint / ("chat" if chat else "raw") / safe_spec

    # ---- memory (LRU) ---------------------------------------------------------------------

    def _remember(self, key: tuple, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if not self.memory or size > self.memory_bytes or key in self._mem:
            return
        self._mem[key] = row.clone()  # a clone: a view would keep its whole batch alive
        self._mem_used += size
        while self._mem_used > self.memory_bytes:
            _, old = self._mem.popitem(last=False)
            self._mem_used -= old.numel() * old.element_size()

    def _recall(self, key: tuple) -> torch.Tensor | None:
        row = self._mem.get(key)
        if row is not None:
            self._mem.move_to_end(key)
        return row

    # ---- disk -----------------------------------------------------------------------------

    def _open(self, path: Path, header_only: bool) -> tuple[list[str], torch.Tensor | None] | None:
        """``(prompt keys, acts)`` of a file (acts None for a header-only read); None if it vanished
        or is damaged (then deleted). The checksum is verified on the first full read in this process."""
        st = None
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # of the opened file: a concurrent replace cannot mix versions
                data = f.read(8) if header_only else f.read()
                if header_only and len(data) == 8:
                    data += f.read(min(int.from_bytes(data, "little"), _MAX_HEADER))
            self.files_read += 1
            self.bytes_read += len(data)
            n = int.from_bytes(data[:8], "little")
            if len(data) < 8 or n > min(_MAX_HEADER, len(data) - 8):
                raise _Corrupt("truncated header")
            keys, keys_json, checksum = _parse_header(data[8:8 + n])
            if header_only:
                return keys, None
            stamp = (path, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp not in self._verified:
                if _checksum(keys_json, memoryview(data)[8 + n:]) != checksum:
                    raise _Corrupt("checksum mismatch")
                self._verified.add(stamp)
            return keys, load_bytes(data)["acts"]
        except _CORRUPTION as e:
            if st is None:  # could not open (removed by another process, stale handle): a miss, not damage
                self._forget(path)
            else:
                self._discard(path, st, e)
            return None

    def _discard(self, path: Path, st: os.stat_result, why: Exception) -> None:
        """Delete a damaged file (unless another process has already replaced it) and warn once."""
        self.corrupt_shards += 1
        with contextlib.suppress(OSError):  # already gone, or read-only: never trusted either way
            if os.stat(path).st_ino == st.st_ino:  # not a good copy another process just renamed in
                path.unlink()
        self._forget(path)
        if not self._warned:
            self._warned = True
            warnings.warn(f"ActivationStore: damaged cache file(s) in {path.parent} ({why}) were deleted "
                          "and their entries recomputed", RuntimeWarning, stacklevel=5)

    def _forget(self, path: Path) -> None:
        self._seen.discard(path)
        index = self._index.get(path.parent, {})
        for k in [k for k, p in index.items() if p == path]:
            del index[k]

    def _refresh(self, hook_dir: Path) -> dict[str, Path]:
        """Index the headers of files in ``hook_dir`` not seen yet (other processes may add some)."""
        index = self._index.setdefault(hook_dir, {})
        try:
            entries = list(os.scandir(hook_dir))
        except OSError:  # absent or unlistable: its entries are misses, and a write reports the problem
            return index
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):  # a killed writer's leftover; live ones are young
                    if time.time() - entry.stat().st_mtime > _STALE_TMP_S:
                        path.unlink()
                continue
            if not entry.name.endswith(".safetensors") or path in self._seen:
                continue
            opened = self._open(path, header_only=True)
            if opened is not None:
                self._seen.add(path)
                index.update((k, path) for k in opened[0])
        return index

    def _check_writable(self, dirs: list[Path]) -> None:
        """Create ``dirs`` and write a probe file, or raise a clear error before any compute."""
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            probe = dirs[0] / f".probe-{uuid.uuid4().hex}.tmp"
            try:
                probe.write_bytes(b"x")
            finally:
                probe.unlink(missing_ok=True)
        except OSError as e:
            raise self._unwritable(dirs[0], e) from e

    def _unwritable(self, where: Path, e: OSError) -> StoreNotWritableError:
        return StoreNotWritableError(
            f"ActivationStore cannot write to {where} ({e.strerror or e}); nothing was half-written. "
            "Point the store at a writable directory with free space: set CIRCUITLAB_CACHE=/some/dir or "
            "pass ActivationStore(root=...), or use ActivationStore(disk=False) to keep activations in memory only.")

    def _write(self, hook_dir: Path, keys: list[str], acts: torch.Tensor) -> None:
        """Write one hook's rows for one batch: temp file in the same directory, then rename."""
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:24]
        final = hook_dir / f"{name}.safetensors"
        acts = acts.contiguous()
        keys_json = json.dumps(keys)
        meta = {"prompts": keys_json, "checksum": _checksum(keys_json, _tensor_bytes(acts)), "format": "1"}
        try:
            with atomic_path(final) as tmp:  # readers see the whole file or none of it
                save_file({"acts": acts}, str(tmp), metadata=meta)
        except OSError as e:
            raise self._unwritable(hook_dir, e) from e
        self._forget(final)
        self._seen.add(final)
        self._index.setdefault(hook_dir, {}).update((k, final) for k in keys)

    # ---- public ---------------------------------------------------------------------------

    def get(self, model: HookedModel, prompts: Sequence[str], names, positions="last", *,
            chat: bool = True, batch_size: int = 16, progress: bool = True) -> dict[str, torch.Tensor]:
        """Activations ``{hook: [n_prompts, n_positions, ...]}`` (``[n_prompts, ...]`` for 'mean'), float32."""
        names = model.check_hooks(names)
        prompts = list(getattr(prompts, "prompts", prompts))
        if not prompts:
            raise ValueError("no prompts given")
        pos = resolve_positions(positions, model.n_post if chat else 0)
        ns = self._namespace(model, chat, pos.spec)
        keys = [prompt_key(p) for p in prompts]
        unique = list(dict.fromkeys(keys))
        found: dict[tuple, torch.Tensor] = {}
        for h in names:
            for k in unique:
                row = self._recall((ns, h, k)) if self.memory else None
                if row is not None:
                    found[(h, k)] = row
            if self.disk:
                self._read_disk(ns / h, h, [k for k in unique if (h, k) not in found], found)
        if chat and model.n_post > 0 and pos.offsets is not None and pos.spec != "post":
            self._cut_from_post(model, names, unique, pos, found)
        self.hits += sum((h, k) in found for h in names for k in keys)
        self.misses += sum((h, k) not in found for h in names for k in keys)
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if any((h, k) not in found for h in names)))
        if missing:
            hooks = [h for h in names if any((h, prompt_key(p)) not in found for p in missing)]
            if self.disk:
                self._check_writable([ns / h for h in hooks])
            self._compute(model, missing, hooks, pos, ns, chat, batch_size, progress, found)
        for h in names:
            for k in unique:
                self._remember((ns, h, k), found[(h, k)])
        return {h: torch.stack([found[(h, k)] for k in keys]).float() for h in names}

    def _cut_from_post(self, model: HookedModel, names: list[str], keys: list[str], pos, found: dict) -> None:
        """Fill ``found`` for an offsets request (``'last'``, ``[-3, -1]``) from stored ``'post'`` rows, which
        hold every post-instruction position of the same forward pass: the rows are sliced, not recomputed."""
        post = resolve_positions("post", model.n_post)
        if not set(pos.offsets) <= set(post.offsets):
            return
        index = [post.offsets.index(o) for o in pos.offsets]
        ns = self._namespace(model, True, post.spec)
        for h in names:
            wanted, rows = [k for k in keys if (h, k) not in found], {}
            for k in wanted:
                row = self._recall((ns, h, k)) if self.memory else None
                if row is not None:
                    rows[(h, k)] = row
            if self.disk:
                self._read_disk(ns / h, h, [k for k in wanted if (h, k) not in rows], rows)
            found.update((key, row[index].clone()) for key, row in rows.items())

    def _read_disk(self, hook_dir: Path, hook: str, wanted: list[str], found: dict) -> None:
        """Fill ``found`` from the files holding ``wanted`` keys; each file is read once."""
        wanted_set = set(wanted)
        for _ in range(2):  # a second pass finds rows whose file another process just replaced
            still = [k for k in wanted if (hook, k) not in found]
            index = self._index.get(hook_dir, {})
            if still and any(k not in index for k in still):
                index = self._refresh(hook_dir)
            paths = list(dict.fromkeys(index[k] for k in still if k in index))
            if not paths:
                return
            for path in paths:
                opened = self._open(path, header_only=False)
                for k, row in zip(*opened) if opened else ():
                    if k in wanted_set:
                        found[(hook, k)] = row

    def _compute(self, model, prompts, hooks, pos, ns, chat, batch_size, progress, found) -> None:
        """Forward ``prompts`` in length-sorted batches, saving each batch to disk as it finishes."""
        lengths = model.token_lengths(prompts, chat)
        order = sorted(range(len(prompts)), key=lengths.__getitem__)  # similar lengths: little padding
        chunks = [[prompts[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        for chunk in progress_bar(chunks, progress, total=len(chunks), desc=f"caching {len(hooks)} hooks"):
            fresh = model.run_with_cache(chunk, hooks, pos, chat=chat, batch_size=len(chunk))
            self.forward_batches += 1
            ckeys = [prompt_key(p) for p in chunk]
            for h, acts in fresh.items():
                if self.dtype is not None:
                    acts = acts.to(self.dtype)  # round now, so a later hit returns the same numbers
                if self.disk:
                    self._write(ns / h, ckeys, acts)
                found.update(((h, k), row) for k, row in zip(ckeys, acts))
