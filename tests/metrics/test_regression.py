"""XAUC and MAE: hand-computed cases, a brute-force cross-check and sampling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from funnelrec.errors import DataError
from funnelrec.metrics import mae, xauc
from funnelrec.metrics.regression import _count_inversions


def _brute_xauc(p, t):
    num = den = 0.0
    for i, j in itertools.combinations(range(len(p)), 2):
        if t[i] == t[j]:
            continue
        den += 1
        num += (np.sign(t[j] - t[i]) * np.sign(p[j] - p[i]) + 1) / 2
    return num / den if den else math.nan


def test_xauc_hand_computed():
    assert xauc([1.0, 2.0, 3.0], [10, 20, 30]) == 1.0
    assert xauc([3.0, 2.0, 1.0], [10, 20, 30]) == 0.0
    # pairs: (0,1) ok, (0,2) ok, (1,2) pred tie -> 0.5; total 2.5 / 3
    assert xauc([1.0, 2.0, 2.0], [1, 2, 3]) == pytest.approx(2.5 / 3)
    # target tie (1,2) excluded: (0,1) ok, (0,2) wrong -> 1 / 2
    assert xauc([2.0, 3.0, 1.0], [1, 5, 5]) == pytest.approx(0.5)


def test_xauc_nan_when_no_distinct_targets():
    assert math.isnan(xauc([1.0, 2.0], [3, 3]))
    assert math.isnan(xauc([1.0], [3]))
    assert math.isnan(xauc([], []))


def test_xauc_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(2, 35))
        p = rng.integers(0, 5, n).astype(float)
        t = rng.integers(0, 6, n).astype(float)
        expected = _brute_xauc(p, t)
        got = xauc(torch.tensor(p), torch.tensor(t))
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_count_inversions_matches_brute_force():
    rng = np.random.default_rng(2)
    for n in [0, 1, 2, 3, 7, 16, 33, 100]:
        a = rng.integers(0, 8, n)
        brute = sum(1 for i, j in itertools.combinations(range(n), 2) if a[i] > a[j])
        assert _count_inversions(a) == brute


def test_xauc_sampled_close_to_exact_and_reproducible():
    rng = np.random.default_rng(3)
    p = rng.normal(size=3000)
    t = p + rng.normal(size=3000)
    exact = xauc(p, t)
    a = xauc(p, t, max_pairs=20_000, generator=torch.Generator().manual_seed(0))
    b = xauc(p, t, max_pairs=20_000, generator=torch.Generator().manual_seed(0))
    c = xauc(p, t, max_pairs=20_000, generator=np.random.default_rng(5))
    assert a == b
    assert abs(a - exact) < 0.02 and abs(c - exact) < 0.02
    # max_pairs above the number of pairs falls back to the exact count
    assert xauc(p[:10], t[:10], max_pairs=1000) == xauc(p[:10], t[:10])


def test_mae():
    assert mae([1.0, 2.0, 4.0], [1.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert math.isnan(mae([], []))


def test_regression_errors():
    with pytest.raises(DataError, match="pred and target"):
        xauc([1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="max_pairs"):
        xauc([1.0, 2.0], [1.0, 2.0], max_pairs=0)
    with pytest.raises(DataError, match="pred and target"):
        mae(np.zeros((2, 3)), np.zeros(6))
