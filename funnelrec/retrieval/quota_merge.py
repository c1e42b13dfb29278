"""Merging K retrieval lists into one with per-request quotas (MPFormer's serving step), vectorised over requests.

MPFormer serves one ANN lookup per objective vector u_k and merges the K ranked lists into one list of M items,
giving objective k a quota ``M_k ∝ q_k(u)`` — the user's personalised target weights [SRC-2nd: "candidate quota
allocated dynamically" by the personalised weights; the rounding and the merge rule are ours]:

* :func:`allocate_quotas`: integer quotas ``M_k`` with ``Σ_k M_k = M`` per request: an optional floor
  ``min_quota`` for every list, the rest by the largest-remainder method on ``q_k · (M − K·min_quota)`` (ties to
  the lower list index), so ``|M_k − floor − q_k (M − K·floor)| < 1``.
* :func:`quota_merge`: every candidate (list k, rank r) gets the priority ``(r + 0.5) / M_k`` (the lists
  interleaved in proportion to their quotas), candidates inside their list's quota (``r < M_k``) all come before
  candidates beyond it, and the first occurrence of each item (in priority order) is kept. The merged list is the
  first M kept candidates. Without duplicates list k contributes exactly its top ``M_k``; an item found by two
  lists is kept once and the freed slot goes to the next candidate beyond its quota, so the quotas stay
  proportional when the lists overlap. Lists shorter than their quota (or with ``-1`` = "no result" entries) are
  topped up the same way.

Shapes: B requests, K lists, L list length, M merged length.

Example:
    >>> import torch
    >>> lists = torch.tensor([[[1, 2, 3, 4], [2, 5, 6, 7]]])  # [B=1, K=2, L=4]; item 2 is in both lists
    >>> quotas = allocate_quotas(torch.tensor([[0.5, 0.5]]), total=4)
    >>> quotas.tolist()
    [[2, 2]]
    >>> merged, source = quota_merge(lists, quotas)
    >>> merged.tolist(), source.tolist()
    ([[1, 2, 5, 3]], [[0, 1, 1, 0]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from funnelrec.errors import ConfigError, DataError

__all__ = ["allocate_quotas", "quota_merge", "uniform_weights"]


def uniform_weights(batch_size: int, k: int) -> Tensor:
    """[B, K] uniform target weights (the "uniform quota" ablation)."""
    if batch_size < 0 or k < 1:
        raise ConfigError(f"need batch_size >= 0 and k >= 1, got {batch_size}, {k}")
    return torch.full((batch_size, k), 1.0 / k)


def allocate_quotas(weights: Tensor, total: int, min_quota: int = 0) -> Tensor:
    """Integer quotas proportional to ``weights``, each row summing to ``total``.

    Args:
        weights: [B, K] non-negative target weights (rows need not sum to 1; an all-zero row is read as uniform).
        total: M, the merged list length (>= 0).
        min_quota: the floor of every list's quota (``K · min_quota <= total``).

    Returns:
        [B, K] int64 quotas with ``Σ_k = total``.

    Raises:
        DataError: weights not [B, K], negative or non-finite.
        ConfigError: a negative ``total`` / ``min_quota``, or floors that exceed ``total``.

    Example:
        >>> allocate_quotas(torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 0.0]]), total=10).tolist()
        [[7, 2, 1], [4, 3, 3]]
    """
    if not isinstance(weights, Tensor) or weights.dim() != 2 or weights.shape[1] < 1:
        got = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise DataError(f"weights must be a [B, K] tensor with K >= 1, got {got}", column="weights")
    for name, value in (("total", total), ("min_quota", min_quota)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    b, k = weights.shape
    if k * min_quota > total:
        raise ConfigError(f"min_quota={min_quota} for {k} lists exceeds total={total}")
    w = weights.detach().to(torch.float64).cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise DataError("weights must be finite and >= 0", column="weights")
    s = w.sum(1, keepdim=True)
    w = torch.where(s > 0, w / s.clamp(min=1e-300), torch.full_like(w, 1.0 / k))
    rest = total - k * min_quota
    raw = w * rest
    base = raw.floor()
    left = (rest - base.sum(1)).round().to(torch.int64)  # in [0, K)
    frac = raw - base
    # largest remainders first, ties to the lower index: rank of each list by (−frac, index)
    order = torch.argsort(-frac + torch.arange(k, dtype=torch.float64) * 1e-9, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k).expand(b, k).contiguous())
    extra = (rank < left.unsqueeze(1)).to(torch.int64)
    return base.to(torch.int64) + extra + min_quota


def quota_merge(lists: Tensor, quotas: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Merge K ranked lists per request into one de-duplicated list with per-list quotas (module doc).

    Args:
        lists: [B, K, L] int64 item ids, best first; ``-1`` = no result (never returned).
        quotas: [B, K] int64 quotas (from :func:`allocate_quotas`).
        total: M (default: the row sums of ``quotas``, which must then agree).

    Returns:
        ``(merged [B, M] int64, source [B, M] int64)``: the merged ids in merge order (``-1`` where fewer than M
        distinct items exist) and the list each came from (``-1`` there).

    Raises:
        DataError: wrong shapes or dtypes, negative quotas, rows of ``quotas`` with different sums (no ``total``).
    """
    if not isinstance(lists, Tensor) or lists.dim() != 3 or lists.dtype not in (torch.int64, torch.int32):
        got = list(lists.shape) if isinstance(lists, Tensor) else type(lists).__name__
        raise DataError(f"lists must be an integer [B, K, L] tensor, got {got}", column="lists")
    b, k, length = lists.shape
    if not isinstance(quotas, Tensor) or tuple(quotas.shape) != (b, k) or quotas.is_floating_point():
        raise DataError(f"quotas must be an integer [B, K] = [{b}, {k}] tensor, got "
                        f"{list(quotas.shape) if isinstance(quotas, Tensor) else type(quotas).__name__}",
                        column="quotas")
    if (quotas < 0).any():
        raise DataError("quotas must be >= 0", column="quotas")
    if total is None:
        sums = quotas.sum(1)
        if b and not (sums == sums[0]).all():
            raise DataError("quota rows sum to different totals; pass total=M", column="quotas")
        total = int(sums[0]) if b else 0
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ConfigError(f"total must be an integer >= 0, got {total!r}")
    dev = lists.device
    ids = lists.to(torch.int64).reshape(b, k * length)
    q = quotas.to(dev, torch.float64).unsqueeze(2)  # [B, K, 1]
    r = torch.arange(length, device=dev, dtype=torch.float64).view(1, 1, length)
    inside = r < q
    key = (r + 0.5) / q.clamp(min=0.5)  # interleave in proportion to the quotas
    pri = torch.where(inside, key, key + 2.0 * (length + 1)).reshape(b, k * length)  # in-quota first
    pri = pri.masked_fill(ids < 0, float("inf"))
    order = torch.argsort(pri, dim=1, stable=True)
    cand = ids.gather(1, order)  # [B, K·L] candidates in priority order
    src = order // length
    # first occurrence of each item in priority order: stable sort by item keeps priority order within an item
    by_item = torch.argsort(cand, dim=1, stable=True)
    sorted_items = cand.gather(1, by_item)
    first = torch.ones_like(sorted_items, dtype=torch.bool)
    first[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    keep = torch.zeros_like(first)
    keep.scatter_(1, by_item, first)
    keep &= cand >= 0
    pos = keep.cumsum(1) - 1  # slot of each kept candidate
    take = keep & (pos < total)
    merged = torch.full((b, total + 1), -1, dtype=torch.int64, device=dev)
    source = torch.full((b, total + 1), -1, dtype=torch.int64, device=dev)
    slot = torch.where(take, pos, torch.full_like(pos, total))  # everything else lands in a spare column
    merged.scatter_(1, slot, torch.where(take, cand, -1))
    source.scatter_(1, slot, torch.where(take, src, -1))
    return merged[:, :total], source[:, :total]
