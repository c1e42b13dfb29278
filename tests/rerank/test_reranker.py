"""The ``Reranker`` protocol: greedy and generator–evaluator re-rankers give one valid list per request."""

from __future__ import annotations

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank import EvaluatorReranker, FlashEvaluator, GreedyReranker, Reranker, RerankOutput
from funnelrec.rerank.data import check_lists
from funnelrec.rerank.layers import EvaluatorConfig


def test_greedy_reranker(small_data):
    req = small_data.requests(torch.arange(6), seed=0)
    r = GreedyReranker(small_data.list_len)
    assert isinstance(r, Reranker)
    out = r.select(req.batch, req.pool)
    assert isinstance(out, RerankOutput) and out.items.shape == (6, small_data.list_len)
    assert torch.equal(out.items, req.pool.items.gather(1, out.positions))
    check_lists(out.positions.unsqueeze(1), req.pool)
    s = req.pool.score.masked_fill(~req.pool.mask, float("-inf"))
    assert torch.equal(out.positions, s.topk(small_data.list_len, dim=1).indices)


def test_evaluator_reranker_serves_the_best_scored_list(small_data):
    req = small_data.requests(torch.arange(5), seed=1)
    model = FlashEvaluator(EvaluatorConfig.for_features(small_data.features, dim=16),
                           small_data.features.table)
    r = EvaluatorReranker(model, small_data.features, num_lists=12, seed=3)
    assert isinstance(r, Reranker)
    out = r.select(req.batch, req.pool)
    assert out.lists.shape == (5, 12, small_data.list_len) and out.scores.shape == (5, 12)
    best = out.scores.argmax(1)
    assert torch.equal(out.positions, out.lists[torch.arange(5), best])
    assert torch.equal(out.items, req.pool.items.gather(1, out.positions))
    check_lists(out.lists, req.pool)
    assert model.training  # the re-ranker restores the mode it found


def test_bad_input(small_data):
    req = small_data.requests(torch.arange(2), seed=2)
    with pytest.raises(DataError, match="RequestBatch"):
        GreedyReranker().select(RequestBatch.empty(3, 2, 4), req.pool)
    with pytest.raises(DataError, match="RerankPool"):
        GreedyReranker().select(req.batch, req.pool.items)
    few = req.pool.select(torch.arange(2))
    few.mask = torch.zeros_like(few.mask)
    few.mask[:, :3] = True
    with pytest.raises(DataError, match="real candidates"):
        GreedyReranker(6).select(req.batch, few)
    with pytest.raises(ConfigError):
        GreedyReranker(0)
    model = FlashEvaluator(EvaluatorConfig.for_features(small_data.features, dim=16),
                           small_data.features.table)
    with pytest.raises(ConfigError):
        EvaluatorReranker(model, small_data.features, num_lists=0)
