"""Top-K ranking metrics on hand-computed cases, exclusion of history, true recall and gap closed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from funnelrec.errors import DataError
from funnelrec.metrics import coverage, gap_closed, topk_metrics, true_recall_at_k


def _log2(x):
    return math.log2(x)


def test_leave_one_out_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # target 2 -> rank 3
            [0.1, 0.2, 0.3, 0.4, 0.5],  # target 4 -> rank 1
            [0.5, 0.4, 0.3, 0.2, 0.1],  # target 4 -> rank 5
        ]
    )
    m = topk_metrics(scores, torch.tensor([2, 4, 4]), ks=(1, 3))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["mrr@1"] == pytest.approx(1 / 3)
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / _log2(4) + 1) / 3)
    assert set(m) == {f"{name}@{k}" for name in ("recall", "ndcg", "mrr", "hr") for k in (1, 3)}
    assert all(isinstance(v, float) for v in m.values())


def test_exclusion_of_history():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    history = np.array([[True, True, False, False]])
    m = topk_metrics(scores, np.array([2]), ks=1, exclude=history)
    assert m["hr@1"] == 1.0 and m["mrr@1"] == 1.0
    # without exclusion the target sits at rank 3
    assert topk_metrics(scores, np.array([2]), ks=1)["hr@1"] == 0.0
    # an excluded target never counts as a hit, and the row then has no relevant item
    m = topk_metrics(scores, np.array([0]), ks=4, exclude=history)
    assert math.isnan(m["hr@4"])


def test_excluded_items_do_not_hit_when_k_exceeds_valid_items():
    scores = torch.tensor([[0.9, 0.1]])
    rel = torch.tensor([[True, True]])
    m = topk_metrics(scores, rel, ks=2, exclude=torch.tensor([[True, False]]))
    assert m["recall@2"] == 1.0  # the only remaining relevant item (1) is found


def test_multi_relevant_mask():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rel = torch.tensor([[False, True, False, True, True]])  # ranks 2, 4, 5
    m = topk_metrics(scores, rel, ks=(2, 4, 10))
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["recall@10"] == pytest.approx(1.0)  # k above I is clipped to I
    assert m["mrr@4"] == pytest.approx(0.5)
    idcg2 = 1 + 1 / _log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / _log2(3)) / idcg2)
    idcg4 = 1 + 1 / _log2(3) + 1 / _log2(4)
    assert m["ndcg@4"] == pytest.approx((1 / _log2(3) + 1 / _log2(5)) / idcg4)
    assert m["hr@2"] == 1.0


def test_rows_without_relevant_items_are_skipped():
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    rel = torch.tensor([[True, False], [False, False]])
    assert topk_metrics(scores, rel, ks=1)["hr@1"] == 1.0


def test_topk_metrics_shape_errors():
    s = torch.zeros(2, 5)
    with pytest.raises(DataError, match="targets"):
        topk_metrics(s, torch.tensor([1, 2, 3]))
    with pytest.raises(DataError, match="targets"):
        topk_metrics(s, torch.tensor([1, 5]))
    with pytest.raises(DataError, match="targets mask"):
        topk_metrics(s, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="exclude"):
        topk_metrics(s, torch.tensor([0, 1]), exclude=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="scores"):
        topk_metrics(torch.zeros(5), torch.tensor([0]))
    with pytest.raises(DataError, match="ks"):
        topk_metrics(s, torch.tensor([0, 1]), ks=(0,))


def test_coverage():
    assert coverage(torch.tensor([[0, 1], [1, 2]]), 4) == 0.75
    assert coverage(np.array([[0, -1]]), 2) == 0.5
    with pytest.raises(DataError, match="topk_items"):
        coverage([[0, 7]], 4)
    with pytest.raises(DataError, match="num_items"):
        coverage([[0]], 0)


def test_true_recall_at_k():
    oracle = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    retrieved = torch.tensor([[0, 3, 1], [4, 3, -1]])
    # row 0 oracle top-3 = {0, 2, 3}: retrieved has 0, 3 -> 2/3; row 1 top-3 = {4, 3, 2}: has 4, 3 -> 2/3
    assert true_recall_at_k(retrieved, oracle, k=3) == pytest.approx(2 / 3)
    assert true_recall_at_k(retrieved, oracle, k=1) == pytest.approx(1.0)
    with pytest.raises(DataError, match="retrieved"):
        true_recall_at_k(torch.tensor([[0, 1]]), oracle, k=1)
    with pytest.raises(DataError, match="k must"):
        true_recall_at_k(retrieved, oracle, k=6)


def test_gap_closed():
    assert gap_closed(0.75, 0.5, 1.0) == 0.5
    assert gap_closed(0.5, 0.5, 1.0) == 0.0
    assert math.isnan(gap_closed(0.3, 0.2, 0.2))
    assert math.isnan(gap_closed(float("nan"), 0.1, 0.2))


def _reference(scores, rel, k):
    """Per-row loop reference (distinct scores, so the ranking is unambiguous)."""
    out = {"recall": [], "ndcg": [], "mrr": [], "hr": []}
    for s, r in zip(scores, rel):
        if not r.any():
            continue
        top = np.argsort(-s)[:k]
        h = r[top].astype(float)
        disc = 1 / np.log2(np.arange(2, len(top) + 2))
        ideal = disc[: min(k, int(r.sum()))].sum()
        out["recall"].append(h.sum() / r.sum())
        out["ndcg"].append((h * disc).sum() / ideal)
        out["mrr"].append(1 / (np.flatnonzero(h)[0] + 1) if h.any() else 0.0)
        out["hr"].append(float(h.any()))
    return {f"{key}@{k}": float(np.mean(v)) for key, v in out.items()}


def test_topk_metrics_match_loop_reference_with_exclusion():
    rng = np.random.default_rng(4)
    b, n = 40, 30
    scores = rng.permutation(b * n).reshape(b, n).astype(np.float32)
    rel = rng.random((b, n)) < 0.1
    hist = rng.random((b, n)) < 0.2
    masked = np.where(hist, -np.inf, scores)
    got = topk_metrics(torch.from_numpy(scores), torch.from_numpy(rel), ks=(5, 10), exclude=torch.from_numpy(hist))
    for k in (5, 10):
        want = _reference(masked, rel & ~hist, k)
        for key, v in want.items():
            assert got[key] == pytest.approx(v, abs=1e-9), key
