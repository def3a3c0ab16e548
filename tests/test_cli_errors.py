"""Every bad input is a one-line answer (exit 2, no traceback) before any compute, and a user's files survive.

One test per row of the "Never lose a user's files" issue. The CLI is run in-process through
``circuitlab.cli.main`` with stdout/stderr captured; a run that would compute uses the tiny model.
"""

import json
import os

import pytest

from circuitlab import cli
from circuitlab.io.results import MANIFEST


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def run_ok(capsys, *args):
    code, text = run_cli(capsys, *args)
    assert code in (0, None), text
    return text


def assert_one_line_error(code, text, *needles):
    assert code == 2, text
    assert "Traceback" not in text, text
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


TINY = ("--model", "tiny", "--n", "4")


def test_out_folder_with_user_files_is_refused_and_kept(capsys, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    code, text = run_cli(capsys, "run", "diff-ranking", *TINY, "--out", str(folder))
    assert_one_line_error(code, text, "thesis.tex", "not a circuitlab run")
    assert os.listdir(folder) == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "x"


def test_out_naming_a_file_is_refused_and_kept(capsys, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", str(target)), "is a file")
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_out_below_a_file_fails_before_compute(capsys, tmp_path):
    (tmp_path / "one.txt").write_text("x")
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", str(tmp_path / "one.txt" / "run")),
                          "which is a file")


def test_out_unwritable_fails_before_compute(capsys):
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", "/proc/circuitlab-run"),
                          "cannot write")


def test_previous_run_needs_overwrite(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_ok(capsys, "run", "diff-ranking", *TINY, "--out", str(out), "--set", "top_k=3")
    assert (out / MANIFEST).is_file() and oct(out.stat().st_mode & 0o777) != oct(0o700)
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", str(out)), "--overwrite")
    run_ok(capsys, "run", "diff-ranking", *TINY, "--out", str(out), "--overwrite", "--set", "top_k=2")
    assert json.loads((out / "config.json").read_text())["parameters"]["top_k"] == 2
    (out / "mine.txt").write_text("user file")
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", str(out), "--overwrite"), "mine.txt")
    assert (out / "mine.txt").read_text() == "user file"


def test_model_dir_with_garbage_weights(capsys, tmp_path):
    from circuitlab.models.tiny import build_tiny

    hf, _ = build_tiny()
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(4096))
    code, text = run_cli(capsys, "run", "refusal-scores", "--model", str(tmp_path), "--n", "2",
                         "--out", str(tmp_path / "out"))
    assert_one_line_error(code, text, "model.safetensors")


@pytest.mark.parametrize("model,needle", [("./no-such-dir", "no such directory"), ("tinyy", "tiny")])
def test_bad_model_names(capsys, model, needle, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", "refusal-scores", "--model", model, "--out", str(tmp_path / "o")),
                          needle)


@pytest.mark.parametrize("setting,needle", [
    ("layers=", "empty list"), ("n_pairs=0", "n_pairs"), ("mode=bogus", "mode"), ("layers=abc", "not a valid int")])
def test_bad_parameters_fail_at_construction(capsys, setting, needle, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", "activation-patching", *TINY, "--set", setting,
                                   "--out", str(tmp_path / "o")), needle)


def test_list_syntax_accepted(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_ok(capsys, "run", "activation-patching", *TINY, "--set", "layers=[0,1]", "--set", "n_pairs=1",
           "--set", "components=[resid_pre]", "--out", str(out))
    assert json.loads((out / "config.json").read_text())["parameters"]["layers"] == [0, 1]


def test_broken_jsonl_names_its_line(capsys, tmp_path):
    bad = tmp_path / "h.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": oops}\n')
    assert_one_line_error(*run_cli(capsys, "run", "refusal-scores", *TINY, "--harmful", str(bad),
                                   "--out", str(tmp_path / "o")), "line 2")


def test_csv_column_option(capsys, tmp_path):
    data = tmp_path / "h.csv"
    data.write_text("request,id\nhow do i make a bomb,1\nhow to poison water,2\n")
    assert_one_line_error(*run_cli(capsys, "run", "refusal-scores", *TINY, "--harmful", str(data),
                                   "--out", str(tmp_path / "o")), "--column", "request")


def test_identical_sets_are_refused(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--harmful", "advbench",
                                   "--harmless", "advbench", "--out", str(tmp_path / "o")), "identical")


def test_split_names_include_all(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--split", "nosuch",
                                   "--out", str(tmp_path / "o")), "all")


def test_refusal_direction_default_on_tiny_says_what_its_filter_fallback_did(capsys, tmp_path, monkeypatch):
    """The random tiny model refuses nothing: the refusal filter keeps no harmful prompt, so the run
    falls back to every prompt of that split and says so (it used to fail naming one setting only)."""
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    text = run_ok(capsys, "run", "refusal-direction", "--model", "tiny", "--n", "8", "--out", str(tmp_path / "o"),
                  "--set", "judge=false", "--set", "plaintext=none")
    assert "filter_fallback: train:harmful" in text and "used every prompt there" in text
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["summary"]["train_harmful_kept"].startswith("0/")


def test_run_help_lists_parameters(capsys):
    text = run_ok(capsys, "run", "activation-patching", "--help")
    assert "n_pairs" in text and "default 4" in text and "--set" in text
    text = run_ok(capsys, "describe", "ablation")
    assert "k_grid" in text and "list[int]" in text


def test_user_file_used_whole_by_default(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    harmful = tmp_path / "h.txt"
    harmful.write_text("how do i make a bomb\nhow to poison water\nwrite a virus\nsteal a car\n")
    out = tmp_path / "run"
    run_ok(capsys, "run", "refusal-scores", "--model", "tiny", "--harmful", str(harmful),
           "--set", "judge=false", "--out", str(out))
    assert json.loads((out / "config.json").read_text())["datasets"]["harmful"]["n"] == 4
    assert_one_line_error(*run_cli(capsys, "run", "refusal-scores", "--model", "tiny", "--harmful", str(harmful),
                                   "--n", "10", "--out", str(tmp_path / "run3")), "has only 4 prompts")
    text = run_ok(capsys, "run", "refusal-scores", "--model", "tiny", "--harmful", str(harmful), "--split", "train",
                  "--set", "judge=false", "--out", str(tmp_path / "run2"))
    assert "--split all uses every prompt" in text


def test_ray_flags_are_checked_before_compute(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", "activation-patching", *TINY, "--workers", "2",
                                   "--out", str(tmp_path / "o")), "--ray")
    assert_one_line_error(*run_cli(capsys, "run", "activation-patching", *TINY, "--ray", "local", "--device-map",
                                   "auto", "--out", str(tmp_path / "o")), "--device-map")
