"""The KuaiRand log schema and the side-table schemas, shared by the simulator, the loaders and the datasets.

Simulated logs are written in exactly this schema and read back through the KuaiRand loader, so every trainer that
reads simulated logs also reads the real KuaiRand files unchanged. Column names and meanings are KuaiRand's
(Gao et al., CIKM 2022); dtypes are the ones funnelrec normalises to on load.

Example:
    >>> LOG_COLUMNS["time_ms"]
    Int64
    >>> long_view_rule(play_time_ms=20_000, duration_ms=60_000)
    True
"""

from __future__ import annotations

import numpy as np
import polars as pl

#: Epoch milliseconds of 2022-04-08 00:00 UTC+8 (the first day of the KuaiRand logs, Beijing time).
KUAIRAND_START_MS = 1_649_347_200_000
#: Milliseconds per day.
DAY_MS = 86_400_000

#: The KuaiRand interaction-log columns, in file order, with the dtype funnelrec normalises them to.
LOG_COLUMNS: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "video_id": pl.Int64,
    "date": pl.Int64,  # YYYYMMDD
    "hourmin": pl.Int64,  # HHMM
    "time_ms": pl.Int64,  # epoch milliseconds of the request
    "is_click": pl.Int8,
    "is_like": pl.Int8,
    "is_follow": pl.Int8,
    "is_comment": pl.Int8,
    "is_forward": pl.Int8,
    "is_hate": pl.Int8,
    "long_view": pl.Int8,
    "play_time_ms": pl.Int64,
    "duration_ms": pl.Int64,
    "profile_stay_time": pl.Int64,
    "comment_stay_time": pl.Int64,
    "is_profile_enter": pl.Int8,
    "is_rand": pl.Int8,
    "tab": pl.Int8,
}

#: Binary label columns of the log, in the order of the objective registry's classification tasks.
LABEL_COLUMNS: tuple[str, ...] = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")
#: Every binary column of the log (values must be 0 or 1).
BINARY_COLUMNS: tuple[str, ...] = (
    "is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter", "is_rand",
)
#: Columns that must be non-negative.
NONNEGATIVE_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "time_ms", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time", "tab",
)
#: The number of KuaiRand tabs (scenarios): tab ∈ [0, NUM_TABS).
NUM_TABS = 15

#: User-feature columns (user_features_{pure,1k,27k}.csv), with normalised dtypes.
USER_FEATURE_COLUMNS: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "user_active_degree": pl.String,
    "is_lowactive_period": pl.Int64,
    "is_live_streamer": pl.Int64,
    "is_video_author": pl.Int64,
    "follow_user_num": pl.Int64,
    "follow_user_num_range": pl.String,
    "fans_user_num": pl.Int64,
    "fans_user_num_range": pl.String,
    "friend_user_num": pl.Int64,
    "friend_user_num_range": pl.String,
    "register_days": pl.Int64,
    "register_days_range": pl.String,
    **{f"onehot_feat{i}": (pl.Float64 if i == 4 or i >= 12 else pl.Int64) for i in range(18)},
}

#: Video-feature columns (video_features_basic_{pure,1k,27k}.csv), with normalised dtypes.
VIDEO_FEATURE_COLUMNS: dict[str, pl.DataType] = {
    "video_id": pl.Int64,
    "author_id": pl.Int64,
    "video_type": pl.String,
    "upload_dt": pl.String,
    "upload_type": pl.String,
    "visible_status": pl.Float64,
    "video_duration": pl.Float64,
    "server_width": pl.Float64,
    "server_height": pl.Float64,
    "music_id": pl.Int64,
    "music_type": pl.Float64,
    "tag": pl.String,
}

#: KuaiRand's ``user_active_degree`` categories, most active first.
ACTIVE_DEGREES: tuple[str, ...] = (
    "full_active", "high_active", "middle_active", "low_active", "single_low_active",
    "2_14_day_new", "30day_retention", "day_new", "UNKNOWN",
)

#: long_view / valid-play thresholds of KuaiRand (ms).
LONG_VIEW_THRESHOLD_MS = 18_000
VALID_PLAY_THRESHOLD_MS = 7_000


def long_view_rule(play_time_ms, duration_ms, threshold_ms: int = LONG_VIEW_THRESHOLD_MS):
    """KuaiRand's long_view rule: play ≥ duration when duration ≤ 18 s, otherwise play ≥ 18 s.

    Works on scalars, numpy arrays and torch tensors (elementwise).
    """
    need = np.minimum(duration_ms, threshold_ms) if not hasattr(duration_ms, "clamp") else duration_ms.clamp(
        max=threshold_ms)
    return play_time_ms >= need


def empty_log() -> pl.DataFrame:
    """An empty log frame with the KuaiRand schema."""
    return pl.DataFrame(schema=LOG_COLUMNS)
