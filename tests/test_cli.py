import json

from typer.testing import CliRunner

from circuitlab.cli import app

runner = CliRunner()


def test_help_everywhere():
    for args in ([], ["--help"], ["run", "--help"], ["list", "--help"], ["datasets", "--help"], ["models", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code in (0, 2) and "Usage" in res.output


def test_list_models_datasets():
    assert "refusal-scores" in runner.invoke(app, ["list"]).output
    assert "embedded" in runner.invoke(app, ["models"]).output
    out = runner.invoke(app, ["datasets"]).output
    assert "advbench" in out and "harmless" in out


def _err(res):
    return res.output + (res.stderr if hasattr(res, "stderr") and res.stderr_bytes is not None else "")


def test_bad_arguments_exit_nonzero_without_traceback():
    cases = [
        (["run", "no-such-experiment"], "no experiment named"),
        (["run", "refusal-scores", "--harmful", "missing.txt", "--model", "tiny"], "neither a built-in"),
        (["run", "refusal-scores", "--set", "judge"], "key=value"),
        (["run", "refusal-scores", "--set", "bogus=1"], "no parameter"),
        (["run", "refusal-scores", "--set", "max_new_tokens=abc"], "not a valid int"),
        (["run", "refusal-scores", "--n", "0"], "at least 1"),
        (["run", "refusal-scores", "--model", "/no/such/dir", "--n", "2"], "no such directory"),
        (["run", "ablation", "--model", "tiny", "--n", "6", "--set", "kind=layer"], "kind="),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in _err(res), (args, _err(res))
        assert "Traceback" not in _err(res)


def test_run_on_tiny_writes_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "refusal-scores", "--model", "tiny", "--n", "3", "--out", str(out),
                              "--set", "max_new_tokens=3"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["parameters"]["max_new_tokens"] == 3
    assert (out / "refusal_scores.png").is_file()
