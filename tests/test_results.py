import pandas as pd
import pytest

from circuitlab.io.results import Result, check_table


def test_check_table_rejects_unknown_component_and_float_layers():
    with pytest.raises(ValueError, match="unknown component"):
        check_table(pd.DataFrame({"component": ["mlp_neuron"]}))
    with pytest.raises(ValueError, match="integers"):
        check_table(pd.DataFrame({"layer": [0.5]}))


def test_failed_save_keeps_previous_run(tmp_path):
    good = Result(pd.DataFrame({"layer": [0], "x": [1.0]}), {"experiment": "t"})
    good.save(tmp_path / "run")

    class Boom:
        def savefig(self, *a, **k):
            raise OSError("disk full")

    bad = Result(pd.DataFrame({"layer": [1], "x": [2.0]}), {"experiment": "t"}, figures={"f": Boom()})
    with pytest.raises(OSError):
        bad.save(tmp_path / "run", overwrite=True)
    assert pd.read_csv(tmp_path / "run" / "table.csv")["x"].tolist() == [1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def _full_result():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    table = pd.DataFrame({"layer": [0, 1], "component": ["head", "neuron"], "effect": [0.5, -0.25]})
    return Result(table, {"experiment": "demo", "parameters": {"k": 1}}, tables={"extra": table.head(1)},
                  figures={"curve": fig}, summary={"top": 0.5}, files={"notes.json": '{"a": 1}'})


def test_result_load_restores_everything_save_wrote(tmp_path):
    first = _full_result().save(tmp_path / "a")
    back = Result.load(first)
    pd.testing.assert_frame_equal(back.table, _full_result().table)
    assert back.summary == {"top": 0.5} and back.config["parameters"] == {"k": 1}
    assert set(back.tables) == {"extra"} and set(back.figures) == {"curve"} and set(back.files) == {"notes.json"}
    second = back.save(tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:  # a loaded run saves back byte for byte
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "is not a folder"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "is not a circuitlab run"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"experiment": "x"}')), "without its table.parquet"),
])
def test_result_load_refuses_what_is_not_a_run_in_one_line(tmp_path, make, message):
    from circuitlab.io.results import OutputError

    folder = tmp_path / "run"
    make(folder)
    with pytest.raises(OutputError, match=message) as err:
        Result.load(folder)
    assert "\n" not in str(err.value)
