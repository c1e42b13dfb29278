"""Re-rankers that plug into the cascade through the ``Reranker`` protocol: one served list per request.

* :class:`GreedyReranker` — the top L candidates of the pool by fused score, in score order.
* :class:`EvaluatorReranker` — generator–evaluator re-ranking:
  :func:`~funnelrec.rerank.generators.generate_lists` proposes K lists, an evaluator (FlashEvaluator, the
  independent evaluator or the item-sum control) scores them and the best-scoring list is served; the
  alternatives and their scores are returned too.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> from funnelrec.rerank.data import RerankPool
    >>> pool = RerankPool(torch.arange(1, 9).view(1, 8), torch.ones(1, 8, dtype=torch.bool),
    ...                   torch.rand(1, 8, 7), torch.arange(8.0).view(1, 8))
    >>> out = GreedyReranker(list_len=3).select(RequestBatch.empty(1, 2, 8), pool)
    >>> out.items.tolist(), out.positions.tolist()
    ([[8, 7, 6]], [[7, 6, 5]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import ItemFeatures, RerankPool
from funnelrec.rerank.generators import GeneratorConfig, generate_lists, standardized_scores

__all__ = ["RerankOutput", "GreedyReranker", "EvaluatorReranker"]


class RerankOutput(NamedTuple):
    """What a re-ranker returns.

    Attributes:
        items: [B, L] int64 item indices to serve, in display order.
        positions: [B, L] int64 their positions in the pool.
        lists: [B, K, L] the candidate lists considered (pool positions), or None.
        scores: [B, K] their scores, or None.
    """

    items: Tensor
    positions: Tensor
    lists: Tensor | None = None
    scores: Tensor | None = None


def _check_batch(batch: RequestBatch, pool: RerankPool, list_len: int) -> None:
    if not isinstance(pool, RerankPool):
        raise DataError(f"expected a RerankPool, got {type(pool).__name__}", column="pool")
    pool.validate(min_valid=list_len)
    if not isinstance(batch, RequestBatch) or batch.batch_size != pool.batch_size:
        raise DataError(f"expected a RequestBatch of {pool.batch_size} requests", column="batch")


class GreedyReranker:
    """Serve the top ``list_len`` real candidates by fused score (``pool.score``), best first.

    Args:
        list_len: L.
    """

    def __init__(self, list_len: int = 6):
        if isinstance(list_len, bool) or not isinstance(list_len, int) or list_len < 1:
            raise ConfigError(f"list_len must be a positive integer, got {list_len!r}")
        self.list_len = list_len

    def select(self, batch: RequestBatch, pool: RerankPool) -> RerankOutput:
        """One list per request: ``RerankOutput`` with ``items`` / ``positions`` [B, L]."""
        _check_batch(batch, pool, self.list_len)
        pos = standardized_scores(pool.score.float(), pool.mask).topk(self.list_len, dim=1).indices
        return RerankOutput(pool.items.gather(1, pos), pos)


class EvaluatorReranker:
    """Generator–evaluator re-ranking: K generated lists, the evaluator's best one served.

    Args:
        evaluator: a list evaluator, ``evaluator(batch, pool, lists) -> [B, K]`` scores.
        features: the item side features (tags and creators for the generators).
        num_lists: K.
        generator_config: generator settings (its ``list_len`` is L).
        seed: seeds the generators' random stream (one stream per re-ranker, advanced by every call).
    """

    def __init__(self, evaluator: nn.Module, features: ItemFeatures, num_lists: int = 50,
                 generator_config: GeneratorConfig | None = None, seed: int = 0):
        if isinstance(num_lists, bool) or not isinstance(num_lists, int) or num_lists < 1:
            raise ConfigError(f"num_lists must be a positive integer, got {num_lists!r}")
        self.evaluator = evaluator
        self.features = features
        self.num_lists = num_lists
        self.generator_config = (generator_config or GeneratorConfig()).validate()
        self._g = torch.Generator().manual_seed(seed)

    def select(self, batch: RequestBatch, pool: RerankPool) -> RerankOutput:
        """One list per request, with the K alternatives and their scores."""
        _check_batch(batch, pool, self.generator_config.list_len)
        side = self.features.lookup(pool.items)
        lists = generate_lists(pool, self.num_lists, side[..., 0], side[..., 1], self.generator_config,
                               self._g)
        was_training = self.evaluator.training
        self.evaluator.eval()
        with torch.inference_mode():
            scores = self.evaluator(batch, pool, lists)
        self.evaluator.train(was_training)
        best = scores.argmax(1)
        pos = lists[torch.arange(lists.shape[0]), best]
        return RerankOutput(pool.items.gather(1, pos), pos, lists, scores)
