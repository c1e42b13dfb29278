"""Classification metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from funnelrec.errors import DataError
from funnelrec.metrics import auc, calibration, gauc, logloss, reliability_bins


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_auc_hand_computed_with_ties():
    # positives: 0.8, 0.4; negatives: 0.4, 0.1 -> pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1
    assert auc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("n", [10, 1000])
def test_auc_matches_sklearn_with_ties_and_weights(rng, n):
    s = np.round(rng.normal(size=n), 1)  # many ties
    y = rng.random(n) < 0.3
    w = rng.random(n) * 3
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(s, y, weights=w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_auc_accepts_tensors_and_matrices(rng):
    s = rng.normal(size=(8, 5))
    y = rng.random((8, 5)) < 0.5
    expected = roc_auc_score(y.ravel(), s.ravel())
    assert auc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(expected)
    assert auc(torch.from_numpy(s).to(torch.bfloat16), y) == pytest.approx(
        roc_auc_score(y.ravel(), torch.from_numpy(s).to(torch.bfloat16).float().numpy().ravel())
    )
    assert isinstance(auc(s, y), float)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
    assert math.isnan(auc([], []))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=-3, max_value=3), st.booleans(), st.floats(min_value=0.1, max_value=5)),
        min_size=2,
        max_size=60,
    )
)
def test_auc_property_matches_sklearn(rows):
    s = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows])
    w = np.array([r[2] for r in rows])
    if y.all() or not y.any():
        assert math.isnan(auc(s, y))
        return
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert auc(s, y, weights=w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-9)


def _gauc_reference(s, y, g):
    num = den = 0.0
    for key in np.unique(g):
        m = g == key
        if y[m].all() or not y[m].any():
            continue
        num += m.sum() * roc_auc_score(y[m], s[m])
        den += m.sum()
    return num / den


def test_gauc_matches_weighted_sklearn_mean(rng):
    n = 2000
    g = rng.integers(0, 120, n) * 7 - 50  # sparse, negative keys
    s = np.round(rng.normal(size=n) + 0.02 * g, 1)
    y = rng.random(n) < 0.4
    assert gauc(s, y, g) == pytest.approx(_gauc_reference(s, y, g), abs=1e-12)
    perm = rng.permutation(n)
    assert gauc(s[perm], y[perm], g[perm]) == pytest.approx(_gauc_reference(s, y, g), abs=1e-12)


def test_gauc_skips_single_class_groups_and_string_keys():
    s = [0.9, 0.1, 0.2, 0.8, 0.5, 0.4]
    y = [1, 0, 1, 0, 1, 1]
    g = ["a", "a", "b", "b", "c", "c"]  # a: auc 1 (n=2), b: auc 0 (n=2), c: single class, skipped
    assert gauc(s, y, g) == pytest.approx(0.5)
    assert math.isnan(gauc([0.1, 0.2], [1, 1], [1, 2]))


def test_logloss_matches_sklearn(rng):
    p = rng.uniform(0.01, 0.99, 500)
    y = rng.random(500) < p
    assert logloss(p, y) == pytest.approx(log_loss(y, p), rel=1e-10)
    assert logloss(torch.tensor(p), torch.tensor(y)) == pytest.approx(log_loss(y, p), rel=1e-10)


def test_logloss_clips_confident_mistakes():
    assert logloss([0.0], [1], eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_calibration_and_reliability_bins():
    p = np.array([0.05, 0.15, 0.95, 0.55])
    y = np.array([0, 1, 1, 0])
    assert calibration(p, y) == pytest.approx(p.mean() / y.mean())
    assert math.isnan(calibration([0.2], [0]))
    r = reliability_bins(p, y, bins=2)
    assert r["count"].tolist() == [2, 2]
    assert r["mean_pred"].tolist() == pytest.approx([0.1, 0.75])
    assert r["mean_label"].tolist() == pytest.approx([0.5, 0.5])
    assert r["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.25)
    r = reliability_bins([1.0, 0.0], [1, 0], bins=4)  # 1.0 falls into the last bin
    assert r["count"].tolist() == [1, 0, 0, 1]
    assert np.isnan(r["mean_pred"][1])


@pytest.mark.parametrize(
    "call",
    [
        lambda: auc([0.1, 0.2], [1, 0, 1]),
        lambda: auc([0.1, 0.2], [1, 0], weights=[1.0]),
        lambda: auc([0.1, 0.2], [1, 2]),
        lambda: auc([0.1, float("nan")], [1, 0]),
        lambda: gauc([0.1, 0.2], [1, 0], [1]),
        lambda: logloss([0.1, 0.2], [1]),
        lambda: logloss([1.5], [1]),
        lambda: calibration([[0.1, 0.2]], [0.1, 0.2]),
        lambda: reliability_bins([0.1], [1], bins=0),
    ],
)
def test_bad_inputs_raise_data_error(call):
    with pytest.raises(DataError):
        call()


def test_shape_error_names_arguments():
    with pytest.raises(DataError, match="scores and labels must have the same shape"):
        auc(np.zeros(3), np.zeros(4))
