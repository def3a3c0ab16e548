"""Heretic-compatible scores on fixed strings and logits; equality with Heretic itself when it is installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from circuitlab.methods.heretic_scoring import (first_token_kl, heretic_objective, load_markers,
    marker_refusals, pareto_front)

HERETIC_PY = Path(__file__).resolve().parents[1] / "bench" / "peers" / ".venv-heretic" / "bin" / "python"

TEXTS = [
    "",                                   # empty: a refusal
    "   \n\t ",                           # whitespace only: a refusal
    "Sure, here is a cake recipe.",
    "I'm sorry, but I can't help with that.",
    "SORRY!",                             # case
    "I *cannot* do that",                 # emphasis removed
    "I **will** **not** do that",         # emphasis inside the marker
    "I can\u2019t assist",                # typographic apostrophe
    "I   am\n\n  unable to comply",       # whitespace runs
    "As an\u00a0AI, I ...",               # non-breaking space counts as whitespace
    "**",                                 # not empty, but nothing left to match
    "This would violate the rules.",      # "violat" prefix
    "I can do it",                        # "i can" without the apostrophe: no marker
    "Here is an AI assistant for you",
    "Il est ill\u00e9gal",                # accented: no match for "illegal"
]
EXPECTED = [True, True, False, True, True, True, True, True, True, True, False, True, False, True, False]

LOGITS_BASE = [[0.0, math.log(3.0), 1.5, -2.0, 0.25], [2.0, 1.0, 0.0, -1.0, 3.0], [0.1, 0.2, 0.3, 0.4, 0.5]]
LOGITS_OTHER = [[0.0, 0.0, 1.0, -1.0, 0.5], [2.0, 1.0, 0.0, -1.0, 3.0], [3.0, -3.0, 0.0, 1.0, -0.5]]


def test_default_markers_are_heretics_list():
    markers = load_markers()
    assert len(markers) == 33
    assert markers[0] == "disclaimer" and markers[-1] == "ethical boundaries"
    assert "i can'" in markers and not any(m.startswith("#") for m in markers)


def test_load_markers_from_file(tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("# a comment\n\nNope\n no way \n", encoding="utf-8")
    assert load_markers(f) == ("Nope", " no way ")
    (tmp_path / "empty.txt").write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no refusal markers"):
        load_markers(tmp_path / "empty.txt")


def test_marker_refusals_fixed_strings():
    assert marker_refusals(TEXTS) == EXPECTED


def test_marker_refusals_custom_markers_are_lowercased():
    assert marker_refusals(["I must DECLINE.", "ok", " "], ["Must Decline"]) == [True, False, True]
    assert marker_refusals(["I must decline"], ["must  decline"]) == [False]  # markers are not whitespace-normalised


def test_first_token_kl_direction_and_batchmean():
    base = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    other = torch.zeros(1, 2)                    # q = (1/2, 1/2)
    forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)   # KL(p||q)
    reverse = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)  # KL(q||p)
    assert first_token_kl(base, other) == pytest.approx(forward, rel=1e-6)
    assert abs(forward - reverse) > 1e-3 and first_token_kl(other, base) == pytest.approx(reverse, rel=1e-6)
    # batchmean: an identical second row halves the mean; logits are shift invariant
    two_rows = first_token_kl(torch.cat([base, base + 7.0]), torch.cat([other, base]))
    assert two_rows == pytest.approx(forward / 2, rel=1e-6)
    assert first_token_kl(base, base) == 0.0


def test_first_token_kl_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        first_token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        first_token_kl(torch.zeros(3), torch.zeros(3))


def test_heretic_objective_and_pareto_front():
    assert heretic_objective(5, 10, 0.2) == (0.2, 0.5)
    assert heretic_objective(5, 10, 0.001) == pytest.approx((0.5 * 0.01, 0.5))
    assert heretic_objective(3, 0, 0.5) == (0.5, 3.0)
    #            trial: 0    1    2     3    4    5
    refusals = [3, 1, 1, 0, 2, 5]
    kls = [0.05, 0.4, 0.3, 0.9, 0.2, 0.01]
    assert pareto_front(refusals, kls) == [3, 2, 4, 0, 5]
    with pytest.raises(ValueError):
        pareto_front([1], [0.1, 0.2])


# Runs inside Heretic's own virtualenv: its Evaluator.is_refusal, Model.get_logprobs (log_softmax of the
# first generated token's raw logits) and Evaluator.get_score (the KL), on stand-in objects carrying the logits.
_HERETIC_DRIVER = r"""
import json, sys
from types import SimpleNamespace
import torch
from heretic.config import Settings
from heretic.evaluator import Evaluator
from heretic.model import Model

data = json.loads(sys.stdin.read())
markers = Settings.model_fields["refusal_markers"].default
judge = SimpleNamespace(settings=SimpleNamespace(refusal_markers=markers))
refusals = [Evaluator.is_refusal(judge, t) for t in data["texts"]]

def logprobs(logits):
    fake = SimpleNamespace(settings=SimpleNamespace(offload_outputs_to_cpu=False),
                           generate=lambda prompts, **kw: (None, SimpleNamespace(logits=(logits,))))
    return Model.get_logprobs(fake, [])

base = torch.tensor(data["base"], dtype=torch.float32)
other = torch.tensor(data["other"], dtype=torch.float32)
defaults = {k: Settings.model_fields[k].default for k in ("kl_divergence_scale", "kl_divergence_target")}
ev = SimpleNamespace(settings=SimpleNamespace(**defaults), good_prompts=[], bad_prompts=[],
                     base_logprobs=logprobs(base), base_refusals=4, count_refusals=lambda: 3,
                     model=SimpleNamespace(get_logprobs_batched=lambda prompts: logprobs(other)))
score, kl, n = Evaluator.get_score(ev)
print("HERETIC_RESULT " + json.dumps({"markers": markers, "refusals": refusals, "kl": kl, "score": list(score)}))
"""


@pytest.mark.skipif(not HERETIC_PY.exists(), reason="Heretic's virtualenv (bench/peers/.venv-heretic) is not installed")
def test_matches_heretic_itself():
    payload = json.dumps({"texts": TEXTS, "base": LOGITS_BASE, "other": LOGITS_OTHER})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    proc = subprocess.run([str(HERETIC_PY), "-c", _HERETIC_DRIVER], input=payload, capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HERETIC_RESULT ")]
    assert proc.returncode == 0 and lines, f"Heretic driver failed:\n{proc.stderr[-3000:]}"
    theirs = json.loads(lines[-1].split(" ", 1)[1])

    assert tuple(theirs["markers"]) == load_markers()
    assert theirs["refusals"] == marker_refusals(TEXTS) == EXPECTED
    base, other = torch.tensor(LOGITS_BASE), torch.tensor(LOGITS_OTHER)
    ours = first_token_kl(base, other)
    assert ours == theirs["kl"]  # same float32 operations: bit-identical
    assert list(heretic_objective(3, 4, ours)) == pytest.approx(theirs["score"], rel=1e-12)


def test_heretic_gets_absolute_paths(tmp_path, monkeypatch):
    """Heretic runs in its own folder: a relative prompt file would be taken for a Hub dataset name."""
    import argparse

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench.peers import heretic

    monkeypatch.chdir(tmp_path)
    files = {f"{side}_{split}": {"file": f"prompts/{side}_{split}.txt"}
             for side in ("harmful", "harmless") for split in ("train", "val")}
    settings = argparse.Namespace(dtype="float32", batch_size=4, max_tokens=8, seed=0, auto_prefix=False,
                                  system_prompt=None)
    args = heretic.heretic_args(settings, "/models/m", files, Path("out/checkpoints"))
    paths = [args[i + 1] for i, a in enumerate(args) if a.endswith(".dataset") or a == "--study-checkpoint-dir"]
    assert len(paths) == 5 and all(Path(p).is_absolute() and p.startswith(str(tmp_path)) for p in paths)


def test_hypervolume_of_a_front_and_its_curve():
    from circuitlab.methods.heretic_scoring import hypervolume, hypervolume_curve

    # two points (0.2, 0.5) and (0.6, 0.1) in the unit box: 0.4*0.5 + 0.4*0.9 = 0.56
    assert hypervolume([0.2, 0.6], [0.5, 0.1]) == pytest.approx(0.56)
    assert hypervolume([0.2, 0.6, 0.7], [0.5, 0.1, 0.3]) == pytest.approx(0.56)  # a dominated point adds nothing
    assert hypervolume([1.0], [0.0]) == 0.0 and hypervolume([], []) == 0.0
    assert hypervolume_curve([0.6, 0.2], [0.1, 0.5]) == pytest.approx([0.36, 0.56])


def test_hypervolume_change_is_the_growth_over_the_last_fifth():
    from circuitlab.methods.heretic_scoring import hypervolume_change

    # 5 trials: the last fifth is trial 5; the front had 0.36 after 4 and 0.56 after 5
    assert hypervolume_change([0.6, 0.9, 0.9, 0.9, 0.2], [0.1, 0.9, 0.9, 0.9, 0.5]) == pytest.approx(0.2 / 0.56)
    assert hypervolume_change([0.6, 0.9, 0.9, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9, 0.9]) == 0.0  # converged
    assert math.isnan(hypervolume_change([1.0, 1.0], [0.1, 0.1]))  # no area yet: not converged
    with pytest.raises(ValueError, match="at least one trial"):
        hypervolume_change([], [])
