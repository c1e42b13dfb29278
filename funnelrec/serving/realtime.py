"""Real-time user histories for serving: a fixed base history plus the events arriving through ``/feedback``.

The base is every user's events known at start-up (e.g. the training log), stored once in CSR layout like
``funnelrec.data.timeline.Timelines``: ``users [U]`` sorted, ``offsets [U + 1]``, and per event ``item_ids
[E]`` (raw ``video_id``), ``time_ms [E]``, ``actions [E, A]`` (int8 0/1 in the channels ``ACTION_FIELDS`` =
``funnelrec.data.objectives.ACTION_COLUMNS``), each user's events sorted by time. It is never modified.

New events go to a per-user in-memory buffer (kept sorted by time, bounded to the ``max_recent`` newest events
of the user). :meth:`RealtimeHistory.history` merges the base and the buffer and returns the ``max_len``
newest events oldest → newest, optionally only those strictly before a request time (the no-leakage rule of
DESIGN §5). Every append bumps the user's :meth:`~RealtimeHistory.version`, so a cache of per-user state
(encoded history, user embedding) can be keyed by ``(user_id, version)`` and is invalidated by the next
feedback event.

All of this is ours (the serving papers assume a real-time feature store; this is its in-memory form). A Redis
backend can implement the same four methods.

Thread safety: one lock guards the buffers; returned arrays are copies.

Shapes: E base events, A action channels, n ≤ max_len events of one user.

Example:
    >>> import numpy as np
    >>> rt = RealtimeHistory.from_arrays(user_ids=[7, 7, 8], item_ids=[3, 4, 5], time_ms=[10, 20, 15],
    ...                                  actions=np.zeros((3, 7), np.int8))
    >>> rt.history(7, max_len=5).item_ids.tolist(), rt.version(7)
    ([3, 4], 0)
    >>> rt.append_arrays(user_ids=[7], item_ids=[9], time_ms=[30], actions=[[1, 0, 0, 0, 0, 0, 0]])
    >>> h = rt.history(7, max_len=2)
    >>> h.item_ids.tolist(), h.time_ms.tolist(), h.actions[:, 0].tolist(), rt.version(7)
    ([4, 9], [20, 30], [0, 1], 1)
    >>> rt.history(7, max_len=5, before_ms=30).item_ids.tolist()
    [3, 4]
"""

from __future__ import annotations

import threading
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from funnelrec.errors import ConfigError, DataError
from funnelrec.serving.schemas import ACTION_FIELDS

__all__ = ["RealtimeHistory", "UserHistory"]


class UserHistory(NamedTuple):
    """One user's events, oldest → newest (unpacks as ``item_ids, time_ms, actions``)."""

    item_ids: np.ndarray  # [n] int64 video ids
    time_ms: np.ndarray  # [n] int64 epoch ms
    actions: np.ndarray  # [n, A] int8 0/1


def _int64(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"expected integers, got dtype {arr.dtype}", path="realtime history", column=name)
    return arr.astype(np.int64, copy=False).reshape(-1)


def _check_actions(actions, e: int, a: int) -> np.ndarray:
    arr = np.asarray(actions)
    if arr.size == 0 and e == 0:
        return np.zeros((0, a), np.int8)
    if arr.shape != (e, a):
        raise DataError(f"expected shape ({e}, {a}), got {arr.shape}", path="realtime history",
                        column="actions")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool) or (arr.size and (arr.min() < 0
                                                                                         or arr.max() > 1)):
        raise DataError("action flags must be 0/1 integers", path="realtime history", column="actions")
    return arr.astype(np.int8, copy=False)


class RealtimeHistory:
    """Per-user histories = an immutable base (CSR) + bounded in-memory buffers of new events.

    Args:
        users: [U] distinct user ids of the base, sorted ascending.
        offsets: [U + 1] CSR offsets into the event arrays (user ``users[u]`` owns
            ``offsets[u]:offsets[u+1]``).
        item_ids: [E] item (video) ids of the base events.
        time_ms: [E] event times; within each user non-decreasing.
        actions: [E, A] 0/1 action flags, A = ``len(action_columns)``.
        max_recent: the most real-time events kept per user (older ones are dropped from the buffer; the base
            is untouched).
        action_columns: names of the action channels (default ``ACTION_FIELDS``).

    Build from a log with :meth:`from_log` (a polars frame in the KuaiRand schema) or :meth:`from_arrays`
    (unsorted flat event arrays); ``RealtimeHistory()`` starts empty.
    """

    def __init__(self, users=None, offsets=None, item_ids=None, time_ms=None, actions=None, *,
                 max_recent: int = 1024, action_columns: Sequence[str] = ACTION_FIELDS):
        if isinstance(max_recent, bool) or not isinstance(max_recent, (int, np.integer)) or max_recent < 1:
            raise ConfigError(f"realtime history: max_recent must be an integer >= 1, got {max_recent!r}")
        self.max_recent = int(max_recent)
        self.action_columns = tuple(action_columns)
        a = len(self.action_columns)
        self.users = _int64([] if users is None else users, "user_id")
        self.offsets = _int64([0] if offsets is None else offsets, "offsets")
        self.item_ids = _int64([] if item_ids is None else item_ids, "item_id")
        self.time_ms = _int64([] if time_ms is None else time_ms, "time_ms")
        e = len(self.item_ids)
        self.actions = _check_actions(np.zeros((0, a), np.int8) if actions is None else actions, e, a)
        if len(self.time_ms) != e:
            raise DataError(f"{len(self.time_ms)} times for {e} events", path="realtime history",
                            column="time_ms")
        if len(self.offsets) != len(self.users) + 1 or self.offsets[0] != 0 or self.offsets[-1] != e \
                or np.any(np.diff(self.offsets) < 0):
            raise DataError("offsets must be non-decreasing, start at 0, end at the number of events and "
                            "have one entry more than users", path="realtime history", column="offsets")
        if np.any(np.diff(self.users) <= 0):
            raise DataError("users must be sorted and distinct", path="realtime history", column="user_id")
        if e > 1:  # times non-decreasing within each user: a decrease is allowed only at a user boundary
            drops = np.flatnonzero(np.diff(self.time_ms) < 0) + 1
            starts = set(self.offsets[1:-1].tolist())
            if any(int(i) not in starts for i in drops):
                raise DataError("each user's events must be sorted by time", path="realtime history",
                                column="time_ms")
        self._lock = threading.Lock()
        self._recent: dict[int, UserHistory] = {}
        self._versions: dict[int, int] = {}
        self._appended = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, user_ids, item_ids, time_ms, actions=None, **kwargs) -> "RealtimeHistory":
        """Build the base from flat, unsorted event arrays ([E] ids and times, [E, A] actions; None = all 0).

        Events are stably sorted by (user, time), so equal times keep their input order.
        """
        uid, iid, t = _int64(user_ids, "user_id"), _int64(item_ids, "item_id"), _int64(time_ms, "time_ms")
        a = len(kwargs.get("action_columns", ACTION_FIELDS))
        if not (len(uid) == len(iid) == len(t)):
            raise DataError(f"{len(uid)} users, {len(iid)} items and {len(t)} times differ in length",
                            path="realtime history", column="item_id")
        act = _check_actions(np.zeros((len(uid), a), np.int8) if actions is None else actions, len(uid), a)
        order = np.lexsort((t, uid))  # stable: ties keep input order
        uid, iid, t, act = uid[order], iid[order], t[order], act[order]
        if len(uid):
            starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
            users, offsets = uid[starts], np.r_[starts, len(uid)]
        else:
            users, offsets = np.zeros(0, np.int64), np.zeros(1, np.int64)
        return cls(users, offsets, iid, t, act, **kwargs)

    @classmethod
    def from_log(cls, log_df, **kwargs) -> "RealtimeHistory":
        """Build the base from a polars log frame with ``user_id, video_id, time_ms`` and any action columns
        (missing action columns and nulls read as 0).

        Example:
            >>> import polars as pl
            >>> log = pl.DataFrame({"user_id": [1, 1], "video_id": [5, 6], "time_ms": [2, 1],
            ...                     "is_like": [1, 0]})
            >>> h = RealtimeHistory.from_log(log).history(1, 10)
            >>> h.item_ids.tolist(), h.actions[:, 2].tolist()
            ([6, 5], [0, 1])
        """
        import polars as pl

        if not isinstance(log_df, pl.DataFrame):
            raise DataError(f"expected a polars DataFrame, got {type(log_df).__name__}", path="log")
        for c in ("user_id", "video_id", "time_ms"):
            if c not in log_df.columns:
                raise DataError("missing column", path="log", column=c)
            if log_df.get_column(c).null_count():
                raise DataError("null values", path="log", column=c)
        cols = kwargs.get("action_columns", ACTION_FIELDS)
        acts = np.stack([log_df.get_column(c).fill_null(0).cast(pl.Int8).to_numpy() if c in log_df.columns
                         else np.zeros(log_df.height, np.int8) for c in cols], axis=1) \
            if cols else np.zeros((log_df.height, 0), np.int8)
        col = lambda c: log_df.get_column(c).to_numpy()  # noqa: E731
        return cls.from_arrays(col("user_id"), col("video_id"), col("time_ms"), acts, **kwargs)

    # ------------------------------------------------------------------ updates
    def append(self, events: Iterable) -> None:
        """Add feedback events (objects with ``user_id, item_id, time_ms`` and the action-flag attributes,
        e.g. :class:`~funnelrec.serving.schemas.FeedbackEvent`); bumps the version of every user touched."""
        events = list(events)
        if not events:
            return
        cols = self.action_columns
        acts = np.array([[getattr(e, c, 0) for c in cols] for e in events], dtype=np.int8)
        self.append_arrays([e.user_id for e in events], [e.item_id for e in events],
                           [e.time_ms for e in events], acts.reshape(len(events), len(cols)))

    def append_arrays(self, user_ids, item_ids, time_ms, actions=None) -> None:
        """Add events given as flat arrays ([n] ids and times, [n, A] actions; None = all 0)."""
        uid, iid, t = _int64(user_ids, "user_id"), _int64(item_ids, "item_id"), _int64(time_ms, "time_ms")
        n, a = len(uid), len(self.action_columns)
        if not (len(iid) == n and len(t) == n):
            raise DataError(f"{n} users, {len(iid)} items and {len(t)} times differ in length",
                            path="realtime history", column="item_id")
        act = _check_actions(np.zeros((n, a), np.int8) if actions is None else actions, n, a)
        if n == 0:
            return
        order = np.lexsort((t, uid))
        uid, iid, t, act = uid[order], iid[order], t[order], act[order]
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], n]
        with self._lock:
            for s, e in zip(starts.tolist(), ends.tolist()):  # one step per distinct user of the batch
                user = int(uid[s])
                old = self._recent.get(user)
                if old is None:
                    items, times, acts = iid[s:e], t[s:e], act[s:e]
                else:
                    items = np.concatenate([old.item_ids, iid[s:e]])
                    times = np.concatenate([old.time_ms, t[s:e]])
                    acts = np.concatenate([old.actions, act[s:e]])
                    if times[len(old.time_ms)] < old.time_ms[-1]:  # an out-of-order event: merge by time
                        o = np.argsort(times, kind="stable")
                        items, times, acts = items[o], times[o], acts[o]
                keep = slice(max(0, len(times) - self.max_recent), None)
                self._recent[user] = UserHistory(items[keep].copy(), times[keep].copy(), acts[keep].copy())
                self._versions[user] = self._versions.get(user, 0) + 1
            self._appended += n

    # ------------------------------------------------------------------ reads
    def _base(self, user_id: int) -> tuple[int, int]:
        r = int(np.searchsorted(self.users, user_id))
        if r < len(self.users) and self.users[r] == user_id:
            return int(self.offsets[r]), int(self.offsets[r + 1])
        return 0, 0

    def history(self, user_id: int, max_len: int, before_ms: int | None = None) -> UserHistory:
        """The user's ``max_len`` newest events (base + real-time), oldest → newest.

        Args:
            user_id: the user; an unknown user has an empty history.
            max_len: the most events returned (≥ 0).
            before_ms: keep only events with ``time_ms < before_ms`` (None: all).

        Returns:
            ``UserHistory(item_ids [n], time_ms [n], actions [n, A])``, n ≤ max_len; ties in time: base events
            first, then real-time ones in arrival order.
        """
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 0:
            raise ConfigError(f"realtime history: max_len must be an integer >= 0, got {max_len!r}")
        user_id = int(user_id)
        s, e = self._base(user_id)
        if before_ms is not None:
            e = s + int(np.searchsorted(self.time_ms[s:e], before_ms, side="left"))
        s = max(s, e - max_len)
        with self._lock:
            rec = self._recent.get(user_id)
        parts = [(self.item_ids[s:e], self.time_ms[s:e], self.actions[s:e])]
        if rec is not None:
            re = (len(rec.time_ms) if before_ms is None
                  else int(np.searchsorted(rec.time_ms, before_ms, side="left")))
            rs = max(0, re - max_len)
            parts.append((rec.item_ids[rs:re], rec.time_ms[rs:re], rec.actions[rs:re]))
        if len(parts) == 1 or len(parts[1][1]) == 0:
            items, times, acts = parts[0]
            return UserHistory(items.copy(), times.copy(), acts.copy())
        items = np.concatenate([p[0] for p in parts])
        times = np.concatenate([p[1] for p in parts])
        acts = np.concatenate([p[2] for p in parts])
        if e > s and parts[1][1][0] < self.time_ms[e - 1]:  # real-time events older than the base tail
            o = np.argsort(times, kind="stable")
            items, times, acts = items[o], times[o], acts[o]
        keep = slice(max(0, len(times) - max_len), None)
        return UserHistory(items[keep], times[keep], acts[keep])

    def version(self, user_id: int) -> int:
        """How many appends have touched the user (0 = base only): key per-user caches by it."""
        with self._lock:
            return self._versions.get(int(user_id), 0)

    def known_user(self, user_id: int) -> bool:
        """Whether the user has any event, base or real-time."""
        s, e = self._base(int(user_id))
        if e > s:
            return True
        with self._lock:
            return int(user_id) in self._recent

    def __len__(self) -> int:
        """Events held (base + real-time buffers)."""
        with self._lock:
            return len(self.item_ids) + sum(len(r.time_ms) for r in self._recent.values())

    def describe(self) -> dict:
        """Sizes, for ``/healthz``."""
        with self._lock:
            return {"base_users": int(len(self.users)), "base_events": int(len(self.item_ids)),
                    "realtime_users": len(self._recent), "realtime_events_appended": int(self._appended),
                    "max_recent": self.max_recent}
