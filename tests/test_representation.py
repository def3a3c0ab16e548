"""RepE (Zou et al. 2023): LAT reads the planted refusal feature, equals difference in means when one
difference direction dominates, reading accuracy is what it says, and bad input fails in one line."""

import pytest
import torch

from circuitlab.core import hooks as hk
from circuitlab.experiments.base import ParameterError
from circuitlab.experiments.representation import RepresentationReading
from circuitlab.methods.directions import (diff_in_means, direction_from_pairs, lat_direction,
    paired_differences, projection_threshold, reading_accuracy, unit)
from circuitlab.models.planted import DIMS, FEATURE_LAYER, N_LAYERS, planted_prompts


@pytest.fixture(scope="module")
def planted_resid(planted):
    h, s = planted_prompts(40, seed=0)  # matched twins: row i of both sets differs in one keyword
    names = [hk.resid_pre(l) for l in range(N_LAYERS)]
    acts = [planted.run_with_cache(list(p), names, "last") for p in (h, s)]
    return {l: (acts[0][hk.resid_pre(l)][:, 0], acts[1][hk.resid_pre(l)][:, 0]) for l in range(N_LAYERS)}


def test_lat_reads_the_planted_feature_at_accuracy_one(planted_resid):
    for layer in range(FEATURE_LAYER, N_LAYERS):
        h, s = planted_resid[layer]
        v = lat_direction(h[:24], s[:24], paired=True)
        assert abs(float(v[DIMS["moved"]])) > 0.999 and float(v[DIMS["moved"]]) > 0  # the planted dim, harmful up
        assert reading_accuracy(h[24:], s[24:], v) == 1.0  # pairwise, held-out twins
        assert reading_accuracy(h[24:], s[24:], v, projection_threshold(h[:24], s[:24], v)) == 1.0
    # before FEATURE_LAYER twins are identical at the last token: no direction, and LAT says so
    h, s = planted_resid[FEATURE_LAYER - 1]
    with pytest.raises(ValueError, match="all zero"):
        lat_direction(h, s, paired=True)


def test_lat_equals_diff_in_means_up_to_sign_with_one_dominant_direction():
    g = torch.Generator().manual_seed(0)
    d = unit(torch.randn(16, generator=g))
    base = torch.randn(30, 16, generator=g)
    scale = 1 + torch.rand(30, 1, generator=g)
    h, s = base + scale * d, base  # every difference is a positive multiple of d: PC1 is exactly ±d
    for seed in (0, 3):  # whatever random signs the pairs get
        v = direction_from_pairs(h, s, "pca", paired=True, seed=seed)
        torch.testing.assert_close(v, d, atol=1e-5, rtol=0)  # sign fixed: harmful projects higher
    torch.testing.assert_close(unit(direction_from_pairs(h, s, "mean")), d, atol=1e-5, rtol=0)
    # with noise, unmatched sets paired at random: still the diff-in-means direction up to sign
    h, s = torch.randn(200, 16, generator=g) * 0.3 + 3 * d, torch.randn(150, 16, generator=g) * 0.3
    cos = float(lat_direction(h, s) @ unit(diff_in_means(h, s)))
    assert cos > 0.99
    assert direction_from_pairs(h, s, "mean").shape == (16,)
    torch.testing.assert_close(direction_from_pairs(h, s, "mean"), diff_in_means(h, s))  # every row counts


def test_reading_accuracy_counts_what_it_says():
    v = torch.tensor([1.0, 0.0])
    h = torch.tensor([[2.0, 5.0], [0.5, 0.0], [-1.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 9.0], [-2.0, 3.0]])
    assert reading_accuracy(h, s, v) == pytest.approx(2 / 3)  # pairs 0 and 2 read right, pair 1 wrong
    # harmful 2 / 0.5 / -1 above 0.75: one right; harmless 1 / 1 / -2 at or below: one right
    assert reading_accuracy(h, s, v, threshold=0.75) == pytest.approx(2 / 6)
    assert projection_threshold(h, s, v) == pytest.approx((0.5 + 0.0) / 2)
    assert paired_differences(h, s).shape == (3, 2) and paired_differences(h, s[:2], paired=False).shape == (2, 2)


def test_experiment_reads_the_planted_model(planted):
    h, s = planted_prompts(60, seed=1)
    result = RepresentationReading(paired=True, control=False).run(planted, h, s)
    test = result.table[(result.table.split == "test") & (result.table.layer == FEATURE_LAYER)]
    assert set(test.reader) == {"lat", "mean", "probe"}
    assert (test.accuracy == 1.0).all()
    assert result.table[result.table.layer < FEATURE_LAYER].accuracy.isna().all()  # nothing to read there


def test_bad_input_fails_in_one_line():
    x = torch.zeros(4, 3)
    cases = [
        (lambda: lat_direction(torch.zeros(4), x), "must be a non-empty [n_prompts, d]"),
        (lambda: lat_direction(x, torch.zeros(4, 5)), "differ in width"),
        (lambda: lat_direction(x, torch.zeros(3, 3), paired=True), "paired=True needs as many"),
        (lambda: direction_from_pairs(x, x, "svd"), "method='svd' is not one of mean, pca"),
        (lambda: lat_direction(torch.ones(1, 3), x[:1]), "at least 2 pairs"),
        (lambda: lat_direction(x, x), "all zero"),
        (lambda: lat_direction(x + float("nan"), x), "NaN"),
        (lambda: reading_accuracy(x, x[:3], torch.ones(3)), "matched pairs"),
        (lambda: reading_accuracy(x, x, torch.ones(2)), "d_model is 3"),
        (lambda: RepresentationReading(strengths=[]), "strengths must be a non-empty list"),
        (lambda: RepresentationReading(layers=[-1]), "layers must be None or a non-empty list"),
        (lambda: RepresentationReading(n_test=1), "n_test=1 must be >= 2"),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, ParameterError)) as err:
            make()
        assert message in str(err.value) and "\n" not in str(err.value)
