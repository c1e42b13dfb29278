"""Losses and the training loop of the list evaluators."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import RerankRequests
from funnelrec.rerank.flash_evaluator import FlashEvaluator
from funnelrec.rerank.layers import EvaluatorConfig
from funnelrec.rerank.training import (ListData, RewardScale, TrainConfig, listwise_loss, pointwise_loss,
                                       train_evaluator)

from rerank_testkit import synthetic


def test_listwise_gradient_is_softmax_minus_target():
    torch.manual_seed(0)
    scores = torch.randn(4, 6, requires_grad=True)
    rewards = torch.randn(4, 6) * 30
    scale = RewardScale.fit(rewards)
    loss = listwise_loss(scores, rewards, scale, temperature=0.7)
    loss.backward()
    target = torch.softmax(rewards / (0.7 * scale.within_std), 1)
    expected = (torch.softmax(scores.detach(), 1) - target) / 4
    assert torch.allclose(scores.grad, expected, atol=1e-6)
    # minimised (zero gradient) at scores = rewards / (τ s_w) + any per-request constant
    best = (rewards / (0.7 * scale.within_std) + torch.randn(4, 1)).requires_grad_()
    listwise_loss(best, rewards, scale, 0.7).backward()
    assert best.grad.abs().max() < 1e-6


def test_listwise_mask_and_pointwise():
    rewards = torch.tensor([[10.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    scale = RewardScale.fit(rewards)
    scores = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    listwise_loss(scores, rewards, scale, list_mask=mask).backward()
    assert scores.grad[0, 2] == 0  # a padded list gets no gradient
    p = pointwise_loss(torch.zeros(2, 3), rewards, scale)
    assert p == pytest.approx(float((((rewards - scale.mean) / scale.std) ** 2).mean()))
    assert scale.mean == pytest.approx(rewards.mean().item())
    with pytest.raises(DataError):
        listwise_loss(torch.zeros(2, 2), rewards, scale)
    with pytest.raises(DataError):
        RewardScale.fit(torch.zeros(1, 1))


def _data(seed, b=48, k=6):
    table, batch, pool, lists = synthetic(b=b, m=10, k=k, length=3, seed=seed)
    # a learnable list value: the sum of the items' first predicted probability, larger at the top
    w = torch.tensor([3.0, 2.0, 1.0])
    p0 = pool.pxtr[..., 0].gather(1, lists.flatten(1)).view_as(lists)
    rewards = (p0 * w).sum(-1) * 20
    req = RerankRequests(batch, pool, torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64),
                         torch.zeros(b, 4), 0)
    return table, ListData(req, lists, rewards)


@pytest.mark.parametrize("loss", ["listwise", "pointwise"])
def test_training_learns_a_list_value(loss):
    table, train = _data(0)
    _, valid = _data(1)
    cfg = EvaluatorConfig(num_tags=5, creator_buckets=5, duration_buckets=5, dim=16, loss=loss)
    model = FlashEvaluator(cfg, table)
    with torch.no_grad():
        before = (model(valid.requests.batch, valid.requests.pool, valid.lists).argmax(1)
                  == valid.rewards.argmax(1)).float().mean()
    res = train_evaluator(model, train, valid, TrainConfig(epochs=40, batch_size=16, lr=5e-3, patience=40))
    with torch.no_grad():
        after = (model(valid.requests.batch, valid.requests.pool, valid.lists).argmax(1)
                 == valid.rewards.argmax(1)).float().mean()
    assert res.curve[-1]["valid_loss"] < res.curve[0]["valid_loss"]
    assert after > max(before, 1 / 6 + 0.2)
    assert not model.training and 1 <= res.best_epoch <= len(res.curve) <= 40


def test_early_stopping_and_bad_config():
    table, train = _data(0, b=16)
    model = FlashEvaluator(EvaluatorConfig(num_tags=5, creator_buckets=5, duration_buckets=5, dim=8), table)
    res = train_evaluator(model, train, train, TrainConfig(epochs=30, batch_size=8, lr=0.5, patience=0))
    assert len(res.curve) < 30 or res.best_epoch == 30
    for bad in (dict(epochs=0), dict(batch_size=0), dict(lr=0), dict(temperature=0), dict(patience=-1)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()
    with pytest.raises(DataError):
        ListData(train.requests, train.lists[:3], train.rewards[:3])
