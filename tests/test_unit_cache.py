"""The store's unit cache and the one round loop: a rerun reads unit outputs back exactly; any changed input
recomputes; damage is not trusted."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import torch

from circuitlab import ActivationStore
from circuitlab.experiments import get
from circuitlab.experiments.base import Plan
from circuitlab.io.unit_cache import Rounds, UnitCache, digest, run_rounds

PARAMS = dict(k_grid=[1, 4], method="zero", random_seeds=1, judge_at="decisive", judge_harmless=False, n_text=4,
              max_new_tokens=4)


def _run(model, sets, store, **overrides):
    harmful, harmless = sets
    return get("ablation")(**{**PARAMS, **overrides}).run(model, harmful, harmless, store=store)


def test_rerun_reuses_every_unit_and_gives_the_same_table(planted, planted_sets, tmp_path, monkeypatch):
    first = _run(planted, planted_sets, ActivationStore(tmp_path))
    n = first.config["unit_cache"]["computed"]
    assert first.config["unit_cache"]["reused"] == 0 and n >= 4  # 4 scored grid points + judged points

    calls = []
    cls = get("ablation")
    original = cls.run_unit
    monkeypatch.setattr(cls, "run_unit", lambda self, *a: calls.append(1) or original(self, *a))
    store = ActivationStore(tmp_path)  # a new process's store over the same directory
    second = _run(planted, planted_sets, store)
    assert calls == [] and second.config["unit_cache"] == {**first.config["unit_cache"], "reused": n, "computed": 0}
    assert store.stats()["units_reused"] == n
    pd.testing.assert_frame_equal(first.table, second.table)

    changed = _run(planted, planted_sets, ActivationStore(tmp_path), k_grid=[1, 2])  # a parameter differs
    assert changed.config["unit_cache"]["reused"] == 0 and len(calls) == changed.config["unit_cache"]["computed"]


def test_damaged_or_foreign_files_are_recomputed(planted, planted_sets, tmp_path):
    first = _run(planted, planted_sets, ActivationStore(tmp_path))
    files = sorted((tmp_path / "units").rglob("*.pkl"))
    assert len(files) == first.config["unit_cache"]["computed"]
    files[0].write_bytes(b"not a pickle")  # cut short
    files[1].write_bytes(files[2].read_bytes())  # another unit's output under this key
    again = _run(planted, planted_sets, ActivationStore(tmp_path))
    assert again.config["unit_cache"]["computed"] == 2
    pd.testing.assert_frame_equal(first.table, again.table)


def test_memory_only_or_switched_off_stores_keep_no_units(planted, planted_sets, tmp_path):
    assert ActivationStore(disk=False).unit_cache() is None
    assert ActivationStore(tmp_path, units=False).unit_cache() is None
    result = _run(planted, planted_sets, ActivationStore(tmp_path, units=False))
    assert "unit_cache" not in result.config and not (tmp_path / "units").exists()


def test_keys_separate_model_dtype_state_and_unit(tiny, tmp_path):
    cache = UnitCache(tmp_path)
    exp = get("ablation")(**PARAMS)
    state = {"x": torch.ones(3)}
    base = cache.keys(exp, tiny, state, ["a", "b"])
    assert len(set(base)) == 2 and cache.keys(exp, tiny, {"x": torch.ones(3)}, ["a", "b"]) == base
    assert cache.keys(exp, tiny, {"x": torch.ones(3).double()}, ["a", "b"])[0] != base[0]
    assert cache.keys(get("ablation")(**{**PARAMS, "seed": 1}), tiny, state, ["a"])[0] != base[0]
    assert digest(torch.zeros(2)) == digest(torch.zeros(2)) != digest(torch.zeros(3))


def test_an_experiment_defined_outside_the_package_is_keyed_by_its_source(tiny, tmp_path, monkeypatch):
    import importlib.util
    import sys

    cache = UnitCache(tmp_path / "cache")

    def keys_after_loading(folder, comment):
        folder.mkdir()
        (folder / "plugin_exp.py").write_text(
            "from dataclasses import dataclass\nfrom circuitlab.experiments.base import UnitExperiment\n\n"
            f"@dataclass\nclass Plugin(UnitExperiment):\n    k: int = 1  # {comment}\n")
        spec = importlib.util.spec_from_file_location("plugin_exp", folder / "plugin_exp.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "plugin_exp", module)  # as an import would
        spec.loader.exec_module(module)
        return repr(module.Plugin()), cache.keys(module.Plugin(), tiny, {}, ["u"])

    (repr_a, keys_a), (repr_b, keys_b) = keys_after_loading(tmp_path / "a", "one"), keys_after_loading(tmp_path / "b", "two")
    assert repr_a == repr_b and keys_a != keys_b


class _Toy:
    """A duck-typed unit experiment with two rounds: ``unit * k`` with k=1, then with k=10 on those outputs."""

    name = "toy"

    def __init__(self):
        self.calls = []

    def __repr__(self):
        return "_Toy()"

    def run_unit(self, model, state, unit):
        self.calls.append(unit)
        return unit * state["k"]

    def next_plan(self, model, harmful, harmless, plan, outputs):
        return None if plan.label == "second" else Plan(units=outputs, state={"k": 10}, label="second")

    def merge(self, model, harmful, harmless, plan, outputs):
        return SimpleNamespace(config={}, outputs=outputs)


def test_run_rounds_reads_back_keeps_a_twice_answered_unit_once_and_reports(tmp_path):
    toy, cache, model = _Toy(), UnitCache(tmp_path), SimpleNamespace(fingerprint="m", dtype="float32",
                                                                       device=torch.device("cpu"))

    def twice(plan, todo):  # out of order, every unit answered again (a retried worker): the first answer counts
        for i in reversed(todo):
            out = toy.run_unit(model, plan.state, plan.units[i])
            yield i, out
            yield i, out + 1

    heard = []
    record = lambda step, plan, keys, done, final: heard.append((step, len(keys), sorted(done), final))
    result, rounds = run_rounds(toy, model, None, None, Plan(units=[1, 2, 3], state={"k": 1}), twice, cache=cache,
                                record=record, before_merge=lambda: heard.append("merge"))
    assert result.outputs == [10, 20, 30] and rounds == Rounds(sizes=[3, 3], reused=0, computed=6)
    assert result.config["unit_cache"] == {"reused": 0, "computed": 6, "root": str(tmp_path)}
    assert heard[0] == (0, 3, [], False) and heard[3:5] == [(0, 3, [0, 1, 2], False), (0, 3, [0, 1, 2], True)]
    assert heard[-2:] == [(1, 3, [0, 1, 2], True), "merge"]

    again, rounds = run_rounds(toy, model, None, None, Plan(units=[1, 2, 3], state={"k": 1}), twice, cache=cache)
    assert again.outputs == [10, 20, 30] and rounds.reused == 6 and len(toy.calls) == 6  # nothing ran

    elsewhere, rounds = run_rounds(toy, model, None, None, Plan(units=[1, 2, 3], state={"k": 1}), twice, cache=cache,
                                   device="cuda", threads=3)  # units run on another device or thread count
    assert elsewhere.outputs == [10, 20, 30] and rounds.computed == 6 and len(toy.calls) == 12
    plain, rounds = run_rounds(toy, model, None, None, Plan(units=[1, 2, 3], state={"k": 1}), twice)
    assert plain.outputs == [10, 20, 30] and "unit_cache" not in plain.config and rounds.computed == 6


def test_unit_keys_change_with_the_code(tiny, tmp_path, monkeypatch):
    from circuitlab.io import unit_cache

    exp, cache = get("ablation")(**PARAMS), UnitCache(tmp_path)
    before = cache.keys(exp, tiny, {}, ["a"])
    monkeypatch.setattr(unit_cache, "code_fingerprint", lambda: "edited")
    assert cache.keys(exp, tiny, {}, ["a"]) != before
