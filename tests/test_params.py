"""Experiment constructors validate: defaults build, nonsense fails at construction (before any model
is loaded) with a ParameterError naming the parameter, and every parameter has a one-line comment."""

from __future__ import annotations

import dataclasses

import pytest

from circuitlab import experiments
from circuitlab.experiments.base import ParameterError, parameters

# Type-correct values out of range, per experiment (one constructor call per entry).
NONSENSE: dict[str, list[dict]] = {
    "refusal-scores": [{"max_new_tokens": 0}, {"batch_size": 0}, {"seed": -1}],
    "diff-ranking": [{"top_k": 0}, {"positions": "post"}, {"neurons": False, "heads": False}, {"alpha": 1.5},
                     {"batch_size": 0}],
    "probing": [{"positions": "abc"}, {"head_position": 2}, {"n_splits": 1}, {"control_repeats": 0}, {"C": 0.0},
                {"max_iter": 0}, {"solver": "magic"}, {"batch_size": 0}],
    "activation-patching": [{"layers": [-1]}, {"mode": "bogus"}, {"n_pairs": -1}, {"positions": "somewhere"},
                            {"components": ["neurons"]}, {"components": []}, {"pairing": "zip"}, {"batch_size": 0}],
    "attribution-patching": [{"components": ["neurons"]}, {"mode": "x"}, {"layers": []}, {"n_pairs": 0},
                             {"pairing": "zip"}],
    "path-patching": [{"receivers": ["k"]}, {"sender_layers": [-2]}, {"n_pairs": 0}, {"mode": "x"}],
    "pattern-patching": [{"layers": [-1]}, {"n_pairs": 0}],
    "refusal-direction": [{"train_frac": 1.5}, {"val_frac": 0.0}, {"train_frac": 0.6, "val_frac": 0.5},
                          {"layers": [-1]}, {"candidate_positions": [0]}, {"kl_threshold": 0.0}, {"prune_layer_frac": 1.5},
                          {"conditions": ["magic"]}, {"judge_only": ["baseline"]}, {"component_prompts": 0},
                          {"max_new_tokens": 0}, {"n_boot": 0}, {"batch_size": 0},
                          {"kl_budget": 0.0}, {"filter_by": "magic"}, {"min_kept": 0}, {"screen_prompts": 0},
                          {"n_finalists": 0}],
    "ablation": [{"kind": "layer"}, {"k_grid": []}, {"k_grid": [0]}, {"method": "x"}, {"random_seeds": -1},
                 {"rank_by": "magic"}, {"judge_at": "sometimes"}, {"max_new_tokens": 0}, {"n_text": 0}, {"ranking": "/no/such/ranking.csv"}],
    "circuit-map": [{"probe_threshold": 1.5}, {"n_neurons": -1}, {"verify_threshold": 2.0}, {"tau": -0.1},
                    {"direction_layer": -1}, {"n_verify": 0}, {"batch_size": 0}, {"read_threshold": 1.5},
                    {"direction_screen": 0}, {"direction_finalists": 0},
                    {"n_neurons": 0, "n_heads": 0, "n_atp_neurons": 0, "n_atp_heads": 0}],
    "monitor": [{"method": "svm"}, {"layers": [0]}, {"fpr": 2.0}, {"ood": "no-such-set"}, {"n_ood": 0},
                {"n_neurons": -1}, {"n_canary": 1}, {"weight_tol": 0.0}, {"act_tol": -1.0},
                {"calibration": "magic"}, {"n_per_source": 0}, {"sources": []}],
    "robust-hardening": [{"variants": ["magic"]}, {"modes": ["magic"]}, {"steps": -1}, {"lr": 0.0},
                         {"optimizer": "magic"}, {"adv_prob": 1.5}, {"refresh_every": 0}, {"adv_directions": 0},
                         {"k_grid": [0]}, {"n_dirs": [0]}, {"n_eval": 0}, {"max_new_tokens": 0},
                         {"dataset": "/no/such.jsonl"}, {"edge_fraction": 0.0}, {"n_edge_pairs": 0}],
    "edge-attribution": [{"methods": ["magic"]}, {"ig_steps": 0}, {"mode": "magic"}, {"n_pairs": 0},
                         {"discover_fraction": 1.5}, {"fractions": [0.0]}, {"selection": "magic"},
                         {"ablation": "magic"}, {"n_boot": -1}, {"batch_size": 0}],
    "targeted-finetune": [{"variants": ["magic"]}, {"variants": []}, {"steps": -1}, {"lr": 0.0}, {"full_lr": -1.0},
                          {"batch_size": 0}, {"n_train": 0}, {"attack_positions": [1]}, {"attack_layers": [-1]},
                          {"layers": [-1]}, {"n_attack": 1}, {"kl_weight": -1.0}, {"dataset": "/no/such.jsonl"},
                          {"components_csv": "/no/such.csv"}],
    "abliteration-search": [{"variants": ["magic"]}, {"variants": []}, {"n_trials": 0}, {"sampler": "magic"},
                            {"n_startup_trials": -1}, {"sampler": "nsga2", "n_startup_trials": 1}, {"refusal": "magic"},
                            {"max_new_tokens": 0}, {"kl_budget": 0.0}, {"max_top_n": 0}, {"target_kinds": ["attn_out"]},
                            {"n_text": 0}, {"batch_size": 0}, {"seed": -1}],
}


def _params(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


@pytest.mark.parametrize("name", experiments.names())
def test_defaults_construct(name):
    cls = experiments.get(name)
    assert any("__post_init__" in vars(c) for c in cls.__mro__ if c is not experiments.Experiment), \
        f"{name} has no __post_init__ that checks its parameters"
    cls()


@pytest.mark.parametrize("name", experiments.names())
def test_wrong_types_fail_at_construction(name):
    cls = experiments.get(name)
    for f in _params(cls):
        with pytest.raises(ParameterError, match=f"^{f.name}="):
            cls(**{f.name: object()})


@pytest.mark.parametrize("name,kwargs", [(n, kw) for n, cases in NONSENSE.items() for kw in cases],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_nonsense_fails_at_construction(name, kwargs):
    with pytest.raises(ParameterError) as err:
        experiments.get(name)(**kwargs)
    message = str(err.value)
    assert any(k in message for k in kwargs), f"the message must name the parameter: {message}"
    assert isinstance(err.value, ValueError)


def test_the_issue_example():
    cls = experiments.get("activation-patching")
    for kwargs, word in (({"layers": "abc"}, "layers"), ({"mode": "bogus"}, "mode"), ({"n_pairs": -1}, "n_pairs")):
        with pytest.raises(ParameterError, match=word):
            cls(**kwargs)


@pytest.mark.parametrize("name", experiments.names())
def test_every_parameter_has_a_comment(name):
    """The CLI's ``run NAME --help`` renders each field's trailing comment (``base.parameters``)."""
    missing = [p["name"] for p in parameters(experiments.get(name)) if not p["meaning"]]
    assert not missing, f"give these fields a trailing '# meaning' comment on the same line: {missing}"


@pytest.mark.parametrize("name", experiments.names())
def test_every_seed_parameter_refuses_a_negative_seed(name):
    """numpy and torch refuse negative seeds deep inside a run: every experiment refuses one at construction."""
    cls = experiments.get(name)
    if "seed" not in {f.name for f in dataclasses.fields(cls)}:
        pytest.skip(f"{name} has no seed")
    with pytest.raises(ParameterError, match="seed"):
        cls(seed=-1)
