"""Softmax losses with logQ correction: hand-computed numerics and an explicit loop as references."""

from __future__ import annotations

import math

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval import log_sampling_probability, softmax_loss_logq


def test_logq_correction_hand_computed():
    query = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    lq_pos, lq_neg = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25), math.log(0.25)])
    loss = softmax_loss_logq(query, pos, torch.tensor([1]), neg, torch.tensor([2, 3]), lq_pos, lq_neg)
    # logits: positive 1 - log .5, negatives 0 - log .25 and 1 - log .25
    logits = [1 - math.log(0.5), 0 - math.log(0.25), 1 - math.log(0.25)]
    expected = math.log(sum(math.exp(x) for x in logits)) - logits[0]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # without the correction: plain sampled softmax
    plain = softmax_loss_logq(query, pos, torch.tensor([1]), neg, torch.tensor([2, 3]))
    assert plain.item() == pytest.approx(math.log(math.e + 1 + math.e) - 1, rel=1e-6)
    # temperature divides the similarity before the correction
    hot = softmax_loss_logq(query, pos, torch.tensor([1]), neg, torch.tensor([2, 3]), lq_pos, lq_neg, temperature=0.5)
    logits = [2 - math.log(0.5), 0 - math.log(0.25), 2 - math.log(0.25)]
    assert hot.item() == pytest.approx(math.log(sum(math.exp(x) for x in logits)) - logits[0], rel=1e-6)
    # an accidental hit (a candidate that is the positive item) is masked out
    hit = softmax_loss_logq(query, pos, torch.tensor([1]), neg, torch.tensor([2, 1]), lq_pos, lq_neg)
    logits = [1 - math.log(0.5), 0 - math.log(0.25)]
    assert hit.item() == pytest.approx(math.log(sum(math.exp(x) for x in logits)) - logits[0], rel=1e-6)


def test_logq_pushes_popular_negatives_less():
    """With the correction, a frequently sampled negative is penalised less than a rare one of equal score."""
    query, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    lq = torch.tensor([math.log(0.9), math.log(0.01)])  # item 2 popular, item 3 rare
    softmax_loss_logq(query, pos, torch.tensor([1]), neg, torch.tensor([2, 3]), torch.tensor([math.log(0.1)]),
                      lq).backward()
    # the gradient on a negative's embedding is proportional to its softmax weight
    assert neg.grad[0].norm() < neg.grad[1].norm()


def test_in_batch_softmax_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    b, d, tau = 7, 5, 0.3
    u, v = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    ids = torch.tensor([3, 5, 3, 8, 9, 5, 1])  # duplicates: 3 and 5 appear twice
    lq = torch.log(torch.rand(b, generator=g) * 0.5 + 0.01)
    got = softmax_loss_logq(u, v, ids, v, ids, lq, lq, temperature=tau)
    total = 0.0
    for i in range(b):
        pos = float(u[i] @ v[i]) / tau - float(lq[i])
        logits = [pos] + [float(u[i] @ v[j]) / tau - float(lq[j]) for j in range(b) if ids[j] != ids[i]]
        total += -(pos - math.log(sum(math.exp(x) for x in logits)))
    assert got.item() == pytest.approx(total / b, rel=1e-5)


def test_log_sampling_probability():
    counts = torch.tensor([0.0, 3.0, 0.0, 1.0])
    lq = log_sampling_probability(counts, alpha=1.0, smoothing=1.0)  # weights 4, 1, 2 over items 1..3
    assert lq[0] == float("-inf")
    assert lq[1:].exp().tolist() == pytest.approx([4 / 7, 1 / 7, 2 / 7])
    assert log_sampling_probability(counts, alpha=0.0)[1:].exp().tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(DataError, match="item_popularity"):
        log_sampling_probability(torch.zeros(1))


def test_loss_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(DataError, match="query and pos"):
        softmax_loss_logq(x, torch.zeros(2, 4), torch.tensor([1, 2]), x, torch.tensor([1, 2]))
    with pytest.raises(DataError, match="neg must be"):
        softmax_loss_logq(x, x, torch.tensor([1, 2]), x, torch.tensor([1]))
    with pytest.raises(ConfigError, match="temperature"):
        softmax_loss_logq(x, x, torch.tensor([1, 2]), x, torch.tensor([1, 2]), temperature=0.0)
