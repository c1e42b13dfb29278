"""Shared-Bottom multi-task ranker and its loss: shapes, masks and gradients (the other rankers get the same checks
in test_rankers.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig, multitask_loss
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch


def make_config(**kw) -> SharedBottomConfig:
    return SharedBottomConfig(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3,
                              bottom=[32, 16], head=8, history_pool=6, **kw)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SharedBottom(make_config()).eval()


def test_output_shapes_and_probabilities(model):
    batch = make_batch()
    out = model(batch)
    assert out["logits"].shape == (B, M, T)
    assert out["watch"].shape == (B, M)
    p = model.predict(batch)
    assert p.shape == (B, M, T) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, torch.sigmoid(out["logits"]))
    assert model.watch_head == "log1p" and model.watch is None  # no debiaser given
    torch.testing.assert_close(model.predict_watch_time(batch), torch.expm1(out["watch"].clamp(min=0)))
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    assert model(empty)["logits"].shape == (2, 3, T)


def test_padded_history_does_not_change_the_output(model):
    batch = make_batch()
    base = model(batch)["logits"]
    pad = ~batch.history_mask()
    changed = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items),
                                  hist_actions=torch.where(pad.unsqueeze(-1), 1.0, batch.hist_actions))
    torch.testing.assert_close(model(changed)["logits"], base, rtol=0, atol=0)
    # events older than history_pool are not read either
    old = torch.zeros(B, N, dtype=torch.bool)
    old[:, : N - model.config.history_pool] = True
    changed = dataclasses.replace(batch, hist_items=torch.where(old, 5, batch.hist_items))
    torch.testing.assert_close(model(changed)["logits"], base, rtol=0, atol=0)
    # ... while a valid recent event does matter
    recent = dataclasses.replace(batch, hist_items=batch.hist_items.clone())
    recent.hist_items[3, -1] = (batch.hist_items[3, -1] % (ITEM_VOCAB[0] - 1)) + 1
    assert not torch.allclose(model(recent)["logits"][3], base[3])


def test_candidates_are_scored_independently(model):
    batch = make_batch()
    base = model(batch)["logits"]
    changed = dataclasses.replace(batch, cand_sparse=batch.cand_sparse.clone(), cand_dense=batch.cand_dense.clone())
    changed.cand_sparse[1, 4] = torch.tensor([3, 2, 1])  # a padded slot of request 1
    changed.cand_dense[1, 4] = 9.0
    out = model(changed)["logits"]
    torch.testing.assert_close(out[:, :4], base[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2, 3]], base[[0, 2, 3]], rtol=0, atol=0)
    assert not torch.allclose(out[1, 4], base[1, 4])


def test_position_feature_can_be_switched_off():
    torch.manual_seed(0)
    with_pos = SharedBottom(make_config()).eval()
    torch.manual_seed(0)
    without = SharedBottom(make_config(use_position=False)).eval()
    batch = make_batch()
    moved = dataclasses.replace(batch, position=batch.position.flip(1))
    assert not torch.allclose(with_pos(moved)["logits"], with_pos(batch)["logits"])
    torch.testing.assert_close(without(moved)["logits"], without(batch)["logits"], rtol=0, atol=0)


def test_multitask_loss_ignores_masked_candidates(model):
    batch = make_batch()
    out = model(batch)
    loss = multitask_loss(out, batch)
    pad = ~batch.cand_mask
    noisy_labels = torch.where(pad.unsqueeze(-1), 1.0 - batch.labels, batch.labels)
    noisy = dataclasses.replace(batch, labels=noisy_labels, watch_time_s=torch.where(pad, 1e4, batch.watch_time_s))
    torch.testing.assert_close(multitask_loss(out, noisy), loss)
    wild = {"logits": torch.where(pad.unsqueeze(-1), 50.0, out["logits"]),
            "watch": torch.where(pad, float("nan"), out["watch"])}
    torch.testing.assert_close(multitask_loss(wild, batch), loss)
    # the value: mean BCE over tasks and real candidates, + 0.1 x MSE of log1p watch seconds
    m = batch.cand_mask
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"][m], batch.labels[m])
    mse = ((out["watch"][m] - torch.log1p(batch.watch_time_s[m])) ** 2).mean()
    torch.testing.assert_close(loss, bce + 0.1 * mse)
    torch.testing.assert_close(model.loss(out, batch), loss)  # the model's own loss: its log1p head, weight 0.1
    torch.testing.assert_close(multitask_loss(out, batch, watch_weight=0.0), bce)
    no_watch = dataclasses.replace(batch, watch_time_s=None)
    torch.testing.assert_close(multitask_loss(out, no_watch), bce)
    # a batch with no real candidate gives a finite zero loss
    nothing = dataclasses.replace(batch, cand_mask=torch.zeros_like(batch.cand_mask))
    assert multitask_loss(out, nothing).item() == 0.0


def test_gradients_reach_exactly_the_embedding_rows_used(model):
    batch = make_batch()
    model.train()
    model.training_loss(batch).backward()
    inputs = model.inputs
    grad = inputs.item_emb.table.weight.grad
    touched = set(torch.nonzero(grad.abs().sum(1)).squeeze(1).tolist())
    offsets = inputs.item_emb.offsets
    real = batch.cand_mask
    expected = set((batch.cand_sparse[real] + offsets).flatten().tolist())
    pooled = batch.truncate_history(model.config.history_pool)
    expected |= set(pooled.hist_items[pooled.history_mask()].tolist())  # history shares the item-id rows
    assert touched == expected
    assert 0 not in touched  # the padding row of the item ids gets nothing
    user_touched = set(torch.nonzero(inputs.user_emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist())
    assert user_touched == set((batch.user_sparse + inputs.user_emb.offsets).flatten().tolist())
    # every head and the tower learn
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    head_grad = model.heads.hidden.weight.grad  # [T + 1, H, head]
    assert (head_grad.abs().flatten(1).sum(1) > 0).all()
