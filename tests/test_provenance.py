"""The dirty flag: any code change (tracked edit or new file) marks a run, outputs under results/ do not."""

from __future__ import annotations

import subprocess

import pytest

from circuitlab.io.provenance import git_state


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a\n1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_a_clean_tree_is_not_dirty(repo):
    state = git_state(repo)
    assert state["commit"] and state["dirty"] is False and state["diff_sha256"] is None


def test_edited_or_new_code_is_dirty_and_hashed_by_content(repo):
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    first = git_state(repo)
    (repo / "pkg" / "code.py").write_text("x = 3\n")
    second = git_state(repo)
    assert first["dirty"] and second["dirty"] and first["diff_sha256"] != second["diff_sha256"]
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    (repo / "pkg" / "new.py").write_text("y = 1\n")  # untracked code counts
    assert git_state(repo)["dirty"]


def test_results_written_by_a_run_do_not_make_the_tree_dirty(repo):
    (repo / "results" / "table.csv").write_text("a\n2\n")
    (repo / "results" / "new_run").mkdir()
    (repo / "results" / "new_run" / "summary.json").write_text("{}")
    assert git_state(repo)["dirty"] is False


def test_outside_git_there_is_no_state(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "diff_sha256": None}


def test_a_process_records_the_code_of_its_first_run(monkeypatch):
    """A multi-seed process keeps the commit it imported: later commits or edits do not relabel its runs."""
    from circuitlab.io import provenance

    states = iter([{"commit": "a" * 40, "dirty": False, "diff_sha256": None},
                   {"commit": "b" * 40, "dirty": True, "diff_sha256": "x"}])
    monkeypatch.setattr(provenance, "_PROCESS_CODE", None)
    monkeypatch.setattr(provenance, "git_state", lambda repo=None: next(states))
    first, second = provenance.start(), provenance.start()
    assert first["commit"] == second["commit"] == "a" * 40 and second["dirty"] is False
