"""Every registered experiment also runs on the tiny model in bfloat16 and split over a device map.

The same experiments and settings as tests/test_conformance.py (its ``FAST_PARAMS``), on two other
loads of the tiny model: ``dtype="bfloat16"`` (half-width weights and activations, float32 results) and
a device map in two parts (the transformer body and the unembedding placed separately, with
accelerate's hooks moving activations between them, as tests/test_loading.py builds it on the CPU).
Each must give a non-empty table whose measures are finite wherever the float32 model's are.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from circuitlab import ActivationStore, experiments, load_model
from test_conformance import FAST_PARAMS  # tests/ is on sys.path (pytest's default rootdir-relative imports)

TWO_PARTS = {"model": "cpu", "lm_head": "cpu"}  # body and unembedding as separate parts
VARIANTS = {"bfloat16": dict(dtype="bfloat16"), "device_map": dict(device_map=TWO_PARTS)}
# runs over ~5 s on the tiny model (2 CPU cores; bfloat16 matmuls are slow on CPUs): marked slow
SLOW = {"bfloat16": {"abliteration-search", "circuit-map", "edge-attribution", "refusal-direction", "refusal-scores",
                     "robust-hardening", "targeted-finetune"},
        "device_map": {"circuit-map", "edge-attribution", "refusal-direction", "robust-hardening", "targeted-finetune"}}


@pytest.fixture(scope="module")
def models() -> dict:
    """The tiny model as float32 (the reference), in bfloat16, and over a two-part device map."""
    out = {name: load_model("tiny", **kw) for name, kw in VARIANTS.items()}
    out["float32"] = load_model("tiny")
    return out


@pytest.fixture(scope="module")
def reference_runs() -> dict:
    """float32 tables by experiment name, run once and shared by both variants."""
    return {}


def _run(name: str, model, harmful, harmless, store_dir) -> pd.DataFrame:
    result = experiments.get(name)(**FAST_PARAMS.get(name, {})).run(model, harmful, harmless,
                                                                    store=ActivationStore(store_dir))
    return result.table


def _measures(table: pd.DataFrame) -> pd.DataFrame:
    """The float columns (measures; integer and label columns cannot be non-finite)."""
    return table.select_dtypes(include=[np.floating]).astype(float)


def _cases():
    for name in experiments.names():
        for variant in VARIANTS:
            marks = [pytest.mark.slow] if name in SLOW[variant] else []
            yield pytest.param(name, variant, marks=marks, id=f"{name}-{variant}")


@pytest.mark.parametrize("name, variant", list(_cases()))
def test_experiment_runs_in_bfloat16_and_over_a_device_map(name, variant, models, reference_runs, harmful, harmless,
                                                           tmp_path):
    table = _run(name, models[variant], harmful, harmless, tmp_path / variant)
    assert len(table) > 0
    measures = _measures(table)
    infinite = [c for c in measures if np.isinf(measures[c]).any()]
    assert not infinite, f"{name} on {variant}: infinite values in {infinite}"
    if name not in reference_runs:
        reference_runs[name] = _run(name, models["float32"], harmful, harmless, tmp_path / "float32")
    reference = _measures(reference_runs[name])
    missing = set(reference.columns) - set(measures.columns)
    assert not missing, f"{name} on {variant}: no float columns {sorted(missing)} (float32 has them)"
    # a measure the float32 model gives must not come out NaN: NaN only where float32 has it (unjudged rows ...)
    lost = [c for c in reference if reference[c].notna().any() and measures[c].isna().all()]
    assert not lost, f"{name} on {variant}: {lost} are all NaN, but finite in float32"
    if len(reference) == len(measures):
        new_nan = [c for c in reference if (measures[c].isna().to_numpy() & reference[c].notna().to_numpy()).any()]
        assert not new_nan, f"{name} on {variant}: NaN where float32 is finite in {new_nan}"
