"""Regression metrics for predicted watch time and other continuous targets: XAUC and MAE.

XAUC (as in the watch-time literature) is the share of pairs of impressions whose predicted values are ordered like
their true values. Pairs with tied targets carry no order and are left out; tied predictions count one half.

Example:
    >>> xauc([1.0, 2.0, 3.0, 2.5], [10, 20, 30, 40])
    0.8333333333333334
    >>> mae([1.0, 2.0], [1.5, 1.0])
    0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from funnelrec.errors import DataError
from funnelrec.metrics.classification import _flat_pair, _float

__all__ = ["xauc", "mae"]


def _pairs_in_runs(change: np.ndarray) -> int:
    """Pairs within runs of equal keys of a sorted array, given ``change[i] = key[i + 1] != key[i]``.

    Returns ``sum_c c * (c - 1) / 2`` over the run lengths ``c``.
    """
    n = change.size + 1
    starts = np.flatnonzero(np.r_[True, change])
    c = np.diff(np.r_[starts, n]).astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def _count_inversions(a: np.ndarray) -> int:
    """Count pairs ``i < j`` with ``a[i] > a[j]`` (strict) by a bottom-up merge sort, vectorised per level.

    ``a`` holds non-negative integers. The array is padded to a power of two with a value larger than any entry
    (padding sits at the end, so it adds no inversion) and viewed as ``[blocks, 2, width]``; at every level each
    right half counts the left-half entries greater than it from its position after a stable merge
    (``argsort(kind="stable")`` on two sorted runs is a linear merge), so each of the ``log2 n`` levels is O(n).
    """
    n = a.size
    if n < 2:
        return 0
    size = 1 << int(np.ceil(np.log2(n)))
    x = np.full(size, int(a.max()) + 1, dtype=np.int64)
    x[:n] = a
    total = 0
    width = 1
    while width < size:
        rows = x.reshape(-1, 2 * width)  # each row: sorted left half, sorted right half
        perm = np.argsort(rows, axis=1, kind="stable")
        pos = np.empty_like(perm)
        np.put_along_axis(pos, perm, np.arange(2 * width)[None, :], axis=1)
        # For right element j (0-based within its half): merged position - j = #left entries <= it (stability).
        right_pos = pos[:, width:] - np.arange(width)[None, :]
        total += int((width - right_pos).sum())
        x = np.take_along_axis(rows, perm, axis=1).reshape(-1)
        width *= 2
    return total


def xauc(
    pred: Any,
    target: Any,
    max_pairs: int | None = None,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> float:
    """Share of correctly ordered pairs: ``P(pred_i < pred_j | target_i < target_j)``, pred ties counting 0.5.

    Exact mode (``max_pairs=None``) counts all ``n (n - 1) / 2`` pairs in O(n log n): sort by (target, pred), count
    the discordant pairs as inversions of the prediction ranks (vectorised merge sort), and correct for ties by
    counting equal-key groups. Sampled mode draws ``max_pairs`` random pairs ``i != j`` (with replacement) and
    returns the share among those whose targets differ -- an unbiased estimate for very large ``n``.

    Args:
        pred: [n] (or any shape) predictions. NaN is rejected.
        target: same shape, true values (e.g. watch time).
        max_pairs: if given and smaller than the number of pairs, sample this many pairs instead of counting all.
        generator: randomness for sampling: a ``torch.Generator``, a ``numpy.random.Generator`` or an int seed.

    Returns:
        XAUC in [0, 1], or ``nan`` when no pair has distinct targets.

    Example:
        >>> xauc([3.0, 1.0, 1.0], [3, 2, 1])
        0.8333333333333334
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    p, t = _float(p, "pred"), _float(t, "target")
    n = p.size
    all_pairs = n * (n - 1) // 2
    if max_pairs is not None:
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
            raise DataError(f"max_pairs must be a positive integer or None, got {max_pairs!r}")
        if max_pairs < all_pairs:
            return _xauc_sampled(p, t, int(max_pairs), generator)
    if n < 2:
        return float("nan")
    # Dense ranks, then one integer sort by (target, pred) ascending.
    _, p_rank, p_counts = np.unique(p, return_inverse=True, return_counts=True)
    _, t_rank = np.unique(t, return_inverse=True)
    p_rank, t_rank = p_rank.reshape(-1).astype(np.int64), t_rank.reshape(-1).astype(np.int64)
    order = np.argsort(t_rank * p_counts.size + p_rank)
    t_sorted, p_sorted = t_rank[order], p_rank[order]
    discordant = _count_inversions(p_sorted)
    t_change = t_sorted[1:] != t_sorted[:-1]
    tie_t = _pairs_in_runs(t_change)
    tie_both = _pairs_in_runs(t_change | (p_sorted[1:] != p_sorted[:-1]))
    p_counts = p_counts.astype(np.int64)
    tie_p = int((p_counts * (p_counts - 1) // 2).sum())
    valid = all_pairs - tie_t
    if valid == 0:
        return float("nan")
    pred_tied = tie_p - tie_both  # pairs with distinct targets but equal predictions
    concordant = valid - pred_tied - discordant
    return float((concordant + 0.5 * pred_tied) / valid)


def _xauc_sampled(p: np.ndarray, t: np.ndarray, max_pairs: int, generator: Any) -> float:
    n = p.size
    if isinstance(generator, torch.Generator):
        i = torch.randint(0, n, (max_pairs,), generator=generator).numpy()
        j = torch.randint(0, n - 1, (max_pairs,), generator=generator).numpy()
    else:
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
        i = rng.integers(0, n, max_pairs)
        j = rng.integers(0, n - 1, max_pairs)
    j = j + (j >= i)  # uniform over j != i
    dt = t[j] - t[i]
    dp = p[j] - p[i]
    keep = dt != 0
    if not keep.any():
        return float("nan")
    agree = np.sign(dt[keep]) * np.sign(dp[keep])  # 1 concordant, 0 tied prediction, -1 discordant
    return float(np.mean((agree + 1.0) / 2.0))


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error ``mean(|pred - target|)`` (``nan`` on empty input).

    Args:
        pred: [n] (or any shape) predictions.
        target: same shape, true values.

    Example:
        >>> mae([0.0, 3.0], [1.0, 1.0])
        1.5
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    p, t = _float(p, "pred", finite=False), _float(t, "target", finite=False)
    if p.size == 0:
        return float("nan")
    return float(np.abs(p - t).mean())
