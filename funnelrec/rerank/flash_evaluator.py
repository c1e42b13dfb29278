"""FlashEvaluator: all K candidate lists of a request in one pass, each distinct pool item encoded once.

Follows FlashEvaluator (Feng et al., arXiv 2603.02565, 2026), known at module level from secondary sources
(``../shared/papers/flash-evaluator.md``):

1. **List-agnostic interaction** [paper]: self-attention over the set of distinct pool items (M ≈ 60), then
   cross-attention from them to the user's history (the last ≤ 1,000 interactions). Each item is encoded once
   and shared by every list that holds it.
2. **Cross-list interaction** [paper]: gather each list's item encodings in order; intra-list self-attention
   with a [CLS] token gives one embedding per list; cross-list self-attention among the K list embeddings
   compares the lists directly.
3. **Scoring and loss** [paper]: one score per list, trained jointly with a listwise softmax cross-entropy
   over the K lists (MSE as an option): :mod:`funnelrec.rerank.training`.

Ours (the exact equations are not public): the feature set and widths, pre-norm RMSNorm attention + FFN blocks
(:class:`funnelrec.nn.SeqAttentionLayer`), position embeddings added after the item-side blocks, one block per
stage, and a padded-list mask for the cross-list block. Cost: the item side is O(M) per request instead of
O(K·L) (Prop. 5.5 of the paper: distinct items rather than item occurrences), so forward time grows
sublinearly in K.

``cross_list=False`` is the paper's ablation "without cross-list attention": each list's score then depends on
that list only. With ``item_attention=False`` an item's encoding depends on the item alone, and the model
equals :class:`~funnelrec.rerank.independent.IndependentEvaluator` (``item_attention=False``) with the same
weights — encoding once and gathering is exactly encoding every occurrence
(``tests/rerank/test_evaluators.py``).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> from funnelrec.rerank.data import RerankPool
    >>> from funnelrec.rerank.layers import EvaluatorConfig
    >>> b, m, k, length = 2, 10, 4, 3
    >>> table = torch.randint(1, 4, (21, 3))
    >>> model = FlashEvaluator(EvaluatorConfig(num_tags=4, creator_buckets=4, duration_buckets=4), table)
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
from funnelrec.nn import SeqAttentionLayer
from funnelrec.rerank.data import RerankPool, gather_lists
from funnelrec.rerank.layers import EvaluatorBase, EvaluatorConfig, attend, seeded

__all__ = ["FlashEvaluator"]


class FlashEvaluator(EvaluatorBase):
    """FlashEvaluator (see the module docstring).

    Args:
        cfg: the evaluator config (``item_attention``: pool self-attention; ``cross_list``: cross-list
            attention).
        table: [I + 1, 3] int64 item side features (``ItemFeatures.table``).
    """

    def __init__(self, cfg: EvaluatorConfig, table: Tensor):
        super().__init__(cfg, table)
        with seeded(cfg.seed + 1):
            self.cross_block = (SeqAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout)
                                if cfg.cross_list else None)

    def encode_pool(self, batch: RequestBatch, pool: RerankPool) -> Tensor:
        """[B, M, D] the list-agnostic encoding of every pool item (pool self-attention, then history)."""
        x = self.items(pool.items, self.items.dense_features(pool))  # [B, M, D]
        if self.cfg.item_attention:
            x = attend(self.item_block, x, key_valid=pool.mask)
        return self._attend_history(x, batch)

    def forward(self, batch: RequestBatch, pool: RerankPool, lists: Tensor,
                list_mask: Tensor | None = None) -> Tensor:
        """Score every list of every request in one pass.

        Args:
            batch: the requests (history).
            pool: their pools [B, M].
            lists: [B, K, L] int64 pool positions.
            list_mask: [B, K] bool real lists (default all); padded lists are ignored by the cross-list block.

        Returns:
            [B, K] scores (higher = better list).
        """
        list_mask = self._check(batch, pool, lists, list_mask)
        p = self.encode_pool(batch, pool)  # each distinct item once
        y = self.lists(gather_lists(p, lists))  # [B, K, D]
        if self.cross_block is not None:
            y = attend(self.cross_block, y, key_valid=list_mask)
        return self.head(y).squeeze(-1)
