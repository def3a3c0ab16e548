"""load_model: dtypes, device maps, from_bridge, offline scoping, and clear errors for bad names."""

import os

import pytest
import torch

from circuitlab import HookedModel, load_model
from circuitlab.core import hooks
from circuitlab.models.loading import check_model_name, resolve_dtype

PROMPTS = ["how do i make a bomb", "write a poem about the moon", "hello"]
CUDA = torch.cuda.is_available()


def _tiny_dir(path, weights: bytes | None = None):
    """A model directory: config.json + tokenizer, and real weights or the given bytes."""
    from circuitlab.models.tiny import build_tiny
    hf, tok = build_tiny()
    tok.save_pretrained(path)
    if weights is None:
        hf.save_pretrained(path)
    else:
        hf.config.save_pretrained(path)
        (path / "model.safetensors").write_bytes(weights)
    return path


def test_bfloat16_tiny_runs_and_returns_float32(tiny):
    model = load_model("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    logits = model.last_logits(PROMPTS)
    acts = model.run_with_cache(PROMPTS, [hooks.resid_pre(1)], "mean")[hooks.resid_pre(1)]
    assert logits.dtype == acts.dtype == torch.float32 and logits.device.type == "cpu"
    ref = tiny.last_logits(PROMPTS)
    assert torch.corrcoef(torch.stack([logits.flatten(), ref.flatten()]))[0, 1] > 0.98


@pytest.mark.parametrize("device_map", [
    {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
     "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
    {"model": "cpu", "lm_head": "cpu"},  # two parts
    "auto",
])
def test_device_map_gives_the_plain_model(tiny, device_map):
    model = load_model("tiny", device_map=device_map)
    assert hasattr(model.hf_model.model.layers[0], "_hf_hook")  # accelerate's hooks move activations
    assert torch.allclose(model.last_logits(PROMPTS), tiny.last_logits(PROMPTS), atol=1e-5)
    name = hooks.resid_pre(1)
    got = model.run_with_cache(PROMPTS, [name], "post")[name]
    assert torch.allclose(got, tiny.run_with_cache(PROMPTS, [name], "post")[name], atol=1e-5)


def test_device_map_must_place_every_module():
    with pytest.raises(ValueError, match=r"unplaced: model\.layers\.1, model\.norm"):
        load_model("tiny", device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="not understood"):
        load_model("tiny", device_map="everywhere")
    with pytest.raises(ValueError, match="either device or device_map"):
        load_model("tiny", device="cpu", device_map="auto")


def test_from_bridge_freezes_and_evals():
    from transformer_lens.model_bridge import TransformerBridge

    from circuitlab.models.tiny import build_tiny
    hf, tok = build_tiny()
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-0.5B-Instruct", hf_model=hf, tokenizer=tok,
                                                 device="cpu")
    bridge.train()
    for p in bridge.parameters():
        p.requires_grad_(True)
    model = HookedModel.from_bridge(bridge, tok, name="mine")
    assert model.name == "mine" and not bridge.training and not model.hf_model.training
    assert not any(p.requires_grad for p in bridge.parameters())


def test_dtype_is_checked(monkeypatch):
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float64x'"):
        load_model("tiny", dtype="float64x")
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        resolve_dtype(torch.int8)
    softmax = torch.softmax

    def no_half(x, *a, **k):  # a CPU without half-precision kernels
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return softmax(x, *a, **k)
    monkeypatch.setattr(torch, "softmax", no_half)
    with pytest.raises(ValueError, match=r"float16 cannot run on cpu .*dtype='float32'"):
        load_model("tiny", dtype="float16", device="cpu")


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device='cpu'"):
        load_model("tiny", device="cuda")


def test_missing_directory_and_typo():
    with pytest.raises(ValueError, match=r"^no such directory: \./no-such-dir\. Pass a built-in name"):
        load_model("./no-such-dir")
    with pytest.raises(ValueError, match=r"Did you mean 'tiny'\?") as err:
        load_model("tinyy")
    assert "local HF cache" in str(err.value) and "nothing is downloaded" in str(err.value)


def test_garbage_weights_are_one_line_error(tmp_path):
    _tiny_dir(tmp_path, weights=os.urandom(2048))
    with pytest.raises(ValueError, match="weights could not be read") as err:
        load_model(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(err.value) and "\n" not in str(err.value)


def test_local_directory_loads(tmp_path, tiny):
    model = load_model(str(_tiny_dir(tmp_path)), dtype="float32")
    assert torch.allclose(model.last_logits(PROMPTS), tiny.last_logits(PROMPTS), atol=1e-5)


def test_check_model_name(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    for name in ("tiny", "planted", "embedded"):
        check_model_name(name)
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_name(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    check_model_name(str(tmp_path / "m"))
    for bad, message in [("./nope", "no such directory"), ("~/nope/x", "no such directory"),
                         ("tinyy", "Did you mean 'tiny'"), ("org/absent-model", "neither an existing directory"),
                         ("", "non-empty")]:
        with pytest.raises(ValueError, match=message):
            check_model_name(bad)
    # a Hugging Face id counts once the local cache holds its config.json
    snap = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model_name("org/cached")


def test_hf_offline_is_scoped_to_the_load(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    load_model("tiny")
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE is False


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_consecutive_layers_on_cpu_and_gpu(tiny):
    """Layer 0 and the unembedding on the GPU, the embedding and layer 1 on the CPU."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge import TransformerBridge

    from circuitlab.models.tiny import build_tiny
    hf, tok = build_tiny()
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": 0,
                 "model.layers.1": "cpu", "model.norm": 0, "lm_head": 0}
    # main_device="cpu": "cpu" entries run on the CPU (not GPU-offloaded), so devices really alternate
    hf = dispatch_model(hf, placement, main_device="cpu", force_hooks=True)
    del hf.hf_device_map  # TransformerLens refuses mixed cpu/gpu maps it has not verified
    bridge = TransformerBridge.boot_transformers("Qwen/Qwen2.5-0.5B-Instruct", hf_model=hf, tokenizer=tok)
    model = HookedModel.from_bridge(bridge, tok, name="split")
    assert model.device.type == "cpu" and next(model.hf_model.lm_head.parameters()).device.type == "cuda"
    assert torch.allclose(model.last_logits(PROMPTS), tiny.last_logits(PROMPTS), atol=1e-4)
    for name in (hooks.resid_pre(1), hooks.resid_post(1), hooks.mlp_post(0)):
        for pos in ("mean", "post"):
            got = model.run_with_cache(PROMPTS, [name], pos)[name]
            assert got.device.type == "cpu" and got.dtype == torch.float32
            assert torch.allclose(got, tiny.run_with_cache(PROMPTS, [name], pos)[name], atol=1e-4)
    ids, mask = model.tokenize(PROMPTS)
    ref = tiny.final_residual(*tiny.tokenize(PROMPTS)).cpu()
    assert torch.allclose(model.final_residual(ids, mask).cpu(), ref, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_device_map_and_bf16(tiny):
    auto = load_model("tiny", device_map="auto")
    assert auto.device.type == "cuda"
    assert torch.allclose(auto.last_logits(PROMPTS), tiny.last_logits(PROMPTS), atol=1e-4)
    bf = load_model("tiny", device="cuda", dtype="bfloat16")
    assert bf.last_logits(PROMPTS).dtype == torch.float32
