"""Helpers of the retrieval tests."""

from __future__ import annotations

import polars as pl

from funnelrec.data.schema import LOG_COLUMNS

#: The small world the quality tests train on: 600 users, 4 days, the first 1,500 real videos.
SMALL_WORLD = "sim:small?num_users=600&days=4&catalog.num_items=1500"


def make_log(rows: list[tuple[int, int, int, int]]) -> pl.DataFrame:
    """A KuaiRand-schema log from ``(user_id, time_ms, video_id, is_click)`` rows (every other column 0)."""
    d = {c: [0] * len(rows) for c in LOG_COLUMNS}
    for j, (u, t, v, c) in enumerate(rows):
        d["user_id"][j], d["time_ms"][j], d["video_id"][j], d["is_click"][j] = u, t, v, c
        d["date"][j], d["hourmin"][j] = 20220408, 1200
    return pl.DataFrame(d).cast(LOG_COLUMNS)
