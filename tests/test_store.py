import errno
import os
import time
import warnings

import pytest
import torch

import circuitlab.io.store as store_mod
from circuitlab import ActivationStore, load_model
from circuitlab.core import hooks
from circuitlab.io.store import StoreNotWritableError

NAMES = [hooks.resid_pre(1), hooks.mlp_post(0)]


def files(root, hook=None):
    return sorted(p for p in root.rglob("*.safetensors") if hook is None or p.parent.name == hook)


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
        assert got[n].dtype == torch.float32
        assert torch.allclose(got[n], direct[n], atol=1e-5)


@pytest.mark.parametrize("memory", [True, False])
def test_offsets_are_cut_from_stored_post_rows_without_a_forward(tiny, harmful, tmp_path, memory):
    store = ActivationStore(tmp_path, memory=memory)
    post = store.get(tiny, harmful, NAMES, "post")
    batches = store.forward_batches
    last = store.get(tiny, harmful, NAMES, "last")
    pair = store.get(tiny, harmful, NAMES, [-2, -1])
    assert store.forward_batches == batches and store.misses == len(NAMES) * len(harmful)
    direct = tiny.run_with_cache(list(harmful), NAMES, "last")
    for n in NAMES:
        assert torch.equal(last[n], post[n][:, -1:]) and torch.equal(pair[n], post[n][:, -2:])
        assert torch.allclose(last[n], direct[n], atol=1e-5)
    store.get(tiny, harmful, NAMES, [-tiny.n_post - 1])  # before the post positions: only a forward has it
    assert store.forward_batches > batches


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


# ---- memory budget --------------------------------------------------------------------------

def test_memory_stays_under_budget_and_evicts_least_recently_used(tiny, harmful, harmless, tmp_path):
    row = tiny.d_model * 4  # one float32 row at 'last'
    store = ActivationStore(disk=False, memory_bytes=4 * row)
    prompts = list(harmful) + list(harmless)
    for start in range(0, len(prompts), 3):  # 20 rows through a 4-row budget
        store.get(tiny, prompts[start:start + 3], [hooks.resid_pre(0)], "last", batch_size=2)
        held = sum(t.untyped_storage().nbytes() for t in store._mem.values())  # clones, not batch views
        assert held == store.stats()["memory_bytes"] <= 4 * row
    batches = store.forward_batches
    store.get(tiny, prompts[-4:], [hooks.resid_pre(0)], "last")  # the 4 most recent: all in memory
    assert store.forward_batches == batches
    store.get(tiny, prompts[:1], [hooks.resid_pre(0)], "last")  # evicted long ago
    assert store.forward_batches == batches + 1


def test_memory_budget_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITLAB_STORE_MEMORY", "1.5K")
    assert ActivationStore(tmp_path).memory_bytes == 1536
    assert ActivationStore(tmp_path, memory_bytes="2GiB").memory_bytes == 2 << 30


# ---- layout: one file per hook and batch ----------------------------------------------------

def test_reads_are_proportional_to_the_request(tiny, harmful, tmp_path):
    many = [hooks.resid_pre(0), hooks.resid_pre(1), hooks.mlp_post(0), hooks.mlp_post(1)]
    ActivationStore(tmp_path).get(tiny, harmful, many, "last", batch_size=4)
    assert len(files(tmp_path)) == 4 * 3  # 4 hooks x 3 batches of <= 4 prompts
    everything = ActivationStore(tmp_path)
    everything.get(tiny, harmful, many, "last")
    one_hook = ActivationStore(tmp_path)
    one_hook.get(tiny, harmful, [hooks.mlp_post(1)], "last")
    assert one_hook.forward_batches == everything.forward_batches == 0
    assert one_hook.files_read == 3 * 2  # header then data of its own 3 files
    size = lambda paths: sum(f.stat().st_size for f in paths)  # noqa: E731
    own, total = size(files(tmp_path, hooks.mlp_post(1))), size(files(tmp_path))
    assert own <= one_hook.bytes_read <= 1.2 * own  # its files once, plus their headers
    assert one_hook.bytes_read / everything.bytes_read == pytest.approx(own / total, rel=0.05)
    one_prompt = ActivationStore(tmp_path)
    one_prompt.get(tiny, list(harmful)[:1], [hooks.resid_pre(0)], "last")
    assert one_prompt.files_read == 3 + 1  # 3 headers, 1 data file


# ---- reduced precision ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_storage_returns_float32(tiny, harmful, tmp_path, dtype):
    exact = ActivationStore(tmp_path / "f32").get(tiny, harmful, NAMES, "last")
    store = ActivationStore(tmp_path / "half", dtype=dtype)
    first = store.get(tiny, harmful, NAMES, "last")
    again = store.get(tiny, harmful, NAMES, "last")
    reread = ActivationStore(tmp_path / "half", dtype=dtype).get(tiny, harmful, NAMES, "last")
    for n in NAMES:
        assert first[n].dtype == torch.float32
        assert torch.equal(first[n], again[n]) and torch.equal(first[n], reread[n])  # miss == hit
        assert torch.allclose(first[n], exact[n], rtol=1e-2, atol=1e-2)
    half = sum(p.stat().st_size for p in files(tmp_path / "half"))
    full = sum(p.stat().st_size for p in files(tmp_path / "f32"))
    assert half < 0.7 * full
    assert ActivationStore(tmp_path / "f32").get(tiny, harmful, NAMES, "last")  # separate keys
    with pytest.raises(ValueError, match="dtype"):
        ActivationStore(tmp_path, dtype=torch.int8)


# ---- integrity ------------------------------------------------------------------------------

def test_corrupt_shard_is_detected_and_recomputed(tiny, harmful, tmp_path):
    good = ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    shards = files(tmp_path, NAMES[0])
    assert len(shards) == 1
    data = bytearray(shards[0].read_bytes())
    data[-10:] = b"\x00" * 10  # flip bytes in the tensor payload
    shards[0].write_bytes(bytes(data))
    store = ActivationStore(tmp_path)
    with pytest.warns(RuntimeWarning, match="recomputed"):
        again = store.get(tiny, harmful, NAMES, "last")
    assert store.corrupt_shards == 1 and store.forward_batches > 0
    assert store.misses == len(harmful)  # only the damaged hook's entries
    for n in NAMES:
        assert torch.allclose(good[n], again[n])


def test_truncated_shard_is_detected(tiny, harmful, tmp_path):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    shard = files(tmp_path)[0]
    shard.write_bytes(shard.read_bytes()[:50])
    store = ActivationStore(tmp_path)
    with pytest.warns(RuntimeWarning):
        store.get(tiny, harmful, NAMES, "last")
    assert store.corrupt_shards == 1 and store.forward_batches > 0
    assert ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last") and not store_corrupt(tmp_path)


def store_corrupt(root):
    store = ActivationStore(root)
    for p in files(root):
        store._open(p, header_only=False)
    return store.corrupt_shards


@pytest.mark.parametrize("damage", [
    lambda b: b[:8],  # header length only
    lambda b: (5).to_bytes(8, "little") + b"[1,2]",  # valid JSON, not a header
    lambda b: (2).to_bytes(8, "little") + b"{}",  # no metadata
    lambda b: (4).to_bytes(8, "little") + b"\xff\xfe{}",  # not UTF-8
    lambda b: (1 << 40).to_bytes(8, "little") + b[8:],  # header length past the end
    lambda b: b"",
])
def test_every_kind_of_damage_is_recomputed_once_with_one_warning(tiny, harmful, tmp_path, damage):
    good = ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    for p in files(tmp_path):
        p.write_bytes(damage(p.read_bytes()))
    store = ActivationStore(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = store.get(tiny, harmful, NAMES, "last")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and str(tmp_path) in messages[0]  # once per store, naming the directory
    assert store.corrupt_shards == 2 and store.hits == 0
    for n in NAMES:
        assert torch.allclose(good[n], again[n])
    assert store_corrupt(tmp_path) == 0


def test_checksum_is_verified_on_first_read_only(tiny, harmful, tmp_path, monkeypatch):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    calls = []
    real = store_mod._checksum
    monkeypatch.setattr(store_mod, "_checksum", lambda *a: calls.append(1) or real(*a))
    store = ActivationStore(tmp_path)
    store.get(tiny, harmful, NAMES, "last")
    assert len(calls) == len(files(tmp_path))
    read = store.files_read
    store.get(tiny, harmful, NAMES, "last")  # memory hit: no file read at all
    assert store.files_read == read and len(calls) == len(files(tmp_path))
    store.clear_memory()
    store.get(tiny, harmful, NAMES, "last")  # disk hit in the same process: no second checksum
    assert store.files_read > read and len(calls) == len(files(tmp_path))


def test_a_bug_is_not_mistaken_for_corruption(tiny, harmful, tmp_path, monkeypatch):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    monkeypatch.setattr(store_mod, "load_bytes", lambda data: 1 / "x")  # TypeError
    with pytest.raises(TypeError):
        ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    assert len(files(tmp_path)) == 2  # nothing deleted


def test_files_vanishing_under_a_reader_are_recomputed_not_counted_corrupt(tiny, harmful, tmp_path):
    store = ActivationStore(tmp_path)
    store.get(tiny, harmful, NAMES, "last")
    store.clear_memory()
    for p in files(tmp_path):
        p.unlink()  # as if another process had just removed them
    batches = store.forward_batches
    store.get(tiny, harmful, NAMES, "last")
    assert store.corrupt_shards == 0 and store.forward_batches > batches and len(files(tmp_path)) == 2


def test_stale_temp_files_are_removed_and_fresh_ones_kept(tiny, harmful, tmp_path):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    hook_dir = files(tmp_path, NAMES[0])[0].parent
    stale, live = hook_dir / ".old.1.a.tmp", hook_dir / ".new.2.b.tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    ActivationStore(tmp_path).get(tiny, list(harmful) + ["a new prompt"], NAMES, "last")
    assert not stale.exists() and live.exists()


# ---- interruption, read-only and full stores ------------------------------------------------

def test_each_batch_is_saved_as_it_finishes(tiny, harmful, tmp_path):
    calls = []

    def interrupt_second_batch(act, hook):
        calls.append(act.shape[0] > 1)  # a batch's shared prefix runs first, at batch size 1
        if sum(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), tiny.hooks([(hooks.resid_pre(0), interrupt_second_batch)]):
        ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last", batch_size=4)
    assert len(files(tmp_path)) == len(NAMES)  # batch 1, one file per hook
    assert not list(tmp_path.rglob("*.tmp"))
    store = ActivationStore(tmp_path)
    got = store.get(tiny, harmful, NAMES, "last", batch_size=4)
    assert store.hits == 4 * len(NAMES) and store.misses == 6 * len(NAMES) and store.forward_batches == 2
    direct = tiny.run_with_cache(list(harmful), NAMES, "last")
    for n in NAMES:
        assert torch.allclose(got[n], direct[n], atol=1e-5)


def test_unwritable_store_fails_before_computing_with_the_fix(tiny, harmful, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = ActivationStore(blocker / "store")
    with pytest.raises(StoreNotWritableError, match="CIRCUITLAB_CACHE") as err:
        store.get(tiny, harmful, NAMES, "last")
    assert str(blocker) in str(err.value) and "root=" in str(err.value)
    assert store.forward_batches == 0


def test_read_only_store_serves_hits_and_refuses_misses(tiny, harmful, tmp_path, monkeypatch):
    ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    dirs = [d for d in tmp_path.rglob("*") if d.is_dir()] + [tmp_path]
    if os.geteuid() == 0:  # root ignores permissions: refuse writes as a read-only mount would
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(store_mod.Path, "write_bytes", refuse)
        monkeypatch.setattr(store_mod, "save_file", refuse)
    for d in dirs:
        d.chmod(0o555)
    try:
        store = ActivationStore(tmp_path)
        assert store.get(tiny, harmful, NAMES, "last")
        with pytest.raises(StoreNotWritableError, match="root=") as err:
            store.get(tiny, harmful, [hooks.attn_z(0)], "last")
        assert str(tmp_path) in str(err.value) and store.forward_batches == 0
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert not list(tmp_path.rglob("*.tmp")) and len(files(tmp_path)) == len(NAMES)


def test_interrupted_write_leaves_no_partial_file(tiny, harmful, tmp_path, monkeypatch):
    def exploding_save(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", exploding_save)
    with pytest.raises(OSError, match="No space left") as err:
        ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last")
    assert isinstance(err.value, StoreNotWritableError) and str(tmp_path) in str(err.value)
    assert not list(tmp_path.rglob("*.tmp")) and not files(tmp_path)


def test_store_filling_up_mid_run_keeps_the_finished_batches(tiny, harmful, tmp_path, monkeypatch):
    real, writes = store_mod.save_file, []

    def fills_up(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) > len(NAMES):  # the second batch finds the disk full
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_mod, "save_file", fills_up)
    with pytest.raises(StoreNotWritableError):
        ActivationStore(tmp_path).get(tiny, harmful, NAMES, "last", batch_size=4)
    monkeypatch.undo()
    assert len(files(tmp_path)) == len(NAMES) and not list(tmp_path.rglob("*.tmp"))
    store = ActivationStore(tmp_path)
    store.get(tiny, harmful, NAMES, "last", batch_size=4)
    assert store.corrupt_shards == 0 and store.hits == 4 * len(NAMES)
