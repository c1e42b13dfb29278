"""Leave-last-out retrieval data on a hand-made log: targets, strictly-before histories, exclusion, windows."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from funnelrec.data.features import FeatureField, FeatureSpec
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval import RetrievalData
from retrieval_testkit import make_log

# (user, time_ms, video, is_click). Item index = video + 1.
ROWS = [
    # user 1: clicks 5 @10, 7 @20, 8 @20 (same page), 5 again @30 (a repeat), 9 @40; non-clicks in between
    (1, 10, 5, 1), (1, 10, 6, 0), (1, 20, 7, 1), (1, 20, 8, 1), (1, 30, 5, 1), (1, 40, 9, 1), (1, 50, 3, 0),
    # user 2: two clicks only -> train-only
    (2, 15, 1, 1), (2, 25, 2, 1), (2, 35, 4, 0),
    # user 3: three clicks on one page -> valid/test with an empty history
    (3, 60, 10, 1), (3, 60, 11, 1), (3, 60, 0, 1),
]


def _spec() -> FeatureSpec:
    return FeatureSpec(user_sparse=[FeatureField("user_id", encoding="id")], user_dense=[],
                       item_sparse=[FeatureField("video_id", encoding="id")], item_dense=[])


def _data(dedupe: bool = True, max_len: int = 5, rows=ROWS) -> RetrievalData:
    users = pl.DataFrame({"user_id": [1, 2, 3]})
    videos = pl.DataFrame({"video_id": list(range(12))})
    return RetrievalData.from_log(make_log(rows), users, videos, _spec(), max_len=max_len, dedupe=dedupe)


def _rows(data: RetrievalData, split: str):
    b = data.batch(split, torch.arange(data.num_examples(split)))
    hist = [h[m].tolist() for h, m in zip(b.hist_items, b.history_mask())]
    return b, dict(zip(b.user_id.tolist(), zip(b.cand_items[:, 0].tolist(), hist)))


def test_targets_and_strictly_before_histories():
    data = _data()
    assert data.num_items == 13
    _, test = _rows(data, "test")
    _, valid = _rows(data, "valid")
    # user 1 (deduplicated positives 5@10, 7@20, 8@20, 9@40): test = 9, valid = 8 (last by row on the page)
    assert test[1] == (10, [6, 8, 9])  # history strictly before 40: 5, 7, 8 (item indices)
    assert valid[1] == (9, [6])  # strictly before 20: the same-page click 7 is not history
    # user 3: all three clicks on one page -> empty histories; user 2 has only 2 positives -> train only
    assert test[3] == (1, []) and valid[3] == (12, [])
    assert 2 not in test and 2 not in valid
    # train positives: every earlier positive, each with its own strictly-before history
    b, _ = _rows(data, "train")
    got = sorted((u, t, c, tuple(h[m].tolist())) for u, t, c, h, m in zip(
        b.user_id.tolist(), b.request_time_ms.tolist(), b.cand_items[:, 0].tolist(), b.hist_items, b.history_mask()))
    assert got == [(1, 10, 6, ()), (1, 20, 8, (6,)), (2, 15, 2, ()), (2, 25, 3, (2,)), (3, 60, 11, ())]
    assert data.item_popularity().tolist() == [0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0]


def test_batch_layout_is_a_valid_request_batch():
    data = _data(max_len=2)
    b, _ = _rows(data, "test")
    b.validate()
    assert b.hist_items.shape == (2, 2) and b.cand_items.shape == (2, 1)
    assert b.hist_items[b.user_id == 1].tolist() == [[8, 9]]  # the 2 most recent, left-padded convention
    assert b.hist_len.tolist() == [2, 0]
    assert (b.labels == 1).all() and b.cand_sparse[:, 0, 0].tolist() == b.cand_items[:, 0].tolist()
    assert b.hist_actions.shape == (2, 2, 7) and (b.hist_actions[b.history_mask()][:, 0] == 1).all()
    assert (b.hist_gap_s[b.history_mask()] > 0).all()


def test_exclusion_mask_covers_the_whole_history():
    data = _data(max_len=1)  # the batch shows 1 history item, exclusion covers all of them
    b, _ = _rows(data, "test")
    mask = data.exclude_mask(b)
    assert mask.shape == (2, 13) and mask.dtype == torch.bool
    row = (b.user_id == 1).nonzero().item()
    assert mask[row].nonzero().squeeze(1).tolist() == [6, 8, 9]
    assert not mask[1 - row].any()  # empty history
    assert not mask[:, 0].any()


def test_without_dedupe_a_repeat_target_is_excluded():
    data = _data(dedupe=False)
    _, valid = _rows(data, "valid")
    assert valid[1] == (6, [6, 8, 9])  # valid target = the repeat click of video 5 @30
    b, _ = _rows(data, "valid")
    row = (b.user_id == 1).nonzero().item()
    assert data.exclude_mask(b)[row, 6]  # the target itself is history: unreachable (a miss in evaluation)


def test_sequence_windows_cover_every_transition_once():
    # one user with 7 positives: train sequence = the first 5 (items 1..5), valid 6, test 7
    rows = [(1, 10 * (j + 1), j, 1) for j in range(7)]
    data = _data(max_len=2, rows=rows)
    assert data.num_windows() == 2
    b = data.sequence_batch(torch.arange(2))
    b.validate()
    inp, tgt = b.hist_items.tolist(), b.extras["seq_targets"].tolist()
    assert sorted(zip(map(tuple, inp), map(tuple, tgt))) == [((1, 2), (2, 3)), ((3, 4), (4, 5))]
    pairs = {(i, t) for r_i, r_t in zip(inp, tgt) for i, t in zip(r_i, r_t) if i}
    assert pairs == {(1, 2), (2, 3), (3, 4), (4, 5)}
    # shorter windows are left-padded, inputs and targets aligned
    data = _data(max_len=6, rows=rows)
    b = data.sequence_batch([0])
    assert b.hist_items.tolist() == [[0, 0, 1, 2, 3, 4]] and b.extras["seq_targets"].tolist() == [[0, 0, 2, 3, 4, 5]]
    assert b.hist_len.tolist() == [4] and b.cand_items.tolist() == [[5]]
    n = sum(bb.batch_size for bb in data.batches("train", 1, mode="sequence", shuffle=True))
    assert n == data.num_windows() == 1


def test_every_row_counts_without_a_positive_column():
    data = RetrievalData.from_log(make_log(ROWS).drop("is_click"), pl.DataFrame({"user_id": [1, 2, 3]}),
                                  pl.DataFrame({"video_id": list(range(12))}), _spec(), positive=None)
    _, test = _rows(data, "test")
    assert test[1][0] == 4  # the last row of user 1 (video 3, not a click) is the test target
    assert test[2][0] == 5


def test_errors():
    with pytest.raises(ConfigError, match="unknown split 'tset'"):
        _data().num_examples("tset")
    with pytest.raises(ConfigError, match="sequence"):
        next(_data().batches("test", 4, mode="sequence"))
    with pytest.raises(ConfigError, match="max_len"):
        _data(max_len=0)
    with pytest.raises(DataError, match="is_click"):
        RetrievalData.from_log(make_log(ROWS).drop("is_click"), pl.DataFrame({"user_id": [1, 2, 3]}),
                               pl.DataFrame({"video_id": list(range(12))}), _spec())
    with pytest.raises(DataError, match="no positive rows"):
        _data(rows=[(1, 1, 1, 0)])
    with pytest.raises(DataError, match="not in the users table"):
        RetrievalData.from_log(make_log(ROWS), pl.DataFrame({"user_id": [1, 2]}),
                               pl.DataFrame({"video_id": list(range(12))}), _spec())


def test_movielens_every_rating_is_an_interaction():
    from pathlib import Path

    from funnelrec.data.sources import load_source

    src = load_source(f"movielens:{Path(__file__).resolve().parents[1] / 'fixtures' / 'ml-1m'}")
    data = RetrievalData.from_source(src, max_len=10)
    last = (src.log.sort(["user_id", "time_ms"], maintain_order=True).group_by("user_id", maintain_order=True)
            .agg(pl.col("video_id").last(), pl.len().alias("n")).filter(pl.col("n") >= 3))
    b = data.batch("test", torch.arange(data.num_examples("test")))
    got = dict(zip(b.user_id.tolist(), b.cand_items[:, 0].tolist()))
    assert got == {u: v + 1 for u, v in zip(last["user_id"].to_list(), last["video_id"].to_list())}
    assert b.cand_sparse.shape[-1] == 4  # the MovieLens item fields
