"""Full-corpus top-K ranking metrics (retrieval evaluation) from a score matrix over all items.

Scores are [B, I]: one row per request, one column per item of the corpus. Relevance is either a leave-one-out
target per row ([B] int64 item index) or a [B, I] bool mask of relevant items. Items of the user's history can be
excluded (set to ``-inf`` before ranking, and never counted as hits). Metrics are averaged over rows with at least
one relevant item and returned as Python floats.

Definitions at cut-off ``k`` for a row with ``R`` relevant items and hits ``h_1..h_k`` (1 = relevant at rank i):

* ``hr@k``     1 if any of the top k is relevant;
* ``recall@k`` ``sum_i h_i / R`` (equal to ``hr@k`` for leave-one-out);
* ``ndcg@k``   ``sum_i h_i / log2(i + 1)`` divided by its ideal value ``sum_{i <= min(k, R)} 1 / log2(i + 1)``;
* ``mrr@k``    ``1 / rank`` of the first relevant item in the top k, 0 if none.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.2, 0.8, 0.6, 0.4]])
    >>> m = topk_metrics(scores, torch.tensor([1, 2]), ks=(1, 2))
    >>> m["hr@1"], m["hr@2"], m["mrr@2"]
    (0.0, 1.0, 0.5)
    >>> topk_metrics(scores, torch.tensor([1, 2]), ks=(1,), exclude=scores > 0.85)["hr@1"]  # item 0 seen by row 0
    0.5
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from funnelrec.errors import DataError

__all__ = ["topk_metrics", "coverage", "true_recall_at_k", "gap_closed"]


def _to_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:
        raise DataError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise DataError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def topk_metrics(
    scores: Any,
    targets: Any,
    ks: Sequence[int] | int = (10, 50),
    exclude: Any | None = None,
) -> dict[str, float]:
    """Recall, NDCG, MRR and hit rate at each cut-off in ``ks`` over the full corpus.

    Args:
        scores: [B, I] float scores of every item for every request (higher ranks first).
        targets: [B] int64 leave-one-out target item per row, or [B, I] bool mask of relevant items.
        ks: cut-offs; a cut-off above ``I`` is treated as ``I`` (keys still say the requested ``k``).
        exclude: optional [B, I] bool mask of items not to rank (the user's history); they are set to ``-inf``
            and never count as hits, even when they are targets.

    Returns:
        ``{"recall@k", "ndcg@k", "mrr@k", "hr@k"}`` for each ``k``, averaged over rows with at least one relevant
        item (``nan`` when no row has one). Ties in scores are broken by ``torch.topk`` (unspecified order).

    Example:
        >>> import torch
        >>> rel = torch.tensor([[True, False, True, False]])
        >>> m = topk_metrics(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), rel, ks=2)
        >>> m["recall@2"], round(m["ndcg@2"], 4)
        (0.5, 0.6131)
    """
    ks = _check_ks(ks)
    s = _to_tensor(scores, "scores")
    if s.dim() != 2:
        raise DataError(f"scores must be [B, I], got shape {list(s.shape)}")
    if not s.is_floating_point():
        s = s.float()
    b, num_items = s.shape
    t = _to_tensor(targets, "targets").to(s.device)
    if t.dim() == 1:
        if t.shape[0] != b:
            raise DataError(f"targets must be [B] = [{b}] or [B, I] = [{b}, {num_items}], got shape {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise DataError(f"targets of shape [B] must hold integer item indices, got dtype {t.dtype}")
        t = t.long()
        if b and (t.min() < 0 or t.max() >= num_items):
            raise DataError(f"targets must lie in [0, {num_items}), got range [{int(t.min())}, {int(t.max())}]")
        rel = torch.zeros(b, num_items, dtype=torch.bool, device=s.device)
        rel.scatter_(1, t[:, None], True)
    elif t.dim() == 2:
        if tuple(t.shape) != (b, num_items):
            raise DataError(f"targets mask must have the shape of scores {[b, num_items]}, got {list(t.shape)}")
        rel = t.bool()
    else:
        raise DataError(f"targets must be [B] or [B, I], got shape {list(t.shape)}")
    if exclude is not None:
        ex = _to_tensor(exclude, "exclude").to(s.device)
        if tuple(ex.shape) != (b, num_items):
            raise DataError(f"exclude must have the shape of scores {[b, num_items]}, got {list(ex.shape)}")
        ex = ex.bool()
        s = s.masked_fill(ex, float("-inf"))
        rel = rel & ~ex

    kmax = min(max(ks), num_items)
    top_s, top_i = torch.topk(s, kmax, dim=1, sorted=True)
    hits = rel.gather(1, top_i) & (top_s > float("-inf"))  # [B, kmax]
    n_rel = rel.sum(1)  # [B]
    valid = n_rel > 0
    n_valid = int(valid.sum())
    hits = hits[valid].to(torch.float64)
    n_rel = n_rel[valid].to(torch.float64)

    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=s.device))  # [kmax]
    cum_discount = torch.cumsum(discount, 0)
    ranks = torch.arange(1, kmax + 1, dtype=torch.float64, device=s.device)
    # First hit position per row (kmax when none) for MRR.
    any_hit = hits > 0
    first = torch.where(any_hit.any(1), any_hit.to(torch.int8).argmax(1), torch.full_like(n_rel, kmax).long())
    dcg_cum = torch.cumsum(hits * discount, 1)  # [V, kmax]
    hits_cum = torch.cumsum(hits, 1)

    out: dict[str, float] = {}
    for k in ks:  # loop over cut-offs, not rows
        kk = min(k, num_items)
        if n_valid == 0:
            out.update({f"recall@{k}": math.nan, f"ndcg@{k}": math.nan, f"mrr@{k}": math.nan, f"hr@{k}": math.nan})
            continue
        h = hits_cum[:, kk - 1]
        ideal = cum_discount[(torch.clamp(n_rel, max=kk) - 1).long()]
        rr = torch.where(first < kk, 1.0 / ranks[first.clamp(max=kmax - 1)], torch.zeros_like(n_rel))
        out[f"recall@{k}"] = float((h / n_rel).mean())
        out[f"ndcg@{k}"] = float((dcg_cum[:, kk - 1] / ideal).mean())
        out[f"mrr@{k}"] = float(rr.mean())
        out[f"hr@{k}"] = float((h > 0).to(torch.float64).mean())
    return out


def coverage(topk_items: Any, num_items: int) -> float:
    """Catalogue coverage: the share of the ``num_items`` items that appear in at least one recommended list.

    Args:
        topk_items: [B, K] (or any shape) int item indices; negative entries are padding and ignored.
        num_items: size of the corpus ``I``.

    Example:
        >>> coverage([[0, 1], [1, 2], [2, -1]], num_items=6)
        0.5
    """
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise DataError(f"num_items must be a positive integer, got {num_items!r}")
    x = _to_tensor(topk_items, "topk_items")
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise DataError(f"topk_items must hold integer item indices, got dtype {x.dtype}")
    x = x.reshape(-1).long()
    x = x[x >= 0]
    if x.numel() and int(x.max()) >= num_items:
        raise DataError(f"topk_items must lie in [0, {num_items}), got {int(x.max())}")
    seen = torch.zeros(int(num_items), dtype=torch.bool, device=x.device)
    seen[x] = True
    return float(seen.sum()) / float(num_items)


def true_recall_at_k(retrieved: Any, oracle_scores: Any, k: int) -> float:
    """Share of the oracle's full-corpus top-``k`` items that the retrieved set contains, averaged over rows.

    Args:
        retrieved: [B, K] int item indices returned by a retriever (any ``K``; negative entries are padding).
        oracle_scores: [B, I] true utilities of every item (from the simulator's oracle).
        k: size of the oracle's top set (``k <= I``). Ties at the boundary are broken by ``torch.topk``.

    Returns:
        ``mean_b |retrieved_b ∩ oracle_top_k_b| / k``.

    Example:
        >>> import torch
        >>> oracle = torch.tensor([[0.9, 0.1, 0.8, 0.7]])
        >>> true_recall_at_k(torch.tensor([[2, 1, 3]]), oracle, k=2)
        0.5
    """
    r = _to_tensor(retrieved, "retrieved")
    o = _to_tensor(oracle_scores, "oracle_scores")
    if o.dim() != 2:
        raise DataError(f"oracle_scores must be [B, I], got shape {list(o.shape)}")
    b, num_items = o.shape
    if r.dim() != 2 or r.shape[0] != b:
        raise DataError(f"retrieved must be [B, K] with B = {b}, got shape {list(r.shape)}")
    if r.dtype.is_floating_point or r.dtype == torch.bool:
        raise DataError(f"retrieved must hold integer item indices, got dtype {r.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_items:
        raise DataError(f"k must be an integer in [1, {num_items}], got {k!r}")
    if b == 0:
        return math.nan
    r = r.to(o.device).long()
    if r.numel() and int(r.max()) >= num_items:
        raise DataError(f"retrieved must lie in [0, {num_items}), got {int(r.max())}")
    got = torch.zeros(b, num_items + 1, dtype=torch.bool, device=o.device)
    got.scatter_(1, torch.where(r < 0, num_items, r), True)  # padding goes to the spare last column
    oracle_top = torch.topk(o.float() if not o.is_floating_point() else o, int(k), dim=1).indices
    return float(got.gather(1, oracle_top).sum(1).to(torch.float64).mean() / k)


def gap_closed(m: float, m_pop: float, m_oracle: float) -> float:
    """Share of the popularity-to-oracle gap a model closes: ``(m - m_pop) / (m_oracle - m_pop)``.

    0 means no better than the popularity baseline, 1 means as good as the oracle. ``nan`` when the oracle does not
    beat popularity (denominator ≤ 0: there is no gap to close) or any input is ``nan``.

    Example:
        >>> gap_closed(0.75, 0.5, 1.0)
        0.5
    """
    m, m_pop, m_oracle = float(m), float(m_pop), float(m_oracle)
    den = m_oracle - m_pop
    if not den > 0:  # also catches nan
        return math.nan
    return (m - m_pop) / den
