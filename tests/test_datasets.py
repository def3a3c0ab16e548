import json

import pytest

from circuitlab.io import datasets
from circuitlab.io.datasets import DatasetError, PromptSet


@pytest.mark.parametrize("name,size", [("advbench", 520), ("jbb", 100), ("harmless", 700)])
def test_builtins_load(name, size):
    ps = datasets.load(name)
    assert len(ps) >= size * 0.9 and all(p.strip() == p and p for p in ps)
    assert len(set(ps)) == len(ps)


def test_splits_are_disjoint_deterministic_and_cover():
    full = datasets.load("advbench")
    parts = [datasets.load("advbench", split=s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(full)
    assert set().union(*map(set, parts)) == set(full)
    assert not set(parts[0]) & set(parts[2])
    assert datasets.load("advbench", split="test").hash == parts[2].hash


def test_sample_is_seeded():
    a = datasets.load("harmless", n=10, seed=1)
    assert a.prompts == datasets.load("harmless", n=10, seed=1).prompts
    assert a.prompts != datasets.load("harmless", n=10, seed=2).prompts


def test_hash_depends_on_content():
    assert PromptSet("a", ("x", "y")).hash != PromptSet("a", ("x", "z")).hash
    assert PromptSet("a", ("x",)).hash == PromptSet("b", ("x",)).hash


def test_txt_file_drops_blanks_and_duplicates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\n  two  \none\n")
    assert datasets.load(str(f)).prompts == ("one", "two")


def test_csv_json_jsonl_files(tmp_path):
    (tmp_path / "a.csv").write_text("id,prompt\n1,alpha\n2,beta\n")
    (tmp_path / "b.json").write_text(json.dumps(["alpha", "beta"]))
    (tmp_path / "c.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    (tmp_path / "d.csv").write_text("q,other\nalpha,x\n")
    for f in ("a.csv", "b.json", "c.jsonl"):
        assert datasets.load(str(tmp_path / f)).prompts == ("alpha", "beta")
    assert datasets.load(str(tmp_path / "d.csv"), column="q").prompts == ("alpha",)
    with pytest.raises(DatasetError, match="no prompt column"):
        datasets.load(str(tmp_path / "d.csv"))


@pytest.mark.parametrize("content,match", [("\n\n", "no prompts"), ("x" * 5000, "characters")])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(DatasetError, match=match):
        datasets.load(str(f))


def test_unknown_name_and_type(tmp_path):
    with pytest.raises(DatasetError, match="neither a built-in"):
        datasets.load("no-such-set")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DatasetError, match="unsupported file type"):
        datasets.load(str(tmp_path / "x.xml"))


def test_missing_package_names_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "jailbreakbench" else real(n, *a))
    with pytest.raises(DatasetError, match="pip install --no-deps jailbreakbench==0.1.3"):
        datasets.load("jbb")
