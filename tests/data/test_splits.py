import numpy as np
import polars as pl
import pytest

from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, LOG_COLUMNS
from funnelrec.data.splits import leave_last_out, split_by_day
from funnelrec.errors import DataError


def day_log(days: int = 5, rows_per_day: int = 30, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = days * rows_per_day
    day = np.repeat(np.arange(days), rows_per_day)
    rng.shuffle(day)  # rows are not sorted by date
    t = KUAIRAND_START_MS + day * DAY_MS + rng.integers(0, DAY_MS, n)
    d = {"user_id": rng.integers(0, 5, n), "video_id": rng.integers(0, 20, n), "date": 20220408 + day,
         "hourmin": np.zeros(n, dtype=np.int64), "time_ms": t}
    for c, dt in LOG_COLUMNS.items():
        if c not in d:
            d[c] = rng.integers(0, 2, n) if dt == pl.Int8 else rng.integers(0, 1000, n)
    return pl.DataFrame(d).select([pl.col(c).cast(dt) for c, dt in LOG_COLUMNS.items()])


def test_split_by_day_default():
    log = day_log()
    s = split_by_day(log)
    assert set(s) == {"train", "valid", "test"}
    assert s["test"]["date"].unique().to_list() == [20220412]
    assert s["valid"]["date"].unique().to_list() == [20220411]
    assert sorted(s["train"]["date"].unique().to_list()) == [20220408, 20220409, 20220410]
    assert sum(f.height for f in s.values()) == log.height
    # original row order is kept inside each split
    expected = log.filter(pl.col("date") <= 20220410)
    assert s["train"].equals(expected)
    assert s["train"].schema == log.schema


def test_split_by_day_configured():
    log = day_log()
    s = split_by_day(log, valid_days=2, test_days=2)
    assert sorted(s["valid"]["date"].unique().to_list()) == [20220409, 20220410]
    assert sorted(s["test"]["date"].unique().to_list()) == [20220411, 20220412]
    assert s["train"]["date"].unique().to_list() == [20220408]
    s0 = split_by_day(log, valid_days=0, test_days=1)
    assert s0["valid"].height == 0 and s0["valid"].schema == log.schema
    assert s0["train"].height + s0["test"].height == log.height


def test_split_by_day_errors():
    log = day_log(days=2)
    with pytest.raises(DataError) as e:
        split_by_day(log)  # 2 dates cannot hold train + valid + test
    assert "train" in str(e.value) and "20220408..20220409" in str(e.value)
    with pytest.raises(DataError, match="empty log"):
        split_by_day(log.clear())
    with pytest.raises(DataError) as e:
        split_by_day(log.drop("date"))
    assert e.value.column == "date"
    with pytest.raises(DataError):
        split_by_day(log, valid_days=-1)


def test_leave_last_out():
    # user 1: 4 positives; user 2: 2 positives (train only); user 3: 3 positives with a tie in time
    log = pl.DataFrame({
        "user_id": [1, 1, 2, 1, 1, 1, 2, 3, 3, 3, 2, 1],
        "time_ms": [10, 20, 15, 30, 40, 50, 25, 5, 7, 7, 35, 60],
        "is_click": [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0],
        "date": [20220408] * 12,
    }).with_columns(pl.int_range(pl.len()).alias("tag"))
    s = leave_last_out(log)
    assert s["test"]["tag"].to_list() == [5, 9]  # user 1's last positive (t=50); user 3's later row of the tie
    assert s["valid"]["tag"].to_list() == [4, 8]
    assert s["train"]["tag"].to_list() == [0, 1, 2, 3, 6, 7, 10, 11]
    assert s["train"].columns == log.columns
    s_like = leave_last_out(log.with_columns(pl.col("is_click").alias("is_like")), positive="is_like")
    assert s_like["test"]["tag"].to_list() == [5, 9]


def test_leave_last_out_errors():
    log = pl.DataFrame({"user_id": [1, 1, 2], "time_ms": [1, 2, 3], "is_click": [1, 1, 1], "date": [20220408] * 3})
    with pytest.raises(DataError) as e:
        leave_last_out(log)
    assert "'valid'" in str(e.value) and "20220408" in str(e.value)
    with pytest.raises(DataError) as e:
        leave_last_out(log, positive="is_like")
    assert e.value.column == "is_like"
    with pytest.raises(DataError, match="empty"):
        leave_last_out(log.clear())


def test_split_by_time_keeps_requests_whole_and_rejects_bad_fractions():
    from funnelrec.data.splits import split_by_time

    log = pl.DataFrame({"time_ms": [1, 1, 2, 3, 3, 3, 4, 5, 6, 7], "user_id": [0] * 10})
    parts = split_by_time(log, 0.2, 0.3)
    assert sum(p.height for p in parts.values()) == 10
    assert parts["train"]["time_ms"].max() < parts["valid"]["time_ms"].min()
    assert parts["valid"]["time_ms"].max() < parts["test"]["time_ms"].min()
    with pytest.raises(DataError, match="valid_frac"):
        split_by_time(log, -0.1, 0.1)
    with pytest.raises(DataError, match="must be < 1"):
        split_by_time(log, 0.6, 0.5)
    with pytest.raises(DataError, match="time_ms"):
        split_by_time(log.drop("time_ms"), 0.1, 0.1)
