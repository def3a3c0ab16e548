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
