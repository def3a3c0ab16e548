"""Two real processes filling the same store at the same time neither corrupt nor lose entries."""

import multiprocessing as mp

import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks

NAMES = [hooks.resid_pre(0), hooks.resid_pre(1), hooks.mlp_post(1)]


def _worker(root, prompts, out, barrier):
    import os

    os.environ["CIRCUITLAB_PROGRESS"] = "0"
    os.environ["HF_HUB_OFFLINE"] = "1"
    from circuitlab import load_model

    model = load_model("tiny")
    store = ActivationStore(root)
    barrier.wait(timeout=300)  # both models loaded: start writing at the same moment
    results = [store.get(model, prompts, NAMES, pos, batch_size=3, progress=False) for pos in ("last", "post")]
    reread = ActivationStore(root)  # from disk, while the other process may still be writing
    again = reread.get(model, prompts, NAMES, "last", batch_size=3, progress=False)
    torch.save({"results": results, "again": again, "corrupt": store.corrupt_shards + reread.corrupt_shards}, out)


def test_two_processes_computing_the_same_entries(tiny, harmful, harmless, tmp_path):
    prompts = list(harmful) + list(harmless)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "store"), prompts, str(o), barrier)) for o in outs]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=400)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = (torch.load(o) for o in outs)
    assert a["corrupt"] == b["corrupt"] == 0
    for ra, rb in zip(a["results"] + [a["again"]], b["results"] + [b["again"]]):
        for n in NAMES:
            assert torch.equal(ra[n], rb[n])
    assert not list((tmp_path / "store").rglob("*.tmp"))

    third = ActivationStore(tmp_path / "store")
    for pos, expected in zip(("last", "post"), a["results"]):
        got = third.get(tiny, prompts, NAMES, pos, batch_size=3, progress=False)
        for n in NAMES:
            assert torch.equal(got[n], expected[n])
    assert third.misses == third.forward_batches == third.corrupt_shards == 0
    assert third.hits == 2 * len(NAMES) * len(prompts)
