"""``LiveTimelines``: the users' histories at serving time — the logged timelines plus the feedback since.

The bundle carries each user's logged events (a ``Timelines``, the same object training slices histories from);
feedback arriving at the service is appended to a second, small ``Timelines`` of recent events, rebuilt lazily
(on the next read after an append; its cost grows with the recent events only). A request's history is the most
recent ``N`` events of both, strictly before the request time, merged on tensors for the whole batch
(:func:`merge_histories`) — no per-user Python loop.

Recent events are assumed to be newer than every logged event of the same user (the service starts where the
log ends); an event older than that is still kept, but sorted after the logged ones.

``version(user_id)`` counts the appends per user, so per-user caches (sequence K/V, result lists) can tell that a
user's history changed. :func:`events_frame` turns the service's ``FeedbackEvent``s into the frame ``append``
reads.

Thread safety: one lock guards the recent events; ``append`` and ``history`` may run concurrently.

All of this is ours (the serving papers assume a real-time feature store; this is its in-memory form).

Example:
    >>> import polars as pl
    >>> log = pl.DataFrame({"user_id": [1, 1], "video_id": [3, 4], "time_ms": [10, 20], "is_click": [1, 0]})
    >>> live = LiveTimelines(Timelines.from_log(log, action_columns=("is_click",)))
    >>> live.append(pl.DataFrame({"user_id": [1], "video_id": [9], "time_ms": [30], "is_click": [1]}))
    >>> h = live.history([1], [31], max_len=3)
    >>> h.items.tolist(), live.version(1)
    ([[4, 5, 10]], 1)
"""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.timeline import History, Timelines
from funnelrec.errors import DataError
from funnelrec.serving.schemas import ACTION_FIELDS

__all__ = ["LiveTimelines", "events_frame", "merge_histories"]

_EVENT_COLUMNS = ("user_id", "video_id", "time_ms", *ACTION_FIELDS, "play_time_ms")


def events_frame(events) -> pl.DataFrame:
    """Feedback events as the frame :meth:`LiveTimelines.append` reads.

    Args:
        events: objects with ``user_id, item_id, time_ms``, the action flags ``ACTION_FIELDS`` and
            ``play_time_ms`` (e.g. :class:`~funnelrec.serving.schemas.FeedbackEvent`), in arrival order.
    Returns:
        a frame with one Int64 row per event: ``user_id, video_id`` (= ``item_id``), ``time_ms``, the action
        columns, ``play_time_ms``.

    Example:
        >>> from funnelrec.serving.schemas import FeedbackEvent
        >>> f = events_frame([FeedbackEvent(event_id="e1", user_id=1, item_id=9, time_ms=30, is_like=1)])
        >>> f.select("user_id", "video_id", "time_ms", "is_like").row(0)
        (1, 9, 30, 1)
    """
    events = list(events)
    data = {"user_id": [e.user_id for e in events], "video_id": [e.item_id for e in events],
            "time_ms": [e.time_ms for e in events],
            **{name: [getattr(e, name) for e in events] for name in ACTION_FIELDS},
            "play_time_ms": [e.play_time_ms for e in events]}
    return pl.DataFrame(data, schema={c: pl.Int64 for c in _EVENT_COLUMNS})


def merge_histories(older: History, newer: History, max_len: int) -> History:
    """The ``max_len`` most recent events of two left-padded histories of the same B requests, where every event
    of ``newer`` follows every event of ``older``.

    Args:
        older, newer: ``History`` with [B, N] items (same N = ``max_len``), [B, N, A] actions, [B, N] gaps, [B]
            lengths.
    Returns:
        the merged ``History`` ([B, N], left-padded, most recent last).
    """
    n = max_len
    b = older.items.shape[0]
    if n == 0:
        return older
    k = torch.arange(n - 1, -1, -1).expand(b, n)  # distance from the most recent slot
    ln, lo = newer.length.unsqueeze(1), older.length.unsqueeze(1)
    from_new = k < ln
    valid = k < (ln + lo).clamp(max=n)
    new_idx = (n - 1 - k).clamp(0, n - 1)
    old_idx = (n - 1 - (k - ln)).clamp(0, n - 1)

    def pick(a: Tensor, c: Tensor) -> Tensor:
        idx_new, idx_old = new_idx, old_idx
        if a.dim() == 3:
            idx_new = idx_new.unsqueeze(-1).expand(-1, -1, a.shape[-1])
            idx_old = idx_old.unsqueeze(-1).expand(-1, -1, a.shape[-1])
        out = torch.where((from_new.unsqueeze(-1) if a.dim() == 3 else from_new), c.gather(1, idx_new),
                          a.gather(1, idx_old))
        keep = valid.unsqueeze(-1) if a.dim() == 3 else valid
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype))

    return History(pick(older.items, newer.items), pick(older.actions, newer.actions),
                   pick(older.gap_s, newer.gap_s), (ln + lo).clamp(max=n).squeeze(1))


class LiveTimelines:
    """Logged timelines plus appended recent events (see the module doc).

    Args:
        base: the logged events (``Timelines.from_log(log, spec)``).
        spec: the fitted ``FeatureSpec`` mapping video ids to item indices (as ``base`` was built); None = +1.
        max_recent: keep at most this many recent events per user (older ones are dropped at rebuild).
    """

    def __init__(self, base: Timelines, spec=None, max_recent: int = 10_000):
        self.base = base
        self.spec = spec
        self.max_recent = int(max_recent)
        self._columns = ("user_id", "video_id", "time_ms", *base.action_columns, "play_time_ms")
        self._pending: list[pl.DataFrame] = []
        self._recent_log = self._empty()
        self._recent = Timelines.from_log(self._recent_log, spec, action_columns=base.action_columns)
        self._versions: dict[int, int] = {}
        self._lock = threading.Lock()

    def _empty(self) -> pl.DataFrame:
        return pl.DataFrame({c: pl.Series(c, [], dtype=pl.Int64) for c in self._columns})

    @property
    def action_columns(self) -> tuple[str, ...]:
        return self.base.action_columns

    @property
    def num_recent(self) -> int:
        """Recent events held (appended since start-up, within ``max_recent`` per user)."""
        with self._lock:
            self._rebuild()
            return self._recent_log.height

    def append(self, events: pl.DataFrame) -> None:
        """Add feedback events (columns ``user_id, video_id, time_ms``; action columns and ``play_time_ms``
        optional, 0 when absent). ``DataError`` names a missing key column or a negative id."""
        for c in ("user_id", "video_id", "time_ms"):
            if c not in events.columns:
                raise DataError("missing column of a feedback event", path="feedback", column=c)
            if events.get_column(c).null_count():
                raise DataError("null values", path="feedback", column=c)
        if events.height == 0:
            return
        for c in ("user_id", "video_id"):
            if int(events.get_column(c).min()) < 0:
                raise DataError("negative id in a feedback event", path="feedback", column=c)
        frame = events.select([pl.col(c).cast(pl.Int64) if c in events.columns else pl.lit(0, pl.Int64).alias(c)
                               for c in self._columns])
        users, counts = np.unique(frame.get_column("user_id").to_numpy(), return_counts=True)
        with self._lock:
            self._pending.append(frame)
            for u, c in zip(users.tolist(), counts.tolist()):
                self._versions[u] = self._versions.get(u, 0) + int(c)

    def _rebuild(self) -> None:
        if not self._pending:
            return
        log = pl.concat([self._recent_log, *self._pending], how="vertical")
        self._pending = []
        log = (log.sort(["user_id", "time_ms"], maintain_order=True)
               .filter(pl.col("time_ms").cum_count(reverse=True).over("user_id") <= self.max_recent))
        self._recent_log = log
        self._recent = Timelines.from_log(log, self.spec, action_columns=self.base.action_columns)

    def reset(self) -> None:
        """Forget every recent event (back to the logged histories)."""
        with self._lock:
            self._pending = []
            self._recent_log = self._empty()
            self._recent = Timelines.from_log(self._recent_log, self.spec, action_columns=self.base.action_columns)
            self._versions = {}

    def version(self, user_id: int) -> int:
        """How many events were appended for ``user_id`` since start-up."""
        return self._versions.get(int(user_id), 0)

    def known_user(self, user_id: int) -> bool:
        """Whether ``user_id`` has any event, logged or appended since start-up (or since ``reset``)."""
        user_id = int(user_id)
        s = self.base.user_events(user_id)
        return s.stop > s.start or self.version(user_id) > 0

    def history(self, user_ids, request_time_ms, max_len: int) -> History:
        """Histories of B requests, logged and recent events merged (see ``Timelines.history``)."""
        with self._lock:
            self._rebuild()
            recent = self._recent
        older = self.base.history(user_ids, request_time_ms, max_len)
        if recent.num_events == 0:
            return older
        return merge_histories(older, recent.history(user_ids, request_time_ms, max_len), max_len)

    def recent_events(self) -> pl.DataFrame:
        """The recent events held (a copy)."""
        with self._lock:
            self._rebuild()
            return self._recent_log.clone()
