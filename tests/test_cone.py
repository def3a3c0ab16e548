"""The rank-k cone family (circuitlab.methods.cone; Wollschläger et al. 2025): at k = 1 it is the rank-1
``heretic`` family; a rank-2 edit removes both directions from the writers' outputs and leaves an
orthogonal one unchanged; hooks equal weight edits for k > 1; the search runs the ``cone`` variant."""

from __future__ import annotations

import pytest
import torch

from circuitlab import ActivationStore
from circuitlab.core import hooks as hk
from circuitlab.core.weights import writer_weight
from circuitlab.experiments.abliteration_search import AbliterationSearch
from circuitlab.methods import abliteration as ab
from circuitlab.methods.cone import ConeParams, cone_at, cone_bases, cone_edits
from test_abliteration_search import FAST, PROMPTS, _splits, assert_edits_equal_their_hooks

PARAMS = ab.AbliterationParams(attn=ab.Kernel(1.3, 1.0, 0.5, 1.0), mlp=ab.Kernel(0.9, 0.6, 0.2, 1.0))


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return q.T


@pytest.fixture(scope="module")
def cones(tiny, harmful, harmless, tmp_path_factory):
    store = ActivationStore(tmp_path_factory.mktemp("cone"))
    h, s = list(harmful), list(harmless)
    return cone_bases(tiny, h, s, max_k=3, store=store), ab.residual_directions(tiny, h, s, store=store)


def test_cone_bases_are_orthonormal_and_start_with_the_rank_one_direction(tiny, cones):
    bases, dirs = cones
    assert bases.shape == (tiny.n_layers, 3, tiny.d_model)
    torch.testing.assert_close(bases[:, 0], dirs, atol=1e-5, rtol=0)
    for basis in bases:
        kept = basis[basis.any(dim=1)]
        torch.testing.assert_close(kept @ kept.T, torch.eye(len(kept)), atol=1e-5, rtol=0)
    assert (bases[:, 1].any(dim=1)).any(), "some layer's data support a second cone vector"


@pytest.mark.parametrize("index", [None, 0.5])
def test_rank_one_cone_is_the_rank_one_family(tiny, cones, index):
    bases, dirs = cones
    kernels = ab.AbliterationParams(attn=PARAMS.attn, mlp=PARAMS.mlp, direction_index=index)
    cone, plain = cone_edits(tiny, bases, ConeParams(kernels, 1)), ab.heretic_edits(tiny, dirs, kernels)
    assert cone and cone == plain and ab.describe_edits(cone) == ab.describe_edits(plain)
    for c, p in zip(cone, plain):
        assert c.basis.shape == (1, tiny.d_model)
        torch.testing.assert_close(c.direction, p.direction, atol=1e-5, rtol=0)
    with ab.abliterated(tiny, cone):
        by_cone = tiny.last_logits(PROMPTS)
    with ab.abliterated(tiny, plain):
        by_plain = tiny.last_logits(PROMPTS)
    torch.testing.assert_close(by_cone, by_plain, atol=1e-5, rtol=0)
    assert not torch.allclose(by_cone, tiny.last_logits(PROMPTS), atol=1e-3)


def test_rank_two_edit_removes_both_directions_and_leaves_an_orthogonal_one(tiny):
    q = _orthonormal(tiny.d_model, 3, seed=0)
    e1, e2, u = q
    planted = torch.stack([e1 * 2.0, e1 + e2])  # not orthonormal: the Edit spans the same plane
    edits = [ab.Edit(1, "attn_out", None, 1.0, planted), ab.Edit(1, "mlp_out", None, 1.0, planted)]
    assert ab.describe_edits(edits) == "L1attn@1/k2 L1mlp@1/k2"
    torch.testing.assert_close(edits[0].basis @ edits[0].basis.T, torch.eye(2), atol=1e-6, rtol=0)
    names = [hk.attn_out(1), hk.mlp_out(1)]
    before = [writer_weight(tiny, k, 1).detach().float().clone() for k in ("attn_out", "mlp_out")]
    base_out = tiny.run_with_cache(PROMPTS, names, "last")
    with ab.abliterated(tiny, edits):
        after = [writer_weight(tiny, k, 1).detach().float().clone() for k in ("attn_out", "mlp_out")]
        out = tiny.run_with_cache(PROMPTS, names, "last")
    for b, a in zip(before, after):
        assert (e1 @ a).abs().max() < 1e-5 and (e2 @ a).abs().max() < 1e-5
        torch.testing.assert_close(u @ a, u @ b, atol=1e-5, rtol=0)
    for n in names:  # the writers' outputs: nothing left on the plane (the bias too)
        assert (out[n] @ e1).abs().max() < 1e-4 and (out[n] @ e2).abs().max() < 1e-4
        assert (base_out[n] @ e1).abs().max() > 1e-3
    # a weaker edit keeps (1 − w) of the write on the plane, still nothing off it
    with ab.abliterated(tiny, [ab.Edit(1, "mlp_out", None, 0.4, planted)]):
        half = writer_weight(tiny, "mlp_out", 1).detach().float().clone()
    torch.testing.assert_close(q[:2] @ half, 0.6 * (q[:2] @ before[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ half, u @ before[1], atol=1e-5, rtol=0)


def test_rank_k_edits_equal_their_hooks(tiny):
    a, b = _orthonormal(tiny.d_model, 3, seed=1), _orthonormal(tiny.d_model, 2, seed=2)
    edits = [ab.Edit(0, "attn_out", None, 1.2, a), ab.Edit(1, "mlp_out", None, 0.9, b),
             ab.Edit(1, "head", 0, 1.0, a), ab.Edit(1, "head", 2, 0.6, b[0]), ab.Edit(0, "neuron", 3, 0.7, b)]
    assert_edits_equal_their_hooks(tiny, edits)
    norm = [ab.Edit(0, "mlp_out", None, 1.1, b, True), ab.Edit(1, "head", 1, 0.8, a, True)]
    assert_edits_equal_their_hooks(tiny, norm)


def test_global_cone_and_parameters(tiny, cones):
    bases, _ = cones
    shared = cone_at(bases, 0.4, 3)
    assert torch.equal(shared[0], ab.direction_at(bases[:, 0], 0.4))
    assert 1 <= len(shared) <= 3 and torch.equal(shared[1:], bases[0, 1:len(shared)])
    params = ConeParams(ab.AbliterationParams(attn=PARAMS.attn, mlp=PARAMS.mlp, direction_index=0.4), 3)
    assert ConeParams.from_flat(params.flat()) == params and params.flat()["k"] == 3
    edits = cone_edits(tiny, bases, params)
    assert edits and all(len(e.basis) == len(shared) for e in edits)
    assert cone_edits(tiny, torch.zeros_like(bases), params) == []
    with pytest.raises(ValueError, match="k="):
        ConeParams(PARAMS, 0)


def test_search_runs_the_cone_variant(tiny, harmful, harmless, tmp_path):
    exp = AbliterationSearch(**{**FAST, "variants": ["cone", "heretic"], "max_k": 2})
    (h_train, h_val, _), (s_train, s_val, _) = _splits(harmful, exp.seed), _splits(harmless, exp.seed)
    trials = exp.search(tiny, h_train, s_train, h_val, s_val, store=ActivationStore(tmp_path))
    cone = trials[trials.variant == "cone"]
    assert len(cone) == FAST["n_trials"] and set(cone.k) <= {1, 2} and cone.val_kl.notna().all()
    assert exp.cones_.shape == (tiny.n_layers, 2, tiny.d_model)
    for number, (variant, params) in exp.params_.items():
        if variant == "cone":
            assert all(len(e.basis) <= params.k for e in exp.edits(tiny, variant, params))
    again = AbliterationSearch(**{**FAST, "variants": ["cone", "heretic"], "max_k": 2})
    repeat = again.search(tiny, h_train, s_train, h_val, s_val, store=ActivationStore(tmp_path))
    assert repeat.k.tolist()[: len(cone)] == cone.k.tolist()  # seeded
