"""Train / valid / test splits of a KuaiRand-schema log.

* ``split_by_day``: temporal split on the ``date`` column (YYYYMMDD): the last ``test_days`` distinct dates are
  test, the ``valid_days`` before them valid, everything earlier train. Use it for ranking.
* ``split_by_time``: global temporal split on ``time_ms`` at the quantiles ``1 - valid_frac - test_frac`` and
  ``1 - test_frac`` of the rows; a request (``user_id, time_ms``) never straddles a cut. Use it for ranking on data
  whose days are not a natural unit (MovieLens ratings span years).
* ``leave_last_out``: per-user split for sequential retrieval: each user's last positive interaction (by
  ``time_ms``, then row order) is test, the second to last positive is valid, every other row of the user (earlier
  positives and all non-positive rows) is train. Users with fewer than 3 positives stay train-only.

Both keep the rows of each split in their original log order, and raise ``DataError`` naming the split and the date
range when a split that should hold rows is empty.

Example:
    >>> import polars as pl
    >>> log = pl.DataFrame({"date": [20220408, 20220409, 20220410], "user_id": [1, 1, 1]})
    >>> {k: v.height for k, v in split_by_day(log).items()}
    {'train': 1, 'valid': 1, 'test': 1}
"""

from __future__ import annotations

import polars as pl

from funnelrec.errors import DataError

_ROW = "__row"


def _check_frame(log_df, columns: tuple[str, ...]) -> None:
    if not isinstance(log_df, pl.DataFrame):
        raise DataError(f"expected a polars DataFrame, got {type(log_df).__name__}", path="log")
    for c in columns:
        if c not in log_df.columns:
            raise DataError("missing column needed by the split", path="log", column=c)
    if log_df.height == 0:
        raise DataError("empty log: nothing to split", path="log")


def _range(dates: list[int]) -> str:
    return f"{dates[0]}..{dates[-1]}" if dates else "(no dates)"


def split_by_day(log_df: pl.DataFrame, valid_days: int = 1, test_days: int = 1) -> dict[str, pl.DataFrame]:
    """``{"train", "valid", "test"}`` frames split on the distinct values of ``date`` (see the module doc).

    ``valid_days`` / ``test_days`` may be 0 (that split is then an empty frame); the train split must never be
    empty.
    """
    if valid_days < 0 or test_days < 0:
        raise DataError(f"valid_days and test_days must be >= 0, got {valid_days} and {test_days}", column="date")
    _check_frame(log_df, ("date",))
    if log_df.get_column("date").null_count():
        raise DataError("null dates", path="log", column="date")
    dates = log_df.get_column("date").unique().sort().to_list()
    n_test = min(test_days, len(dates))
    n_valid = min(valid_days, len(dates) - n_test)
    test_dates = dates[len(dates) - n_test:]
    valid_dates = dates[len(dates) - n_test - n_valid: len(dates) - n_test]
    train_dates = dates[: len(dates) - n_test - n_valid]
    want = {"train": (train_dates, 1), "valid": (valid_dates, valid_days), "test": (test_dates, test_days)}
    for name, (ds, asked) in want.items():
        if asked > 0 and len(ds) < asked:
            raise DataError(
                f"split {name!r} is empty or short: the log has {len(dates)} distinct dates ({_range(dates)}), "
                f"asked for {valid_days} valid + {test_days} test days and at least 1 train day", path="log",
                column="date")
    date = pl.col("date")
    return {
        "train": log_df.filter(date.is_in(train_dates)),
        "valid": log_df.filter(date.is_in(valid_dates)) if valid_dates else log_df.clear(),
        "test": log_df.filter(date.is_in(test_dates)) if test_dates else log_df.clear(),
    }


def split_by_time(log_df: pl.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.1) -> dict[str, pl.DataFrame]:
    """``{"train", "valid", "test"}`` frames cut on ``time_ms`` so that about ``valid_frac`` / ``test_frac`` of the
    rows fall in valid / test (the last in time); rows at the same ``time_ms`` stay in one split.

    Example:
        >>> log = pl.DataFrame({"time_ms": list(range(10)), "user_id": [0] * 10})
        >>> {k: v.height for k, v in split_by_time(log, 0.2, 0.2).items()}
        {'train': 6, 'valid': 2, 'test': 2}
    """
    for name, frac in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {frac}", column="time_ms")
    if valid_frac + test_frac >= 1.0:
        raise DataError(f"valid_frac + test_frac must be < 1, got {valid_frac} + {test_frac}", column="time_ms")
    _check_frame(log_df, ("time_ms",))
    times = log_df.get_column("time_ms")
    if times.null_count():
        raise DataError("null timestamps", path="log", column="time_ms")
    ordered = times.sort()
    n = len(ordered)

    def cut(frac: float) -> int:  # the first timestamp of the later split (rows at it move there whole)
        k = min(n - 1, max(0, int(round(n * (1.0 - frac)))))
        return int(ordered[k]) if frac > 0 else int(ordered[-1]) + 1

    test_from, valid_from = cut(test_frac), cut(valid_frac + test_frac)
    t = pl.col("time_ms")
    parts = {"train": log_df.filter(t < valid_from), "valid": log_df.filter((t >= valid_from) & (t < test_from)),
             "test": log_df.filter(t >= test_from)}
    for name, frac in (("train", 1.0), ("valid", valid_frac), ("test", test_frac)):
        if frac > 0 and parts[name].height == 0:
            raise DataError(f"split {name!r} is empty: {n} rows cannot be cut at valid_frac={valid_frac}, "
                            f"test_frac={test_frac}", path="log", column="time_ms")
    return parts


def leave_last_out(log_df: pl.DataFrame, positive: str = "is_click") -> dict[str, pl.DataFrame]:
    """``{"train", "valid", "test"}`` per-user leave-last-out split on the ``positive`` column (see the module doc)."""
    _check_frame(log_df, ("user_id", "time_ms", positive))
    df = log_df.with_row_index(_ROW)
    pos = (df.filter(pl.col(positive).fill_null(0) > 0)
           .select(_ROW, "user_id", "time_ms")
           .sort(["user_id", "time_ms", _ROW])
           .with_columns(
               n=pl.len().over("user_id"),
               back=(pl.len() - pl.int_range(pl.len())).over("user_id"),  # 1 = the user's last positive
           )
           .filter(pl.col("n") >= 3))
    test_rows = pos.filter(pl.col("back") == 1).get_column(_ROW)
    valid_rows = pos.filter(pl.col("back") == 2).get_column(_ROW)
    held = pl.concat([test_rows, valid_rows])
    out = {
        "train": df.filter(~pl.col(_ROW).is_in(held.implode())).drop(_ROW),
        "valid": df.filter(pl.col(_ROW).is_in(valid_rows.implode())).drop(_ROW),
        "test": df.filter(pl.col(_ROW).is_in(test_rows.implode())).drop(_ROW),
    }
    for name, frame in out.items():
        if frame.height == 0:
            t = log_df.get_column("time_ms")
            span = (f" (dates {log_df.get_column('date').min()}..{log_df.get_column('date').max()})"
                    if "date" in log_df.columns else f" (time_ms {t.min()}..{t.max()})")
            raise DataError(f"split {name!r} is empty: no user has at least 3 rows with {positive} > 0{span}"
                            if name != "train" else f"split {name!r} is empty{span}", path="log", column=positive)
    return out
