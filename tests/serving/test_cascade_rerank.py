"""Re-rankers plug into the cascade through the ``Reranker`` protocol of ``funnelrec.rerank``."""

from __future__ import annotations

import numpy as np
import torch

from cascade_fixtures import SIZES, cascade_env  # noqa: F401
from funnelrec.rerank import EvaluatorConfig, EvaluatorReranker, FlashEvaluator, GeneratorConfig, ItemFeatures
from funnelrec.serving.cascade import complete_lists


def test_complete_lists_puts_the_rerankers_list_first_then_fills_by_score():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    mask = torch.tensor([[True, True, True, True, False]])
    chosen = torch.tensor([[2, 0]])  # the re-ranker's order, whatever the fused scores say
    assert complete_lists(chosen, score, mask, 4).tolist() == [[2, 0, 1, 3]]
    assert complete_lists(chosen, score, mask, 1).tolist() == [[2]]


def test_flash_evaluator_reranker_serves_through_the_cascade(cascade_env):  # noqa: F811
    world = cascade_env.source.world
    features = ItemFeatures.from_world(world)
    cfg = EvaluatorConfig(num_tags=features.num_tags, creator_buckets=features.creator_buckets,
                          duration_buckets=features.duration_buckets)
    evaluator = FlashEvaluator(cfg, features.table)
    reranker = EvaluatorReranker(evaluator, features, num_lists=8, generator_config=GeneratorConfig(list_len=6))
    cascade = cascade_env.cascade()
    cascade.reranker = reranker
    users, times, tab, hour = cascade_env.args(cascade_env.requests.head(4))
    out = cascade.recommend(users, times, tab, hour, count=10)
    assert out.items.shape == (4, 10) and out.sizes["rerank"] == 10
    for row, pool in zip(out.items, out.stage_items["fusion"]):
        served = row[row >= 0] + 1
        assert len(set(served.tolist())) == len(served)  # no repeats
        assert set(served.tolist()) <= set(pool[pool > 0].tolist())  # from the pool
