"""RealtimeHistory: base + real-time merge vs a brute-force reference, versions, bounds, thread safety."""

import threading

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnelrec.errors import ConfigError, DataError
from funnelrec.serving.realtime import RealtimeHistory
from funnelrec.serving.schemas import ACTION_FIELDS, FeedbackEvent

A = len(ACTION_FIELDS)


def _reference(base, appended, user, max_len, before_ms=None):
    """The user's events (base, then appended in arrival order) stably sorted by time; the newest max_len."""
    rows = [r for r in base if r[0] == user] + [r for r in appended if r[0] == user]
    rows = sorted(rows, key=lambda r: r[2])  # stable
    if before_ms is not None:
        rows = [r for r in rows if r[2] < before_ms]
    rows = rows[max(0, len(rows) - max_len):] if max_len else []
    return [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


def _rows(rng, n, users, t_max):
    return [(int(rng.integers(users)), int(rng.integers(100)), int(rng.integers(t_max)),
             tuple(int(x) for x in rng.integers(0, 2, A))) for _ in range(n)]


def _build(base, **kw):
    if not base:
        return RealtimeHistory(**kw)
    u, i, t, a = zip(*base)
    return RealtimeHistory.from_arrays(u, i, t, np.array(a, np.int8), **kw)


def _append(rt, rows):
    if rows:
        u, i, t, a = zip(*rows)
        rt.append_arrays(u, i, t, np.array(a, np.int8))


def _check(rt, base, appended, users, max_len, before_ms=None):
    for user in range(users + 1):  # users+1 is never seen
        h = rt.history(user, max_len, before_ms=before_ms)
        items, times, acts = _reference(base, appended, user, max_len, before_ms)
        assert h.item_ids.tolist() == items and h.time_ms.tolist() == times
        assert [tuple(r) for r in h.actions.tolist()] == acts
        assert h.item_ids.dtype == np.int64 and h.actions.dtype == np.int8
        assert h.actions.shape == (len(items), A)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_base=st.integers(0, 40), n_batches=st.integers(0, 4),
       max_len=st.integers(0, 12), before=st.one_of(st.none(), st.integers(0, 60)))
def test_history_matches_reference(seed, n_base, n_batches, max_len, before):
    rng = np.random.default_rng(seed)
    users = 4
    base = _rows(rng, n_base, users, 50)
    rt = _build(base, max_recent=1000)
    appended = []
    for _ in range(n_batches):  # times overlap the base's, so out-of-order merges happen
        batch = _rows(rng, int(rng.integers(1, 8)), users, 60)
        _append(rt, batch)
        appended += batch
    _check(rt, base, appended, users, max_len, before)
    assert len(rt) == n_base + len(appended)


def test_versions_bump_per_touched_user_and_known_user():
    rt = RealtimeHistory.from_arrays([1, 1], [10, 11], [5, 6])
    assert rt.version(1) == 0 and rt.version(2) == 0
    assert rt.known_user(1) and not rt.known_user(2)
    rt.append_arrays([2, 2, 3], [1, 2, 3], [7, 8, 9])
    assert (rt.version(1), rt.version(2), rt.version(3)) == (0, 1, 1)
    assert rt.known_user(2)
    rt.append_arrays([2], [4], [10])
    assert rt.version(2) == 2
    assert rt.history(2, 10).item_ids.tolist() == [1, 2, 4]
    assert rt.history(99, 10).item_ids.tolist() == []


def test_max_recent_bounds_the_buffer_not_the_base():
    rt = RealtimeHistory.from_arrays([1] * 3, [0, 1, 2], [0, 1, 2], max_recent=4)
    rt.append_arrays([1] * 10, list(range(100, 110)), list(range(10, 20)))
    h = rt.history(1, 100)
    assert h.item_ids.tolist() == [0, 1, 2, 106, 107, 108, 109]
    assert len(rt) == 3 + 4


def test_append_feedback_events_and_ties():
    rt = RealtimeHistory.from_arrays([7], [1], [100])
    events = [FeedbackEvent(event_id=f"e{i}", user_id=7, item_id=10 + i, time_ms=100, is_like=i % 2)
              for i in range(3)]
    rt.append(events)
    h = rt.history(7, 10)
    assert h.item_ids.tolist() == [1, 10, 11, 12]  # equal times: base first, then arrival order
    assert h.actions[:, ACTION_FIELDS.index("is_like")].tolist() == [0, 0, 1, 0]
    assert rt.history(7, 10, before_ms=100).item_ids.tolist() == []


def test_from_log_reads_kuairand_columns():
    log = pl.DataFrame({"user_id": [3, 3, 4], "video_id": [9, 8, 7], "time_ms": [20, 10, 5],
                        "is_click": [1, 0, 1], "long_view": [None, 1, 0]})
    rt = RealtimeHistory.from_log(log)
    h = rt.history(3, 10)
    assert h.item_ids.tolist() == [8, 9]
    assert h.actions[:, 0].tolist() == [0, 1] and h.actions[:, 1].tolist() == [1, 0]
    with pytest.raises(DataError, match="video_id"):
        RealtimeHistory.from_log(log.drop("video_id"))


def test_bad_inputs_name_the_field():
    with pytest.raises(DataError, match="actions"):
        RealtimeHistory.from_arrays([1], [2], [3], actions=np.full((1, A), 2))
    with pytest.raises(DataError, match="actions"):
        RealtimeHistory.from_arrays([1], [2], [3], actions=np.zeros((1, A + 1)))
    with pytest.raises(DataError, match="user_id"):
        RealtimeHistory([2, 1], [0, 1, 2], [5, 6], [1, 2], np.zeros((2, A), np.int8))
    with pytest.raises(DataError, match="time_ms"):
        RealtimeHistory([1], [0, 2], [5, 6], [2, 1], np.zeros((2, A), np.int8))
    with pytest.raises(DataError, match="item_id"):
        RealtimeHistory().append_arrays([1, 2], [3], [4, 5])
    with pytest.raises(ConfigError, match="max_recent"):
        RealtimeHistory(max_recent=0)
    with pytest.raises(ConfigError, match="max_len"):
        RealtimeHistory().history(1, -1)


def test_concurrent_appends_and_reads():
    rt = RealtimeHistory(max_recent=10_000)
    errors = []

    def writer(k):
        for j in range(200):
            rt.append_arrays([k % 3], [k * 1000 + j], [j])

    def reader():
        try:
            for _ in range(300):
                for u in range(3):
                    h = rt.history(u, 50)
                    assert np.all(np.diff(h.time_ms) >= 0)
        except AssertionError as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(rt) == 1200
    assert sum(rt.version(u) for u in range(3)) == 1200
    assert sorted(rt.history(0, 10_000).item_ids.tolist()) == sorted(
        k * 1000 + j for k in range(6) if k % 3 == 0 for j in range(200))
