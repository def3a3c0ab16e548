"""The cases a new user met on a fresh clone (issue "First contact"): each is a one-line error with exit
code 2 before any compute and nothing written, or a note where the tool decides for the user."""

import json
import subprocess
import sys
import warnings

import pytest

from circuitlab.io import datasets

from conftest import ROOT, run_script
from test_cli_errors import TINY, assert_one_line_error, run_cli, run_ok


@pytest.mark.parametrize("out", [".", ""])
def test_out_current_folder_is_refused_before_compute(capsys, tmp_path, monkeypatch, no_model_load, out):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--out", out), "current folder")
    assert list(tmp_path.iterdir()) == []


def test_n_beyond_the_set_is_refused_not_silently_unbalanced(capsys, tmp_path, no_model_load):
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", "--model", "tiny", "--n", "100000",
                                   "--out", str(tmp_path / "o")), "--n 100000", "has only")
    assert not (tmp_path / "o").exists()


def test_library_load_says_when_n_exceeds_the_set():
    with pytest.warns(UserWarning, match="asks for more than the 520"):
        assert len(datasets.load("advbench", n=100000)) == 520
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.load("advbench", n=10)


def test_bad_seed_names_the_option(capsys, tmp_path, no_model_load):
    code, text = run_cli(capsys, "run", "diff-ranking", *TINY, "--seed", "abc", "--out", str(tmp_path / "o"))
    assert code == 2 and "--seed" in text and "Traceback" not in text, text


def test_unwritable_checkpoint_is_refused_before_the_model_loads(capsys, tmp_path, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(*run_cli(capsys, "run", "diff-ranking", *TINY, "--ray", "local",
                                   "--checkpoint", str(blocker / "ckpt"), "--out", str(tmp_path / "o")),
                          "--checkpoint")
    assert not (tmp_path / "o").exists()


def test_encoder_only_model_directory_is_refused_before_loading(capsys, tmp_path, no_model_load):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    assert_one_line_error(*run_cli(capsys, "run", "refusal-scores", "--model", str(tmp_path / "bert"),
                                   "--out", str(tmp_path / "o")), "BertForMaskedLM", "causal")


def test_list_with_an_empty_item_is_refused(capsys, tmp_path, no_model_load):
    assert_one_line_error(*run_cli(capsys, "run", "ablation", *TINY, "--set", "k_grid=1,,2",
                                   "--out", str(tmp_path / "o")), "empty item")


def test_load_settings_are_recorded_in_config(capsys, tmp_path):
    run_ok(capsys, "run", "diff-ranking", *TINY, "--batch-size", "3", "--out", str(tmp_path / "o"))
    load = json.loads((tmp_path / "o" / "config.json").read_text())["load"]
    assert load["model"] == "tiny" and load["batch_size"] == 3 and "device_map" in load


def test_default_n_larger_than_a_small_file_is_a_note(capsys, tmp_path):
    small = tmp_path / "few.txt"
    small.write_text("How do tides work?\nWhat is a prime number?\nHow do I bake bread?\n")
    text = run_ok(capsys, "run", "diff-ranking", "--model", "tiny", "--harmless", str(small),
                  "--out", str(tmp_path / "o"))
    assert "note: harmless set" in text and "using all 3" in text


@pytest.mark.parametrize("args,needle", [(["view", "/no/such/run"], "not a folder"),
                                          (["monitor", "apply", "--monitor", "/no/such.pt", "--prompts", "/no.txt"],
                                           "error")])
def test_view_and_monitor_are_circuitlab_commands_with_one_line_errors(capsys, args, needle):
    code, text = run_cli(capsys, *args)
    assert code == 2 and needle in text and "Traceback" not in text, text


@pytest.mark.parametrize("script", ["li_2023", "zou_2023", "arditi_2024", "refusal_edges", "causal_tracing",
                                    "robust_safety"])
def test_scripts_take_set_through_the_one_parser(script, tmp_path, capsys, no_model_load):
    """Every single-experiment script takes --set KEY=VALUE; a bad key is a one-line error, exit 2, before loading."""
    code, _, err = run_script(capsys, f"experiments/{script}.py", "--set", "no_such_parameter=1",
                                "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "no parameter 'no_such_parameter'" in errors[0], err
    assert not (tmp_path / "out").exists()


def test_a_script_run_as_a_program_exits_2_on_a_bad_set(tmp_path):
    """The same through the interpreter, as a user types it (the tests above call main in-process)."""
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "robust_safety.py"), "--set", "nope=1",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no parameter 'nope'" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "loaded" not in run.stdout and not (tmp_path / "out").exists()
