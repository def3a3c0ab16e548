import torch

from circuitlab import ActivationStore, hooks, load_model

NAMES = [hooks.resid_pre(1), hooks.mlp_post(0)]


def test_second_identical_request_runs_no_forward(tiny, harmful, tmp_path):
    store = ActivationStore(tmp_path)
    first = store.get(tiny, harmful, NAMES, "post")
    assert store.forward_batches > 0 and store.hits == 0
    batches = store.forward_batches
    second = store.get(tiny, harmful, NAMES, "post")
    assert store.forward_batches == batches
    assert store.hits == len(NAMES) * len(harmful)
    for n in NAMES:
        assert torch.equal(first[n], second[n])


def test_disk_cache_survives_a_new_store_and_matches_direct_run(tiny, harmful, tmp_path):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    fresh = ActivationStore(tmp_path)
    got = fresh.get(tiny, harmful, NAMES, "last")
    assert fresh.forward_batches == 0
    direct = tiny.run_with_cache(list(harmful), NAMES, "last")
    for n in NAMES:
        assert torch.allclose(got[n], direct[n], atol=1e-5)


def test_only_missing_entries_are_computed(tiny, harmful, tmp_path):
    store = ActivationStore(tmp_path, memory=False)
    store.get(tiny, list(harmful)[:4], NAMES, "last")
    store.misses = store.hits = 0
    store.get(tiny, list(harmful)[:6], NAMES, "last")
    assert store.hits == 4 * len(NAMES) and store.misses == 2 * len(NAMES)
    store.misses = 0
    store.get(tiny, list(harmful)[:6], NAMES + [hooks.attn_z(1)], "last")
    assert store.misses == 6  # only the new hook


def test_keys_separate_models_positions_chat_and_prompts(tiny, harmful, harmless, tmp_path):
    store = ActivationStore(tmp_path)
    a = store.get(tiny, harmful, NAMES, "last")[NAMES[0]]
    other = load_model("tiny")
    with torch.no_grad():
        other.hf_model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    b = store.get(other, harmful, NAMES, "last")[NAMES[0]]
    assert store.hits == 0 and not torch.allclose(a, b)
    store.get(tiny, harmful, NAMES, "mean")
    store.get(tiny, harmful, NAMES, "last", chat=False)
    store.get(tiny, harmless, NAMES, "last")
    assert store.hits == 0


def test_corrupt_shard_is_detected_and_recomputed(tiny, harmful, tmp_path):
    good = ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    shards = list(tmp_path.rglob("*.safetensors"))
    assert len(shards) == 1
    data = bytearray(shards[0].read_bytes())
    data[-10:] = b"\x00" * 10  # flip bytes in the tensor payload
    shards[0].write_bytes(bytes(data))
    store = ActivationStore(tmp_path)
    again = store.get(tiny, harmful, NAMES, "last")
    assert store.corrupt_shards == 1 and store.forward_batches > 0
    for n in NAMES:
        assert torch.allclose(good[n], again[n])


def test_truncated_shard_is_detected(tiny, harmful, tmp_path):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    shard = next(tmp_path.rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    store = ActivationStore(tmp_path)
    store.get(tiny, harmful, NAMES, "last")
    assert store.corrupt_shards == 1 and store.forward_batches > 0


def test_interrupted_write_leaves_no_partial_file(tiny, harmful, tmp_path, monkeypatch):
    import circuitlab.store as store_mod

    def exploding_save(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "save_file", exploding_save)
    try:
        ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    except OSError:
        pass
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.safetensors"))
