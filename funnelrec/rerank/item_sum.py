"""The list-blind control: a list's score is the sum of learned per-item values (ours, not in the paper).

``ItemSumEvaluator`` encodes the pool exactly like FlashEvaluator's list-agnostic module (pool self-attention,
then cross-attention to the user's history), maps every item to one value with the ``head`` and scores a list
by the sum of its items' values — no position, no intra-list or cross-list interaction, so it cannot see
cascade examination, tag or creator saturation or the similarity of neighbours. It is trained on the same
simulated list outcomes with the same losses as the list evaluators.

Why it exists: the evaluators see T noisy predictions per item plus the user's history, so part of what they
gain over greedy-by-fused-score is a better *item-level* value estimate (denoising the ranker's predictions),
which has nothing to do with list effects. This control learns that part only; the gap between a list
evaluator and it is the gain from modelling the list, which must vanish when the world's list effects are
switched off (then a list's value is exactly a sum of item values).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> from funnelrec.rerank.data import RerankPool
    >>> from funnelrec.rerank.layers import EvaluatorConfig
    >>> b, m = 1, 6
    >>> model = ItemSumEvaluator(EvaluatorConfig(num_tags=4, creator_buckets=4, duration_buckets=4),
    ...                          torch.randint(1, 4, (11, 3)))
    >>> pool = RerankPool(torch.arange(1, m + 1).view(1, m), torch.ones(1, m, dtype=torch.bool),
    ...                   torch.rand(1, m, 7), torch.rand(1, m))
    >>> batch = RequestBatch.empty(batch_size=1, history=3, candidates=m)
    >>> s = model(batch, pool, torch.tensor([[[0, 1, 2], [2, 1, 0]]]))
    >>> bool(torch.allclose(s[0, 0], s[0, 1]))        # order-free
    True
"""

from __future__ import annotations

from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.rerank.data import RerankPool, gather_lists
from funnelrec.rerank.layers import EvaluatorBase, EvaluatorConfig, attend

__all__ = ["ItemSumEvaluator"]


class ItemSumEvaluator(EvaluatorBase):
    """Σ of learned item values (see the module docstring).

    Args:
        cfg: the evaluator config (``item_attention`` and ``history`` as in FlashEvaluator; ``cross_list``
            ignored).
        table: [I + 1, 3] int64 item side features.
    """

    def __init__(self, cfg: EvaluatorConfig, table: Tensor):
        super().__init__(cfg, table)
        del self.lists  # no list encoder: the score is order-free

    def item_values(self, batch: RequestBatch, pool: RerankPool) -> Tensor:
        """[B, M] learned value of every pool item."""
        x = self.items(pool.items, self.items.dense_features(pool))
        if self.cfg.item_attention:
            x = attend(self.item_block, x, key_valid=pool.mask)
        return self.head(self._attend_history(x, batch)).squeeze(-1)

    def forward(self, batch: RequestBatch, pool: RerankPool, lists: Tensor,
                list_mask: Tensor | None = None) -> Tensor:
        """[B, K] Σ over each list's items of their values (lists [B, K, L] pool positions)."""
        self._check(batch, pool, lists, list_mask)
        return gather_lists(self.item_values(batch, pool), lists).sum(-1)
