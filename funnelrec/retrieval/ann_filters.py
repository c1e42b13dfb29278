"""Helpers of :mod:`funnelrec.retrieval.ann`: input checks, per-request exclusion masks, top-k compaction and an exact
top-k.

All ours (numpy, vectorised: no Python loop over queries or candidates). Shape letters: Q queries, F fetched
candidates per query, E exclusion pairs in all, A rows searched exactly, k results.

Example:
    >>> import numpy as np
    >>> scores = np.array([[0.5, 0.25, 0.125]], dtype=np.float32)
    >>> ids = np.array([[5, 6, 7]])
    >>> top_scores, top_ids = compact_topk(scores, ids, np.array([[False, True, False]]), k=3)
    >>> top_ids.tolist(), top_scores.tolist()
    ([[5, 7, -1]], [[0.5, 0.125, -inf]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from funnelrec.errors import DataError

__all__ = ["check_vectors", "check_ids", "flatten_exclusions", "exclusion_mask", "compact_topk", "exact_topk"]


def check_vectors(vectors, dim: int, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 [n, D] array (one [D] query is read as [1, D] when ``what`` is
    ``"queries"``); ``DataError`` naming ``what`` on a wrong shape or width (expected vs got), a non-numeric dtype or
    a non-finite value."""
    arr = np.asarray(vectors)
    if arr.ndim == 1 and what == "queries" and arr.shape[0] == dim:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DataError(f"{what} must be [n, D] with D = {dim} (the index's dimension), got shape "
                        f"{list(arr.shape)}", column=what)
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{what} must be numeric, got dtype {arr.dtype}", column=what)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{what} hold non-finite values (NaN or inf)", column=what)
    return arr


def check_ids(ids, n: int | None = None, what: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array (a scalar becomes one id); ``DataError`` on a non-integer or nested list, a
    count other than ``n`` (when given) or a negative id (-1 marks "no result")."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DataError(f"{what} must be a 1-D list of integers, got dtype {arr.dtype} and shape "
                        f"{list(arr.shape)}", column=what)
    arr = arr.astype(np.int64)
    if n is not None and len(arr) != n:
        raise DataError(f"{what} must hold one id per vector: expected {n}, got {len(arr)}", column=what)
    if (arr < 0).any():
        raise DataError(f"ids must be >= 0 (-1 marks 'no result'), got {int(arr[arr < 0][0])}", column=what)
    return arr


def flatten_exclusions(exclude: Sequence | None, num_queries: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Flatten per-query exclusion lists into pairs.

    Args:
        exclude: None, or Q entries, each None or a 1-D integer array-like of ids (negative entries are padding
            and ignored, so a [Q, S] array padded with -1 works too).
        num_queries: Q.

    Returns:
        ``(query_row [E], excluded_id [E], longest)``: one pair per excluded id, and the longest list (after
        dropping padding), i.e. how many extra candidates a search must fetch.

    Raises:
        DataError: not Q entries, or an entry that is not a 1-D integer list.
    """
    if exclude is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    if len(exclude) != num_queries:
        raise DataError(f"exclude must hold one id list per query: expected {num_queries}, got {len(exclude)}",
                        column="exclude")
    if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        if exclude.dtype.kind not in "iu":
            raise DataError(f"exclude must hold integer ids, got a {exclude.dtype} array", column="exclude")
        keep = exclude >= 0  # a padded [Q, S] array: flattened in one pass, no per-query conversion
        if not keep.any():
            return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
        rows = np.broadcast_to(np.arange(num_queries, dtype=np.int64)[:, None], exclude.shape)[keep]
        return rows, exclude[keep].astype(np.int64, copy=False), int(keep.sum(1).max())
    rows, parts = [], []
    for q, entry in enumerate(exclude):  # one small conversion per query; the masking itself is vectorised
        if entry is None:
            continue
        arr = np.asarray(entry)
        if arr.size == 0:
            continue
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"exclude[{q}] must be a 1-D list of integer ids, got dtype {arr.dtype} and shape "
                            f"{list(arr.shape)}", column="exclude")
        arr = arr.astype(np.int64, copy=False)
        arr = arr[arr >= 0]
        parts.append(arr)
        rows.append(np.full(len(arr), q, np.int64))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    longest = max(len(p) for p in parts)
    return np.concatenate(rows), np.concatenate(parts), int(longest)


def exclusion_mask(cand_pos: np.ndarray, excl_row: np.ndarray, excl_pos: np.ndarray, num_rows: int) -> np.ndarray:
    """[Q, F] bool: True where candidate ``cand_pos[q, f]`` (a storage row, -1 = no candidate) is excluded for
    query q, given exclusion pairs ``(excl_row [E], excl_pos [E])`` (storage rows, -1 = unknown id, ignored).

    Each (query, row) pair becomes one int64 key ``q * num_rows + row``, so one ``np.isin`` answers every query.
    """
    q, f = cand_pos.shape
    out = cand_pos < 0
    keep = excl_pos >= 0
    if keep.any():
        keys = excl_row[keep] * num_rows + excl_pos[keep]
        cand = np.arange(q, dtype=np.int64)[:, None] * num_rows + cand_pos
        out |= np.isin(cand, keys) & (cand_pos >= 0)
    return out


def compact_topk(scores: np.ndarray, ids: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the masked candidates of best-first lists and keep the first ``k`` of each row.

    Args:
        scores: [Q, F] float32, best first.
        ids: [Q, F] int64.
        drop: [Q, F] bool, True = remove.
        k: results per row.

    Returns:
        ``(scores [Q, k], ids [Q, k])``, order kept; ``-inf`` / ``-1`` where fewer than k are left.
    """
    q, f = ids.shape
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept candidates first, each group in its order
    out_s = np.take_along_axis(scores, order, 1)
    out_i = np.take_along_axis(ids, order, 1)
    dropped = np.take_along_axis(drop, order, 1)
    out_s = np.where(dropped, np.float32(-np.inf), out_s).astype(np.float32, copy=False)
    out_i = np.where(dropped, -1, out_i)
    if f < k:
        out_s = np.concatenate([out_s, np.full((q, k - f), -np.inf, np.float32)], 1)
        out_i = np.concatenate([out_i, np.full((q, k - f), -1, np.int64)], 1)
    return out_s, out_i


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int,
               chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``k`` of [Q, D] queries over [A, D] vectors with ids [A] (a small allowed set).

    Returns ``(scores [Q, k], ids [Q, k])`` best first, ``-inf`` / ``-1`` padded past A. Queries are scored in
    chunks so memory stays at O(chunk × A).
    """
    q, a = queries.shape[0], vectors.shape[0]
    kk = min(k, a)
    out_s = np.full((q, k), -np.inf, np.float32)
    out_i = np.full((q, k), -1, np.int64)
    if kk == 0:
        return out_s, out_i
    for lo in range(0, q, chunk):
        s = queries[lo: lo + chunk] @ vectors.T  # [c, A]
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < a else np.broadcast_to(np.arange(a), s.shape)
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        out_s[lo: lo + chunk, :kk] = np.take_along_axis(ps, order, 1)
        out_i[lo: lo + chunk, :kk] = ids[np.take_along_axis(part, order, 1)]
    return out_s, out_i
