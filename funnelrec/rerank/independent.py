"""The independent list evaluator (PIER-like): every list is encoded on its own, batched over the K lists.

This is the baseline of the FlashEvaluator paper: a production-style evaluator that scores each candidate list
with its own forward pass (the paper compares with PIER; online, with a PIER-like evaluator). Its cost grows
with the total number of item occurrences K·L, since an item that appears in many lists is encoded again in
each.

Per list (all lists of all requests in one batched pass, no Python loop over lists):

1. each of the L items is encoded from its features (``items``) — once **per occurrence**;
2. ``item_block``: self-attention among the list's L items (``item_attention``);
3. ``history_block``: cross-attention from the list's items to the user's history;
4. ``lists``: position embeddings, a [CLS] token and intra-list self-attention → the list embedding;
5. ``head``: the list score. No list sees another.

Being the strongest plain baseline (DESIGN §7) it shares what is list-independent: the history is encoded and
projected to keys/values once per request, and the K·L item queries of a request attend to it in one SDPA
call.

Training: ``loss="pointwise"`` (MSE of each list's score against its standardised outcome, the usual way a
serial evaluator is trained) or ``loss="listwise"`` (softmax cross-entropy over the K lists, which batching
over K makes possible). See :mod:`funnelrec.rerank.training`.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> from funnelrec.rerank.data import RerankPool
    >>> from funnelrec.rerank.layers import EvaluatorConfig
    >>> b, m, k, length = 2, 10, 4, 3
    >>> table = torch.randint(1, 4, (21, 3))                      # ItemFeatures.table of 20 items
    >>> cfg = EvaluatorConfig(num_tags=4, creator_buckets=4, duration_buckets=4)
    >>> model = IndependentEvaluator(cfg, table)
    >>> pool = RerankPool(torch.randint(1, 21, (b, m)), torch.ones(b, m, dtype=torch.bool),
    ...                   torch.rand(b, m, 7), torch.rand(b, m))
    >>> batch = RequestBatch.empty(batch_size=b, history=5, candidates=m)
    >>> lists = torch.stack([torch.randperm(m)[:length] for _ in range(b * k)]).view(b, k, length)
    >>> model(batch, pool, lists).shape                            # [B, K]
    torch.Size([2, 4])
"""

from __future__ import annotations

from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.rerank.data import RerankPool, gather_lists
from funnelrec.rerank.layers import EvaluatorBase, EvaluatorConfig, attend

__all__ = ["IndependentEvaluator"]


class IndependentEvaluator(EvaluatorBase):
    """PIER-like evaluator: each list encoded on its own (see the module docstring).

    Args:
        cfg: the evaluator config (``cross_list`` is ignored: lists never interact).
        table: [I + 1, 3] int64 item side features (``ItemFeatures.table``).
    """

    def __init__(self, cfg: EvaluatorConfig, table: Tensor):
        super().__init__(cfg, table)

    def forward(self, batch: RequestBatch, pool: RerankPool, lists: Tensor,
                list_mask: Tensor | None = None) -> Tensor:
        """Score every list.

        Args:
            batch: the requests (history).
            pool: their pools [B, M].
            lists: [B, K, L] int64 pool positions.
            list_mask: [B, K] bool real lists (default all).

        Returns:
            [B, K] scores (higher = better list).
        """
        list_mask = self._check(batch, pool, lists, list_mask)
        b, k, length = lists.shape
        items = gather_lists(pool.items, lists)  # [B, K, L]
        dense = gather_lists(self.items.dense_features(pool), lists)  # [B, K, L, T + 2]
        x = self.items(items, dense)  # encoded once per occurrence: [B, K, L, D]
        d = x.shape[-1]
        if self.cfg.item_attention:
            x = attend(self.item_block, x.reshape(b * k, length, d)).view(b, k, length, d)
        x = self._attend_history(x.reshape(b, k * length, d), batch).view(b, k, length, d)
        return self.score_lists(x, list_mask)
