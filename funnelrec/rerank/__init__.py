"""Re-ranking (DESIGN §2, §5): generators propose K lists from the ~60-item pool, an evaluator picks one.

* ``data`` — pools, requests and histories from the simulated world; simulated list outcomes (training
  targets) and the oracle's expected list value (evaluation only); the fixed fusion formula; observable item
  features;
* ``generators`` — greedy by fused score, beam search, MMR diversity, Plackett–Luce sampling, random swaps;
* ``independent`` — the PIER-like independent evaluator (each list encoded on its own, batched over K);
* ``flash_evaluator`` — FlashEvaluator (pool items encoded once, intra-list [CLS] attention, cross-list
  attention);
* ``item_sum`` — the list-blind control (sum of learned item values);
* ``training`` — listwise softmax cross-entropy / pointwise MSE, the training loop;
* ``reranker`` — :class:`GreedyReranker` and :class:`EvaluatorReranker`, the cascade's re-rankers.

Every re-ranker implements the ``Reranker`` protocol of the cascade (DESIGN §5):
``select(batch, pool) -> RerankOutput`` — one ordered list per request (``items`` / ``positions`` [B, L]), the
alternatives optional.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> pool = RerankPool(torch.arange(1, 9).view(1, 8), torch.ones(1, 8, dtype=torch.bool),
    ...                   torch.rand(1, 8, 7), torch.arange(8.0).view(1, 8))
    >>> r = GreedyReranker(list_len=3)
    >>> isinstance(r, Reranker), r.select(RequestBatch.empty(1, 2, 8), pool).items.shape
    (True, torch.Size([1, 3]))
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from funnelrec.data.batch import RequestBatch
from funnelrec.rerank.data import (VALUE_WEIGHTS, ItemFeatures, RerankData, RerankDataConfig, RerankPool,
                                   RerankRequests, fused_score)
from funnelrec.rerank.flash_evaluator import FlashEvaluator
from funnelrec.rerank.generators import GeneratorConfig, generate_lists
from funnelrec.rerank.independent import IndependentEvaluator
from funnelrec.rerank.item_sum import ItemSumEvaluator
from funnelrec.rerank.layers import EvaluatorConfig
from funnelrec.rerank.reranker import EvaluatorReranker, GreedyReranker, RerankOutput
from funnelrec.rerank.training import ListData, RewardScale, TrainConfig, train_evaluator

__all__ = ["Reranker", "RerankOutput", "RerankPool", "RerankRequests", "RerankData", "RerankDataConfig",
           "ItemFeatures", "VALUE_WEIGHTS", "fused_score", "GeneratorConfig", "generate_lists",
           "EvaluatorConfig", "FlashEvaluator", "IndependentEvaluator", "ItemSumEvaluator", "GreedyReranker",
           "EvaluatorReranker", "ListData", "RewardScale", "TrainConfig", "train_evaluator"]


@runtime_checkable
class Reranker(Protocol):
    """The re-ranking stage of the cascade: one ordered list per request from its pool.

    Args of ``select``:
        batch: the requests (``RequestBatch``: history, context).
        pool: their re-ranking pools (:class:`RerankPool`: items [B, M], mask, predictions [B, M, T],
            fused score).

    Returns:
        :class:`RerankOutput`: ``items`` and ``positions`` [B, L] (display order), optionally the K
        alternatives ``lists`` [B, K, L] and their ``scores`` [B, K].
    """

    def select(self, batch: RequestBatch, pool: RerankPool) -> RerankOutput:
        ...
