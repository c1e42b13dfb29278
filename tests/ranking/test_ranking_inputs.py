"""``RankingInputs``: the token layout, the two history modes against hand computations, and input checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import masked_mean
from funnelrec.ranking.inputs import MAX_POSITIONS, RankingInputs
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, make_batch

D = 4


def make_inputs(**kw) -> RankingInputs:
    torch.manual_seed(0)
    return RankingInputs(USER_VOCAB, ITEM_VOCAB, user_dense=2, item_dense=3, embed_dim=D, history_pool=6, **kw)


def test_token_layout_and_dense_values():
    enc = make_inputs()
    batch = make_batch()
    f = enc(batch)
    fu, fi = len(USER_VOCAB), len(ITEM_VOCAB)
    s = fu + fi + 2 + 1 + 2
    assert enc.num_tokens == s and f.tokens.shape == (B, M, s, D)
    assert enc.dense_dim == 2 + 3 + 1 and f.dense.shape == (B, M, 6)
    assert enc.out_dim == s * D + 6 and f.flat.shape == (B, M, enc.out_dim)
    tok = f.tokens
    torch.testing.assert_close(tok[:, 1, :fu], enc.user_emb(batch.user_sparse))  # same for every candidate
    torch.testing.assert_close(tok[:, :, fu: fu + fi], enc.item_emb(batch.cand_sparse))
    torch.testing.assert_close(tok[:, 2, fu + fi], enc.tab_emb(batch.tab))
    torch.testing.assert_close(tok[:, 2, fu + fi + 1], enc.hour_emb(batch.hour))
    torch.testing.assert_close(tok[:, :, fu + fi + 2], enc.pos_emb(batch.position))
    # history: mean and positive-weighted mean of the last history_pool item-id embeddings
    hist = batch.truncate_history(6)
    e = enc.item_emb.field_table(0)[hist.hist_items]
    mask = hist.history_mask()
    positive = hist.hist_actions[..., :3].sum(-1)
    torch.testing.assert_close(tok[:, 0, -2], masked_mean(e, mask))
    torch.testing.assert_close(tok[:, 0, -1], masked_mean(e, mask, positive))
    assert torch.equal(tok[0, :, -2:], torch.zeros(M, 2, D))  # request 0 has no history
    torch.testing.assert_close(f.dense[..., :2], batch.user_dense.unsqueeze(1).expand(B, M, 2))
    torch.testing.assert_close(f.dense[..., 2:5], batch.cand_dense)
    torch.testing.assert_close(f.dense[..., 5], torch.log1p(batch.duration_s) - 4.0)
    torch.testing.assert_close(f.flat, torch.cat([tok.flatten(2), f.dense], -1))


def test_target_mode_attends_per_candidate():
    enc = make_inputs(history_mode="target", attention_hidden=(8,))
    batch = make_batch()
    tok = enc(batch).tokens
    hist = batch.truncate_history(6)
    e = enc.item_emb.field_table(0)[hist.hist_items]
    mask = hist.history_mask()
    positive = hist.hist_actions[..., :3].sum(-1, keepdim=True)
    q = enc.item_emb(batch.cand_sparse)[:, :, 0]
    w = enc.attention.scores(q, e).masked_fill(~mask.unsqueeze(1), 0.0)  # [B, M, N], unnormalised (DIN)
    torch.testing.assert_close(tok[:, :, -2], w @ e)
    torch.testing.assert_close(tok[:, :, -1], w @ (e * positive))
    assert not torch.allclose(tok[2, 0, -2], tok[2, 1, -2])  # each candidate sees its own history summary


def test_position_switch_and_clamping():
    enc = make_inputs(use_position=False)
    assert enc.pos_emb is None and enc.num_tokens == len(USER_VOCAB) + len(ITEM_VOCAB) + 4
    batch = make_batch()
    far = dataclasses.replace(batch, position=batch.position + 1000)
    with_pos = make_inputs()
    last = with_pos.pos_emb.weight[MAX_POSITIONS - 1]
    torch.testing.assert_close(with_pos(far).tokens[:, :, 7], last.expand(B, M, D))


def test_bad_inputs_are_named():
    enc = make_inputs()
    batch = make_batch()
    with pytest.raises(DataError, match="hist_items"):
        enc(dataclasses.replace(batch, hist_items=batch.hist_items + 100))
    with pytest.raises(DataError, match="cand_dense"):
        enc(dataclasses.replace(batch, cand_dense=batch.cand_dense[..., :2]))
    with pytest.raises(DataError, match="user_dense"):
        enc(dataclasses.replace(batch, user_dense=batch.user_dense[..., :1]))
    with pytest.raises(DataError, match="ids"):
        enc(dataclasses.replace(batch, cand_sparse=batch.cand_sparse + 50))
    with pytest.raises(ConfigError, match="history_mode"):
        make_inputs(history_mode="lstm")
