"""Synthetic re-ranking inputs for model tests (no world needed)."""

from __future__ import annotations

import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.rerank.data import RerankPool


def synthetic(b: int = 3, m: int = 12, k: int = 5, length: int = 4, n: int = 7, items: int = 30,
              seed: int = 0, masked: int = 0):
    """Random (table, batch, pool, lists) for model tests; the last ``masked`` pool slots are padding."""
    g = torch.Generator().manual_seed(seed)
    table = torch.cat([torch.zeros(1, 3, dtype=torch.int64), torch.randint(1, 5, (items, 3), generator=g)])
    pool_items = torch.stack([torch.randperm(items, generator=g)[:m] + 1 for _ in range(b)])
    mask = torch.ones(b, m, dtype=torch.bool)
    if masked:
        mask[:, m - masked:] = False
        pool_items[:, m - masked:] = 0
    pool = RerankPool(pool_items, mask, torch.rand(b, m, 7, generator=g), torch.rand(b, m, generator=g) * 20)
    batch = RequestBatch.empty(batch_size=b, history=n, candidates=m)
    batch.hist_items = torch.randint(1, items + 1, (b, n), generator=g)
    batch.hist_actions = (torch.rand(b, n, 7, generator=g) < 0.3).float()
    batch.hist_gap_s = torch.rand(b, n, generator=g) * 1e5
    batch.hist_len = torch.tensor([n, n - 2, 1][:b] + [n] * max(0, b - 3))
    valid = m - masked
    lists = torch.stack([torch.randperm(valid, generator=g)[:length] for _ in range(b * k)])
    lists = lists.view(b, k, length)
    return table, batch, pool, lists
