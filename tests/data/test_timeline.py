import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.data.schema import LOG_COLUMNS
from funnelrec.data.timeline import Timelines
from funnelrec.errors import DataError


def random_log(seed: int, rows: int = 400, users: int = 12, videos: int = 30, times: int = 40) -> pl.DataFrame:
    """A KuaiRand-schema log with many ties in time_ms (pages) and unsorted rows."""
    rng = np.random.default_rng(seed)
    d = {
        "user_id": rng.integers(0, users, rows) * 3,  # sparse user ids
        "video_id": rng.integers(0, videos, rows),
        "date": np.full(rows, 20220408),
        "hourmin": np.zeros(rows, dtype=np.int64),
        "time_ms": 1_649_347_200_000 + rng.integers(0, times, rows) * 1000,
    }
    for c in LOG_COLUMNS:
        if LOG_COLUMNS[c] == pl.Int8:
            d[c] = rng.integers(0, 2, rows)
        elif c not in d:
            d[c] = rng.integers(0, 60_000, rows)
    return pl.DataFrame(d).select([pl.col(c).cast(t) for c, t in LOG_COLUMNS.items()])


def reference_history(log: pl.DataFrame, user: int, t: int, n: int):
    """Loop reference: the user's events strictly before t, in (time, row) order, the last n, left-padded."""
    rows = [r for r in log.with_row_index("row").iter_rows(named=True) if r["user_id"] == user and r["time_ms"] < t]
    rows.sort(key=lambda r: (r["time_ms"], r["row"]))
    rows = rows[len(rows) - min(n, len(rows)):]
    k = len(rows)
    items = [0] * (n - k) + [r["video_id"] + 1 for r in rows]
    acts = [[0.0] * len(ACTION_COLUMNS)] * (n - k) + [[float(r[c]) for c in ACTION_COLUMNS] for r in rows]
    gaps = [0.0] * (n - k) + [(t - r["time_ms"]) / 1000.0 for r in rows]
    return items, acts, gaps, k


def _queries(log: pl.DataFrame, rng, b: int):
    users = np.r_[log["user_id"].unique().to_numpy(), 1, 10_000]  # + unknown users
    times = np.r_[log["time_ms"].unique().to_numpy(), log["time_ms"].min() - 5, log["time_ms"].max() + 5,
                  log["time_ms"].to_numpy()[:5] + 1]
    return rng.choice(users, b), rng.choice(times, b)


@pytest.mark.parametrize("n", [0, 1, 5, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_history_matches_reference(seed, n):
    log = random_log(seed)
    tl = Timelines.from_log(log)
    rng = np.random.default_rng(seed + 100)
    u, t = _queries(log, rng, 60)
    items, acts, gaps, lens = tl.history(u, t, n)
    assert items.shape == (60, n) and acts.shape == (60, n, 7) and gaps.shape == (60, n) and lens.shape == (60,)
    assert items.dtype == torch.int64 and acts.dtype == torch.float32 and gaps.dtype == torch.float32
    assert lens.dtype == torch.int64
    for i in range(60):
        ri, ra, rg, rk = reference_history(log, int(u[i]), int(t[i]), n)
        assert items[i].tolist() == ri
        assert acts[i].tolist() == ra
        np.testing.assert_allclose(gaps[i].numpy(), rg, rtol=1e-6)
        assert int(lens[i]) == rk


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 20))
def test_history_property(seed, n):
    log = random_log(seed, rows=80, users=4, videos=10, times=8)
    tl = Timelines.from_log(log)
    u, t = _queries(log, np.random.default_rng(seed), 12)
    h = tl.history(torch.as_tensor(u), torch.as_tensor(t), n)
    for i in range(12):
        ri, _, rg, rk = reference_history(log, int(u[i]), int(t[i]), n)
        assert h.items[i].tolist() == ri and int(h.length[i]) == rk
    valid = torch.arange(n).unsqueeze(0) >= (n - h.length).unsqueeze(1)
    assert (h.gap_s[valid] > 0).all() and (h.gap_s[~valid] == 0).all() and (h.items[~valid] == 0).all()


def test_same_millisecond_events_are_excluded():
    log = pl.DataFrame({"user_id": [1, 1, 1, 1], "video_id": [10, 11, 12, 13],
                        "time_ms": [100, 200, 200, 300], "is_click": [1, 0, 1, 1]})
    tl = Timelines.from_log(log, action_columns=("is_click",))
    h = tl.history([1, 1, 1, 1], [100, 200, 201, 300], 4)
    assert h.length.tolist() == [0, 1, 3, 3]
    # item index = video_id + 1; the two events at t=200 keep their log order
    assert h.items.tolist() == [[0, 0, 0, 0], [0, 0, 0, 11], [0, 11, 12, 13], [0, 11, 12, 13]]
    assert h.actions[2, :, 0].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(h.gap_s[2].numpy(), [0.0, 0.101, 0.001, 0.001], rtol=1e-6)


def test_events_stored_once_sorted_csr():
    log = random_log(3)
    tl = Timelines.from_log(log)
    assert tl.num_events == log.height and tl.num_users == log["user_id"].n_unique()
    assert tl.action_columns == ACTION_COLUMNS and tl.actions.shape == (log.height, 7)
    assert (np.diff(tl.users) > 0).all() and tl.offsets[0] == 0 and tl.offsets[-1] == log.height
    for r, u in enumerate(tl.users[:5]):
        sl = tl.user_events(int(u))
        t = tl.time_ms[sl]
        assert (np.diff(t) >= 0).all()
        ref = log.with_row_index("row").filter(pl.col("user_id") == u).sort(["time_ms", "row"])
        assert tl.items[sl].tolist() == (ref["video_id"] + 1).to_list()
        np.testing.assert_allclose(tl.play_s[sl].numpy(), ref["play_time_ms"].to_numpy() / 1000, rtol=1e-6)
    assert tl.user_events(999_999) == slice(0, 0)


def test_empty_and_bad_input():
    empty = random_log(0).clear()
    tl = Timelines.from_log(empty)
    h = tl.history([1, 2], [5, 6], 3)
    assert h.items.shape == (2, 3) and h.length.tolist() == [0, 0]
    with pytest.raises(DataError) as e:
        Timelines.from_log(random_log(0).drop("is_hate"))
    assert e.value.column == "is_hate"
    with pytest.raises(DataError):
        Timelines.from_log(random_log(0)).history([1, 2], [3], 4)
    with pytest.raises(DataError):
        Timelines.from_log(random_log(0)).history([1], [3], -1)
