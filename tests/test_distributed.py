"""Distributed runs (circuitlab.distributed) on a local Ray cluster: same table as one process, retries, resume
through the unit cache a local run shares."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from circuitlab import ActivationStore
from circuitlab.distributed import DistributedError, run_distributed
from circuitlab.experiments import get, names
from circuitlab.experiments.base import Experiment
from circuitlab.experiments.patching.activation import ActivationPatching

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'circuitlab[ray]'")

# Small but complete: every component, 3 pairs, the post-instruction positions (the run stays short).
PARAMS = dict(n_pairs=3, positions="post")


@dataclass
class _Counted(ActivationPatching):
    """activation-patching that leaves one file per ``run_unit`` call in ``calls`` (counts across processes)
    and, when ``crash`` names a file that does not exist yet, creates it and kills its worker process."""

    calls: str = ""  # directory for the per-call files
    crash: str = ""  # marker file: the first unit run anywhere kills its worker, later ones do not

    def run_unit(self, model, state, unit):
        if self.crash and _first(self.crash):
            os._exit(1)  # a worker killed mid-run, as by the OOM killer or a lost node
        if self.calls:
            Path(self.calls, f"{unit.pair_id}-{os.getpid()}-{os.urandom(4).hex()}").touch()
        return super().run_unit(model, state, unit)


def _first(marker: str) -> bool:
    """True for exactly one caller across processes (exclusive create)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _calls(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in directory.iterdir())


def _same(a, b):
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    pd.testing.assert_frame_equal(a.tables["average"], b.tables["average"], check_exact=True)


def _same_everything(a, b):
    """Every table and the summary identical (the working tree's diff hash aside: others edit it meanwhile)."""
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    assert a.tables.keys() == b.tables.keys()
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], check_exact=True)
    assert {k: v for k, v in a.summary.items() if k != "dirty_tree"} == \
        {k: v for k, v in b.summary.items() if k != "dirty_tree"}


@pytest.fixture(scope="module")
def reference(tiny, harmful, harmless):
    """The single-process run every distributed run must reproduce exactly."""
    return ActivationPatching(**PARAMS).run(tiny, harmful, harmless)


class _Whole(Experiment):
    """An experiment with only ``run``: one piece of work, nothing to spread."""


def test_refuses_experiments_without_units(tiny, harmful, harmless):
    names()  # every experiment module imported, as the CLI's get() does: the message lists those loaded
    with pytest.raises(DistributedError, match="_Whole does not split into independent units") as err:
        run_distributed(_Whole(), "tiny", harmful, harmless, workers=2, model=tiny)
    assert "plan/run_unit/merge" in str(err.value)
    assert {"activation-patching", "attribution-patching", "path-patching", "pattern-patching", "ablation",
            "edge-attribution", "refusal-direction"} <= set(str(err.value).split("can: ")[1].split(", "))


def test_unreachable_address_names_it_and_the_local_option(tiny, harmful, harmless):
    with pytest.raises(DistributedError, match=r"127\.0\.0\.1:9.*--ray local"):
        run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=2, address="127.0.0.1:9",
                        model=tiny)


def test_local_cluster_matches_single_process_and_is_shut_down(tiny, harmful, harmless, reference):
    if ray.is_initialized():
        pytest.skip("a Ray connection already exists; this test checks the cluster run_distributed starts itself")
    result = run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=2, address="local",
                             model=tiny)
    assert not ray.is_initialized(), "the local cluster run_distributed started must be shut down"
    _same(result, reference)
    drop = ("dirty_tree",)  # the working tree's diff hash moves while others edit it
    assert {k: v for k, v in result.summary.items() if k not in drop} == \
        {k: v for k, v in reference.summary.items() if k not in drop}
    assert result.config["distributed"]["units"] == 3 and "provenance" in result.config
    run_only = ("provenance", "distributed")  # when and where it ran; everything else is the same record
    assert {k: v for k, v in result.config.items() if k not in run_only} == \
        {k: v for k, v in reference.config.items() if k not in run_only}


@pytest.fixture(scope="module")
def cluster():
    """The CI cluster: local, 2 CPUs (run_distributed uses an existing connection as it is)."""
    ray.init(num_cpus=2, include_dashboard=False)
    # The test's experiment class lives in this (not installed) module: ship it to the workers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def test_killed_worker_is_retried_then_resume_skips_finished_units(cluster, tiny, harmful, harmless, reference,
                                                                    tmp_path):
    calls, ckpt, crash = tmp_path / "calls", tmp_path / "ckpt", tmp_path / "crashed"
    calls.mkdir()
    exp = _Counted(**PARAMS, calls=str(calls), crash=str(crash))
    result = run_distributed(exp, "tiny", harmful, harmless, workers=2, model=tiny, checkpoint_dir=ckpt,
                             max_retries=1)
    assert crash.exists(), "a worker must have been killed for this test to mean anything"
    _same(result, reference)
    assert not result.table.duplicated(["pair_id", "component", "layer", "head", "position"]).any()
    assert result.table.groupby("pair_id").size().tolist() == reference.table.groupby("pair_id").size().tolist()
    assert _calls(calls) == [0, 1, 2]  # the killed call left no file: each unit finished exactly once
    assert ray.is_initialized(), "a connection the caller made is the caller's to close"

    # The checkpoint is a manifest; the outputs sit in the unit cache it names (no store: checkpoint/units).
    manifest = json.loads((ckpt / "run.json").read_text())
    assert Path(manifest["unit_cache"]) == (ckpt / "units").resolve() and manifest["device"] == "cpu"
    assert len(manifest["rounds"]) == 1 and manifest["rounds"][0]["done"] == [0, 1, 2]
    assert sorted(p.stem for p in (ckpt / "units").rglob("*.pkl")) == sorted(manifest["rounds"][0]["keys"])

    # A partially finished run (unit 1's output damaged) resumes: only unit 1 runs again.
    next((ckpt / "units").rglob(f"{manifest['rounds'][0]['keys'][1]}.pkl")).write_bytes(b"cut short")
    for p in calls.iterdir():
        p.unlink()
    resumed = run_distributed(exp, "tiny", harmful, harmless, workers=2, model=tiny, checkpoint_dir=ckpt)
    assert _calls(calls) == [1] and resumed.config["distributed"]["resumed_units"] == 2
    assert resumed.config["unit_cache"]["computed"] == 1
    _same(resumed, reference)

    # Everything finished: nothing runs, Ray is not even needed.
    again = run_distributed(exp, "tiny", harmful, harmless, workers=2, model=tiny, checkpoint_dir=ckpt,
                            address="127.0.0.1:9")
    assert _calls(calls) == [1]
    _same(again, reference)

    # A local run over the same unit cache reuses what the Ray workers computed.
    local = exp.run(tiny, harmful, harmless, store=ActivationStore(ckpt))
    assert _calls(calls) == [1] and local.config["unit_cache"] == {**again.config["unit_cache"], "reused": 3}
    _same(local, reference)


# Small settings that still take every round: ablation judges where its scores decide (two rounds);
# edge-attribution scores batches, then runs circuits on batches (two); refusal-direction screens, then
# scores the finalists (two).
UNIT_CASES = {
    "ablation": dict(k_grid=[1, 3], random_seeds=2, max_new_tokens=2, n_text=4),
    "edge-attribution": dict(n_pairs=6, batch_size=2, ig_steps=2, fractions=[0.1, 0.5, 1.0], random_seeds=1,
                             n_boot=2),
    "refusal-direction": dict(filter_train=False, filter_val=False, screen_prompts=2, n_finalists=2,
                              max_new_tokens=2, n_text=2, n_boot=20, component_prompts=2, progress=False),
}


@pytest.mark.parametrize("name", sorted(UNIT_CASES))
def test_unit_experiments_on_the_cluster_match_single_process_and_resume(cluster, name, tiny, harmful, harmless,
                                                                         tmp_path):
    """Every round runs on the cluster and checkpoints; a rerun runs nothing (no Ray needed), same tables."""
    local = get(name)(**UNIT_CASES[name]).run(tiny, harmful, harmless, store=ActivationStore(memory=True, disk=False))
    store = ActivationStore(memory=True, disk=False)
    result = run_distributed(get(name)(**UNIT_CASES[name]), "tiny", harmful, harmless, workers=2, model=tiny,
                             checkpoint_dir=tmp_path, store=store)
    _same_everything(result, local)
    rounds = result.config["distributed"]["rounds"]
    assert len(rounds) == 2 and min(rounds) >= 1 and result.config["distributed"]["units"] == sum(rounds)
    manifest = json.loads((tmp_path / "run.json").read_text())["rounds"]
    assert [len(r["keys"]) for r in manifest] == rounds
    assert all(r["done"] == list(range(len(r["keys"]))) for r in manifest)
    again = run_distributed(get(name)(**UNIT_CASES[name]), "tiny", harmful, harmless, workers=2, model=tiny,
                            checkpoint_dir=tmp_path, address="127.0.0.1:9", store=store)
    assert again.config["distributed"]["resumed_units"] == again.config["distributed"]["units"]
    assert again.config["unit_cache"]["computed"] == 0
    _same_everything(again, result)


def test_checkpoints_of_another_run_are_refused(tiny, harmful, harmless, tmp_path):
    ckpt, nowhere = tmp_path / "ckpt", "127.0.0.1:9"
    with pytest.raises(DistributedError, match="cannot reach"):  # run.json is written before Ray is needed
        run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=1, model=tiny,
                        checkpoint_dir=ckpt, address=nowhere)
    with pytest.raises(DistributedError, match="another run"):
        run_distributed(ActivationPatching(n_pairs=2, positions="post"), "tiny", harmful, harmless, workers=1,
                        model=tiny, checkpoint_dir=ckpt, address=nowhere)


def test_units_of_a_local_run_are_reused_and_a_code_change_recomputes(tiny, harmful, harmless, tmp_path,
                                                                      monkeypatch, reference):
    """Ray and local runs share one unit cache and its keys: a local run's units need no Ray at all; a code
    change (same manifest, same run) recomputes; a damaged unit file is recomputed, never trusted."""
    from circuitlab.io import unit_cache

    ckpt, nowhere, store = tmp_path / "ckpt", "127.0.0.1:9", tmp_path / "store"
    local = ActivationPatching(**PARAMS).run(tiny, harmful, harmless, store=ActivationStore(store))
    assert local.config["unit_cache"]["computed"] == 3
    ray_run = run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=2, model=tiny,
                              store=ActivationStore(store), checkpoint_dir=ckpt, address=nowhere, device="cpu")
    _same(ray_run, reference)
    assert ray_run.config["unit_cache"] == {**local.config["unit_cache"], "reused": 3, "computed": 0}
    assert ray_run.config["distributed"]["resumed_units"] == 3
    manifest = json.loads((ckpt / "run.json").read_text())
    assert Path(manifest["unit_cache"]) == (store / "units").resolve()
    assert manifest["rounds"][0]["done"] == [0, 1, 2] and not (ckpt / "units").exists()

    files = sorted((store / "units").rglob("*.pkl"))
    intact = files[0].read_bytes()
    files[0].write_bytes(b"not a pickle")
    with pytest.raises(DistributedError, match="cannot reach"):  # one unit to compute again: Ray is needed
        run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=2, model=tiny,
                        store=ActivationStore(store), checkpoint_dir=ckpt, address=nowhere)
    assert len(json.loads((ckpt / "run.json").read_text())["rounds"][0]["done"]) == 2  # the damaged one is not
    files[0].write_bytes(intact)

    monkeypatch.setattr(unit_cache, "code_fingerprint", lambda: "edited")
    with pytest.raises(DistributedError, match="cannot reach"):  # every unit recomputes; the manifest still fits
        run_distributed(ActivationPatching(**PARAMS), "tiny", harmful, harmless, workers=2, model=tiny,
                        store=ActivationStore(store), checkpoint_dir=ckpt, address=nowhere)
    assert json.loads((ckpt / "run.json").read_text())["rounds"][0]["done"] == []
