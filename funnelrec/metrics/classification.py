"""Classification metrics for predicted click/like/... probabilities: AUC, GAUC, log-loss and calibration.

Every function takes torch tensors, numpy arrays or lists (any shape, as long as the arguments share it: a
[B, M] score matrix and its [B, M] labels are flattened together) and returns Python floats. Nothing loops over rows
or groups in Python; everything is a handful of sorts, cumulative sums and ``bincount`` calls, so a few million
impressions take well under a second.

Example:
    >>> import numpy as np
    >>> s = np.array([0.9, 0.8, 0.3, 0.1]); y = np.array([1, 0, 1, 0])
    >>> auc(s, y)
    0.75
    >>> gauc(s, y, groups=np.array([7, 7, 8, 8]))
    1.0
    >>> round(logloss([0.9, 0.2], [1, 0]), 4)
    0.1643
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from funnelrec.errors import DataError

__all__ = ["auc", "gauc", "logloss", "calibration", "reliability_bins"]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Turn a tensor, array, list or scalar into a numpy array (no copy where possible)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise DataError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc


def _flat_pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten two same-shaped inputs; raise ``DataError`` naming both on a shape mismatch."""
    a_np, b_np = _to_numpy(a, name_a), _to_numpy(b, name_b)
    if a_np.shape != b_np.shape:
        got = f"{list(a_np.shape)} and {list(b_np.shape)}"
        raise DataError(f"{name_a} and {name_b} must have the same shape, got {got}")
    return a_np.reshape(-1), b_np.reshape(-1)


def _float(x: np.ndarray, name: str, *, finite: bool = True) -> np.ndarray:
    """Cast to float64 and (optionally) reject NaN, which would silently corrupt sorting."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if finite and np.isnan(x).any():
        raise DataError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(x))[0])}")
    return x


def _binary(y: np.ndarray, name: str) -> np.ndarray:
    """Check that labels are 0/1 (bool, int or float) and return them as float64."""
    y = _float(y, name)
    bad = (y != 0) & (y != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name} must be binary 0/1, got {y[i]!r} at index {i}")
    return y


def _probs(p: np.ndarray, name: str) -> np.ndarray:
    p = _float(p, name)
    bad = (p < 0) | (p > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name} must lie in [0, 1], got {p[i]!r} at index {i}")
    return p


def auc(scores: Any, labels: Any, weights: Any | None = None) -> float:
    """Area under the ROC curve, rank-based (Mann–Whitney U) with average ranks for tied scores.

    A positive-negative pair counts 1 when the positive scores higher and 0.5 when the scores tie, so the result
    equals ``sklearn.metrics.roc_auc_score`` (with ``sample_weight=weights``).

    Args:
        scores: [n] (or any shape) real-valued scores; higher means more likely positive. NaN is rejected.
        labels: same shape, binary 0/1 (bool, int or float).
        weights: optional same shape, non-negative impression weights; a pair weighs ``w_pos * w_neg``.

    Returns:
        The AUC in [0, 1], or ``nan`` when only one class (or zero total weight of a class) is present.

    Example:
        >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    s, y = _flat_pair(scores, labels, "scores", "labels")
    s, y = _float(s, "scores"), _binary(y, "labels")
    if weights is None:
        w = np.ones_like(s)
    else:
        _, w = _flat_pair(scores, weights, "scores", "weights")
        w = _float(w, "weights")
        if (w < 0).any():
            raise DataError(f"weights must be >= 0, got {w.min()!r}")
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[order]
    # Tie groups of equal scores, ascending.
    gid = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1 if s.size else np.zeros(0, dtype=np.int64)
    w_neg = np.bincount(gid, weights=w * (1.0 - y))
    w_pos = np.bincount(gid, weights=w * y)
    total_pos, total_neg = w_pos.sum(), w_neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    neg_below = np.cumsum(w_neg) - w_neg
    num = np.dot(w_pos, neg_below + 0.5 * w_neg)
    return float(num / (total_pos * total_neg))


def gauc(scores: Any, labels: Any, groups: Any) -> float:
    """Group AUC: the AUC within each group (usually a user), averaged with weights = the group's impression count.

    Groups whose impressions are all positive or all negative have no AUC and are skipped (they count in neither
    the numerator nor the denominator). Computed in one pass: sort by (group, score), count tied blocks with
    ``bincount`` and accumulate negatives below each block within its group; no Python loop over groups.

    Args:
        scores: [n] (or any shape) real-valued scores.
        labels: same shape, binary 0/1.
        groups: same shape, group keys (any sortable dtype: user ids, strings).

    Returns:
        ``sum_g n_g * auc_g / sum_g n_g`` over groups with both classes, or ``nan`` when there is none.

    Example:
        >>> gauc([0.9, 0.1, 0.2, 0.8, 0.5], [1, 0, 1, 0, 1], groups=[1, 1, 2, 2, 3])
        0.5
    """
    s, y = _flat_pair(scores, labels, "scores", "labels")
    _, g = _flat_pair(scores, groups, "scores", "groups")
    s, y = _float(s, "scores"), _binary(y, "labels")
    if s.size == 0:
        return float("nan")
    _, g = np.unique(g, return_inverse=True)  # dense group ids 0..G-1
    g = g.reshape(-1)
    num_groups = int(g.max()) + 1
    order = np.lexsort((s, g))  # primary key: group, secondary: score ascending
    s, y, g = s[order], y[order], g[order]
    # Blocks of equal (group, score).
    new_block = np.r_[True, (s[1:] != s[:-1]) | (g[1:] != g[:-1])]
    bid = np.cumsum(new_block) - 1
    block_group = g[new_block]
    neg = np.bincount(bid, weights=1.0 - y)
    pos = np.bincount(bid, weights=y)
    # Negatives strictly below each block, within its group: global exclusive cumsum minus the group's start.
    cum_neg = np.cumsum(neg) - neg
    first_block_of_group = np.flatnonzero(np.r_[True, block_group[1:] != block_group[:-1]])
    group_start = np.repeat(cum_neg[first_block_of_group], np.diff(np.r_[first_block_of_group, bid[-1] + 1]))
    neg_below = cum_neg - group_start
    num_g = np.bincount(block_group, weights=pos * (neg_below + 0.5 * neg), minlength=num_groups)
    pos_g = np.bincount(block_group, weights=pos, minlength=num_groups)
    neg_g = np.bincount(block_group, weights=neg, minlength=num_groups)
    ok = (pos_g > 0) & (neg_g > 0)
    if not ok.any():
        return float("nan")
    n_g = pos_g[ok] + neg_g[ok]
    auc_g = num_g[ok] / (pos_g[ok] * neg_g[ok])
    return float(np.dot(n_g, auc_g) / n_g.sum())


def logloss(probs: Any, labels: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of predicted probabilities, clipped to ``[eps, 1 - eps]``.

    Args:
        probs: [n] (or any shape) predicted probabilities in [0, 1].
        labels: same shape, targets in [0, 1] (0/1, or soft labels).
        eps: clipping so that a confident mistake costs ``-log(eps)`` instead of infinity.

    Returns:
        The mean log-loss (natural log), or ``nan`` on empty input.

    Example:
        >>> round(logloss([0.5, 0.5], [1, 0]), 6)
        0.693147
    """
    p, y = _flat_pair(probs, labels, "probs", "labels")
    p, y = _probs(p, "probs"), _probs(y, "labels")
    if not 0 <= eps < 0.5:
        raise DataError(f"eps must lie in [0, 0.5), got {eps!r}")
    if p.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(probs: Any, labels: Any) -> float:
    """Calibration ratio ``mean(probs) / mean(labels)``: 1 is calibrated, > 1 over-predicts, < 1 under-predicts.

    Args:
        probs: [n] (or any shape) predicted probabilities.
        labels: same shape, 0/1 (or soft) labels.

    Returns:
        The ratio, or ``nan`` when the mean label is 0 (or the input is empty).

    Example:
        >>> calibration([0.25, 0.25], [0, 1])  # predicts half the observed rate
        0.5
    """
    p, y = _flat_pair(probs, labels, "probs", "labels")
    p, y = _float(p, "probs"), _float(y, "labels")
    if y.size == 0 or y.mean() == 0:
        return float("nan")
    return float(p.mean() / y.mean())


def reliability_bins(probs: Any, labels: Any, bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data: equal-width probability bins on [0, 1] with mean prediction vs observed rate.

    Args:
        probs: [n] (or any shape) predicted probabilities in [0, 1].
        labels: same shape, 0/1 (or soft) labels.
        bins: number of equal-width bins (the last bin includes 1.0).

    Returns:
        A dict of numpy arrays of length ``bins`` -- ``"lower"``, ``"upper"`` (bin edges), ``"count"`` (int64),
        ``"mean_pred"``, ``"mean_label"`` (``nan`` for empty bins) -- and ``"ece"``, the expected calibration error
        ``sum_b count_b / n * |mean_pred_b - mean_label_b|`` as a float (``nan`` on empty input).

    Example:
        >>> r = reliability_bins([0.05, 0.15, 0.95], [0, 1, 1], bins=2)
        >>> r["count"].tolist(), r["mean_label"].tolist()
        ([2, 1], [0.5, 1.0])
    """
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise DataError(f"bins must be a positive integer, got {bins!r}")
    p, y = _flat_pair(probs, labels, "probs", "labels")
    p, y = _probs(p, "probs"), _float(y, "labels")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        mean_y = np.where(count > 0, sum_y / count, np.nan)
    n = p.size
    ece = float(np.abs(sum_p - sum_y).sum() / n) if n else float("nan")
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count.astype(np.int64),
        "mean_pred": mean_p,
        "mean_label": mean_y,
        "ece": ece,
    }
