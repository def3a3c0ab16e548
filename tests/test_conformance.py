"""Every registered experiment must pass this on the tiny model (the framework's one contract)."""

import dataclasses
import inspect
import json

import pytest

from circuitlab import ActivationStore, experiments
from circuitlab.io.results import SHARED_COLUMNS, Result, load_result

# Small settings so each experiment runs in seconds on the tiny model.
FAST_PARAMS: dict[str, dict] = {
    "robust-hardening": {"steps": 2, "n_neurons": 3, "n_heads": 2, "variants": ["targeted"], "n_train": 4,
                         "batch_size": 2, "n_retain": 3, "retain_tokens": 3, "judge": False, "n_text": 2,
                         "n_eval": 3, "n_val": 2, "n_attack": 4, "n_adv": 3, "k_grid": [1, 2], "n_dirs": [1, 2],
                         "n_boot": 50, "modes": ["plain", "distributed"], "abliteration_trials": 1, "progress": False,
                         "suite": ["direction_ablation", "rank_k_ablation", "prefill"]},
    "iti": {"max_new_tokens": 4, "n_text": 4, "n_boot": 100},
    "representation-reading": {"max_new_tokens": 4, "n_text": 4, "n_boot": 100},
    "circuit-map": {"n_neurons": 3, "n_heads": 2, "n_atp_neurons": 2, "n_atp_heads": 1, "n_verify": 4, "probe_threshold": 0.6},
    "ablation": {"k_grid": [1, 3], "random_seeds": 1, "max_new_tokens": 2, "n_text": 4},
    "refusal-direction": {"max_new_tokens": 4, "n_text": 4, "n_boot": 100, "filter_train": False,
                          "filter_val": False},  # the random tiny model refuses nothing
    "monitor": {"quick": True, "reload": False, "n_canary": 4, "finetune_texts": 2, "ood": None},
    "targeted-finetune": {"steps": 2, "n_neurons": 4, "n_heads": 1, "max_new_tokens": 2, "n_text": 2, "n_eval": 4},
    "activation-patching": {"n_pairs": 2},
    "attribution-patching": {"n_pairs": 2},
    "path-patching": {"n_pairs": 1},
    "pattern-patching": {"n_pairs": 2},
    "abliteration-search": {"n_trials": 2, "n_startup_trials": 2, "n_text": 2, "batch_size": 8},
}


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        @experiments.register("refusal-scores")
        @dataclasses.dataclass
        class Clash(experiments.Experiment):
            pass


def test_a_new_component_label_needs_only_its_registration():
    """One vocabulary of component kinds: results.check_table accepts whatever components.py knows."""
    import pandas as pd

    from circuitlab.core import components
    from circuitlab.io.results import check_table

    table = pd.DataFrame({"layer": [0], "component": ["conformance_probe_kind"]})
    with pytest.raises(ValueError, match="register_kind"):
        check_table(table)
    components.register_kind("conformance_probe_kind", doc="a label only this test uses")
    check_table(table)
    assert "conformance_probe_kind" in components.known_kinds()
    assert {"resid_pre", "attn_out", "mlp_out", "head", "neuron", "direction", "embed", "logits"} <= set(
        components.known_kinds())
    with pytest.raises(ValueError, match="table label"):
        components.Component("direction", 0)
    with pytest.raises(ValueError, match="already registered"):
        components.register_kind("neuron", unit_axis=-2)


def test_get_suggests_nearest():
    with pytest.raises(KeyError, match="refusal-scores"):
        experiments.get("refusal-score")


@pytest.mark.parametrize("name", experiments.names())
def test_experiment_conforms(name, tiny, harmful, harmless, tmp_path):
    cls = experiments.get(name)
    assert dataclasses.is_dataclass(cls), "parameters live in a dataclass __init__"
    assert experiments.describe(name), "first docstring line is the CLI description"
    sig = inspect.signature(cls.run)
    assert list(sig.parameters)[:4] == ["self", "model", "harmful", "harmless"]
    assert sig.parameters["store"].kind is inspect.Parameter.KEYWORD_ONLY
    exp = cls(**FAST_PARAMS.get(name, {}))
    result = exp.run(tiny, harmful, harmless, store=ActivationStore(tmp_path / "store"))
    assert isinstance(result, Result) and len(result.table) > 0
    for col in result.table.columns:
        assert col not in ("layer_idx", "head_idx", "neuron_idx", "pos"), f"use shared name, not {col}"
    assert set(SHARED_COLUMNS) & set(result.table.columns) or "set" in result.table.columns
    out = result.save(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == name
    assert config["model"]["fingerprint"] == tiny.fingerprint
    assert {d["hash"] for d in config["datasets"].values()} >= {harmful.hash, harmless.hash}
    assert "torch" in config["versions"] and "parameters" in config
    for f in ("table.parquet", "table.csv"):
        assert (out / f).is_file()
    back = load_result(out)
    assert list(back.table.columns) == list(result.table.columns) and len(back.table) == len(result.table)


# names a concept must not go by: the glossary's one name is on the right (docs/guide/glossary.md)
SYNONYMS = {"plaintext_n": "n_text", "n_plaintext": "n_text", "n_prompts": "n", "num_prompts": "n",
            "bs": "batch_size", "random_seed": "seed", "n_bootstrap": "n_boot", "max_tokens": "max_new_tokens"}


def test_one_name_one_type_per_parameter_across_experiments():
    """The parameter glossary holds: no synonyms, and a name shared by experiments has one type."""
    from circuitlab.experiments.base import parameters

    types: dict[str, set] = {}
    for name in experiments.names():
        for p in parameters(experiments.get(name)):
            assert p["name"] not in SYNONYMS, f"{name}.{p['name']}: call it {SYNONYMS[p['name']]!r} (glossary)"
            types.setdefault(p["name"], set()).add(p["type"].replace("| None", "").replace("None |", "").strip())
    clashes = {k: v for k, v in types.items() if len(v) > 1}
    assert not clashes, f"parameters with one name but several types: {clashes}"
