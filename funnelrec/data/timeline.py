"""Per-user event timelines and leakage-free history slicing.

Every event of the log is stored **once**, sorted by ``(user_id, time_ms, original row order)``, in flat arrays with
per-user offsets (CSR): ``items [E]`` (item index = video_id + 1), ``actions [E, A]`` (int8 0/1 in the channels of
``funnelrec.data.objectives.ACTION_COLUMNS``: is_click, long_view, is_like, is_follow, is_comment, is_forward,
is_hate), ``time_ms [E]`` and ``play_s [E]``.

**The no-leakage rule**: the history of a request at ``request_time_ms`` holds exactly the user's events with
``time_ms < request_time_ms`` (strictly; rows at the same millisecond — the request's own page — are excluded).
Because of it, timelines can be built from the full log (train + valid + test): a target request never sees its
own or later feedback.

``history`` slices B requests at once with one global ``searchsorted`` on the composite key
``user_rank * span + (time_ms - t0)``; histories are left-padded (most recent event last, at position N-1).

Example:
    >>> import polars as pl
    >>> log = pl.DataFrame({"user_id": [7, 7, 7], "video_id": [3, 4, 5], "time_ms": [10, 20, 20],
    ...                     "is_click": [1, 0, 1]})
    >>> tl = Timelines.from_log(log, action_columns=("is_click",))
    >>> items, actions, gap_s, n = tl.history([7, 7], [20, 21], max_len=3)
    >>> items.tolist(), n.tolist()
    ([[0, 0, 4], [4, 5, 6]], [1, 3])
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.errors import DataError

_MAX_KEY = np.iinfo(np.int64).max // 2


class History(NamedTuple):
    """Left-padded histories of B requests (unpacks as a 4-tuple)."""

    items: Tensor  # [B, N] int64
    actions: Tensor  # [B, N, A] float32
    gap_s: Tensor  # [B, N] float32
    length: Tensor  # [B] int64


def _as_int64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(x, dtype=np.int64)


class Timelines:
    """Every user's events in CSR layout (see the module doc). Build with ``Timelines.from_log``."""

    def __init__(self, users: np.ndarray, offsets: np.ndarray, items: np.ndarray, actions: np.ndarray,
                 time_ms: np.ndarray, play_s: np.ndarray, action_columns: Sequence[str]):
        self.users = users.astype(np.int64)  # [U] sorted distinct user ids
        self.offsets = offsets.astype(np.int64)  # [U + 1]
        e = len(time_ms)
        # numpy storage with one extra all-zero event at index E that padding positions gather from; gathers use
        # np.take (single-threaded, so batch building does not depend on torch's intra-op thread pool)
        self._items = np.r_[items.astype(np.int64), 0]
        self._actions = np.concatenate([actions.astype(np.int8), np.zeros((1, actions.shape[1]), np.int8)])
        self._time = np.r_[time_ms.astype(np.int64), 0]
        self.time_ms = self._time[:-1]  # [E]
        self.play_s = torch.from_numpy(play_s.astype(np.float32))  # [E]
        self.action_columns = tuple(action_columns)
        # composite key: user rank * span + (time - t0), non-decreasing over the sorted events
        self.t0 = int(self.time_ms.min()) if e else 0
        t1 = int(self.time_ms.max()) if e else 0
        self.span = t1 - self.t0 + 2
        if len(self.users) * self.span > _MAX_KEY:
            raise DataError(f"time span of {self.span} ms over {len(self.users)} users overflows the int64 key",
                            path="log", column="time_ms")
        rank = np.repeat(np.arange(len(self.users), dtype=np.int64), np.diff(self.offsets))
        self.keys = rank * self.span + (self.time_ms - self.t0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_log(cls, log_df: pl.DataFrame, spec=None, action_columns: Sequence[str] | None = None) -> "Timelines":
        """Build from a log frame (columns ``user_id, video_id, time_ms``, the action columns, optionally
        ``play_time_ms``). ``spec`` (a fitted ``FeatureSpec``) maps video ids to item indices (0 outside its
        video-id range); without it the item index is ``video_id + 1``.
        """
        if not isinstance(log_df, pl.DataFrame):
            raise DataError(f"expected a polars DataFrame, got {type(log_df).__name__}", path="log")
        cols = tuple(ACTION_COLUMNS if action_columns is None else action_columns)
        for c in ("user_id", "video_id", "time_ms", *cols):
            if c not in log_df.columns:
                raise DataError("missing column needed by the timelines", path="log", column=c)
        for c in ("user_id", "video_id", "time_ms"):
            if log_df.get_column(c).null_count():
                raise DataError("null values", path="log", column=c)
        df = log_df.select(
            pl.col("user_id").cast(pl.Int64), pl.col("video_id").cast(pl.Int64), pl.col("time_ms").cast(pl.Int64),
            *[pl.col(c).fill_null(0).cast(pl.Int8).alias(f"__a{j}") for j, c in enumerate(cols)],
            (pl.col("play_time_ms").fill_null(0).cast(pl.Float64) / 1000.0 if "play_time_ms" in log_df.columns
             else pl.lit(0.0)).alias("__play"),
        )
        # stable sort keeps the original row order inside equal (user_id, time_ms)
        df = df.sort(["user_id", "time_ms"], maintain_order=True)
        uid = df.get_column("user_id").to_numpy()
        vid = df.get_column("video_id").to_numpy()
        if len(vid) and vid.min() < 0:
            raise DataError(f"negative video_id {int(vid.min())}", path="log", column="video_id")
        items = spec.item_index(vid) if spec is not None else vid + 1
        if len(uid):
            starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
            users = uid[starts]
            offsets = np.r_[starts, len(uid)]
        else:
            users, offsets = np.zeros(0, np.int64), np.zeros(1, np.int64)
        actions = (np.stack([df.get_column(f"__a{j}").to_numpy() for j in range(len(cols))], axis=1)
                   if cols else np.zeros((len(uid), 0), np.int8))
        return cls(users, offsets, items, actions, df.get_column("time_ms").to_numpy(),
                   df.get_column("__play").to_numpy(), cols)

    # ------------------------------------------------------------------ sizes
    @property
    def items(self) -> Tensor:
        """[E] int64 item index of every event."""
        return torch.from_numpy(self._items[:-1])

    @property
    def actions(self) -> Tensor:
        """[E, A] int8 action flags of every event (channels ``action_columns``)."""
        return torch.from_numpy(self._actions[:-1])

    @property
    def num_events(self) -> int:
        return int(len(self.time_ms))

    @property
    def num_users(self) -> int:
        return int(len(self.users))

    @property
    def num_actions(self) -> int:
        return len(self.action_columns)

    def user_events(self, user_id: int) -> slice:
        """The slice of the flat arrays holding ``user_id``'s events (empty if unknown)."""
        r = int(np.searchsorted(self.users, user_id))
        if r < len(self.users) and self.users[r] == user_id:
            return slice(int(self.offsets[r]), int(self.offsets[r + 1]))
        return slice(0, 0)

    # ------------------------------------------------------------------ slicing
    def bounds(self, user_ids, request_time_ms) -> tuple[np.ndarray, np.ndarray]:
        """For each request, ``(start, end)`` of the user's events strictly before the request time."""
        uid = _as_int64(user_ids).reshape(-1)
        t = _as_int64(request_time_ms).reshape(-1)
        if uid.shape != t.shape:
            raise DataError(f"user_ids {uid.shape} and request_time_ms {t.shape} differ in shape",
                            column="request_time_ms")
        if self.num_users == 0:
            z = np.zeros(len(uid), np.int64)
            return z, z
        r = np.searchsorted(self.users, uid)
        rc = np.minimum(r, self.num_users - 1)
        known = self.users[rc] == uid
        rel = np.clip(t - self.t0, 0, self.span - 1)
        end = np.searchsorted(self.keys, rc * self.span + rel, side="left")
        start = self.offsets[rc]
        end = np.where(known, end, start)
        return start, end

    def history(self, user_ids, request_time_ms, max_len: int) -> History:
        """Histories of B requests: ``(items [B,N], actions [B,N,A], gap_s [B,N], length [B])``.

        Holds the (at most ``max_len``) most recent events with ``time_ms < request_time_ms``, left-padded with
        0 (most recent at position N-1); ``gap_s`` = (request time - event time) / 1000 > 0 at valid positions.
        """
        if max_len < 0:
            raise DataError(f"history length must be >= 0, got {max_len}", column="hist_items")
        t = _as_int64(request_time_ms).reshape(-1)
        start, end = self.bounds(user_ids, t)
        b, n, a = len(t), int(max_len), self.num_actions
        length = np.minimum(end - start, n)
        pos = np.arange(n, dtype=np.int64)
        pad = (n - length)[:, None]
        valid = pos[None, :] >= pad  # [B, N]
        idx = (end - length)[:, None] + pos[None, :] - pad
        idx = np.where(valid, idx, self.num_events).reshape(-1)  # padding -> the zero event
        items = np.take(self._items, idx).reshape(b, n)
        actions = np.take(self._actions, idx, axis=0).reshape(b, n, a).astype(np.float32)
        gap = ((t[:, None] - np.take(self._time, idx).reshape(b, n)) * 0.001).astype(np.float32)
        gap[~valid] = 0.0
        return History(torch.from_numpy(items), torch.from_numpy(actions), torch.from_numpy(gap),
                       torch.from_numpy(length.astype(np.int64)))
