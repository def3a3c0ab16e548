"""The fast engine equals the plain computation; no-op skipping, batching and the pattern variant."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from circuitlab.core import hooks as hk
from circuitlab.experiments.patching.activation import layer_sweeps, refusal_metric
from circuitlab.methods.patching import run_sweeps
from circuitlab.experiments.patching.pattern import PatternPatching, pattern_sweep

TOL = 1e-4


def _values(rows):
    return torch.tensor([r["metric"] for r in rows])


@pytest.mark.parametrize("batch_size,head_positions", [(3, False), (64, True)])
def test_fast_equals_plain(tiny, pair, batch_size, head_positions):
    clean, corrupted = pair
    sweeps = layer_sweeps(tiny, ["resid_pre", "attn_out", "mlp_out", "head"], range(tiny.n_layers),
                          range(len(clean)), head_positions=head_positions)
    for target, source in ((corrupted, clean), (clean, corrupted)):  # denoising and noising
        fast, _ = run_sweeps(tiny, target, source, sweeps, refusal_metric(tiny), fast=True, batch_size=batch_size)
        plain, _ = run_sweeps(tiny, target, source, sweeps, refusal_metric(tiny), fast=False, batch_size=batch_size)
        assert (_values(fast) - _values(plain)).abs().max() <= TOL
        assert [r["skipped"] for r in plain] == [False] * len(plain)


def test_shared_prefix_is_skipped_exactly(tiny, pair):
    """Positions before the first differing token are provable no-ops: skipped, and equal to the plain run."""
    clean, corrupted = pair
    first_diff = int((clean != corrupted).nonzero()[0])
    sweeps = layer_sweeps(tiny, ["resid_pre"], range(tiny.n_layers), range(len(clean)))
    rows, ctx = run_sweeps(tiny, corrupted, clean, sweeps, refusal_metric(tiny))
    table = pd.DataFrame(rows)
    assert set(table[table.skipped].position) >= set(range(first_diff))
    # Layer 0 is the embedding: only the differing tokens themselves are real patches there.
    differing = set((clean != corrupted).nonzero().flatten().tolist())
    assert set(table[(table.layer == 0) & ~table.skipped].position) == differing
    assert (table[table.skipped].metric == ctx.target_metric).all()


def test_at_most_one_batch_of_runs_in_flight(tiny, pair):
    """Memory is bounded by one batch: no forward ever carries more than ``batch_size`` patched runs."""
    clean, corrupted = pair
    seen = []

    def spy(act, hook):
        seen.append(act.shape[0])

    sweeps = layer_sweeps(tiny, ["resid_pre", "mlp_out"], range(tiny.n_layers), range(len(clean)))
    with tiny.hooks([(hk.resid_pre(tiny.n_layers - 1), spy)]):
        run_sweeps(tiny, corrupted, clean, sweeps, refusal_metric(tiny), batch_size=6)
    assert seen and max(seen) <= 6 and len(seen) > 4


@pytest.mark.parametrize("fast", [False, True])
def test_pattern_variant_matches_transformer_lens(tiny, pair, fast):
    clean, corrupted = pair
    _, cache = tiny.bridge.run_with_cache(clean[None])
    metric = refusal_metric(tiny)
    expected = tlp.get_act_patch_attn_head_pattern_all_pos(tiny.bridge, corrupted[None], cache,
                                                           lambda lg: metric(lg[:, -1]).mean())
    rows, _ = run_sweeps(tiny, corrupted, clean, [pattern_sweep(tiny, range(tiny.n_layers))], metric, fast=fast)
    assert (_values(rows).view(tiny.n_layers, -1) - expected.cpu()).abs().max() <= TOL


def test_pattern_experiment_table(tiny, harmful, harmless):
    result = PatternPatching(n_pairs=2).run(tiny, harmful, harmless)
    assert set(result.table.component) == {"head"}
    assert len(result.table) == 2 * tiny.n_layers * tiny.n_heads


@pytest.mark.slow
def test_embedded_small_grid_matches_transformer_lens_and_is_faster(embedded):
    import time

    from circuitlab.io import datasets
    from circuitlab.methods.pairs import make_pairs

    pair = make_pairs(embedded, datasets.load("advbench", split="train", n=24),
                      datasets.load("harmless", split="train", n=24)).pairs[0]
    clean, corrupted, T = pair.harmful_ids, pair.harmless_ids, pair.length
    metric = refusal_metric(embedded)
    cells = [(l, p) for l in (0, embedded.n_layers - 1) for p in (T - 3, T - 2, T - 1)]
    _, cache = embedded.bridge.run_with_cache(clean[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
    t0 = time.perf_counter()
    expected = tlp.generic_activation_patch(embedded.bridge, corrupted[None], cache, lambda lg: metric(lg[:, -1]).mean(),
                                            patch_setter=tlp.layer_pos_patch_setter, activation_name="resid_pre",
                                            index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
    t_tl = time.perf_counter() - t0
    sweep = layer_sweeps(embedded, ["resid_pre"], [0], [])[0]
    sweep.cells = [(l, p, None) for l, p in cells]
    t0 = time.perf_counter()
    rows, _ = run_sweeps(embedded, corrupted, clean, [sweep], metric)
    t_fast = time.perf_counter() - t0
    assert (_values(rows) - expected.cpu()).abs().max() <= TOL
    assert t_fast < t_tl
