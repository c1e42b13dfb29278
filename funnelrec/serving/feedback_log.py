"""The durable, append-only feedback log of the service: JSON-lines segments, fsynced, compacted into Parquet.

Layout of the log folder (all of it ours):

* ``seg-<seq>.jsonl``: segments, one :class:`~funnelrec.serving.schemas.FeedbackEvent` per line (its JSON).
  Exactly one segment is *open* (appended to); every process opens a fresh one (its ``seq`` is one past every
  number in the folder), so a segment torn by a crash is never written to again.
* ``part-<first>-<last>.parquet``: the events of the closed segments ``first..last``, compacted.
* ``.*.tmp-*``: a compaction in progress; removed when the log is opened.

Guarantees:

* **Durable acknowledgement.** :meth:`FeedbackLog.append` writes the new events and ``os.fsync``\\ s the
  segment before it returns (a new segment's directory entry is fsynced when it is created), so an event the
  service acknowledged survives a crash of the process or the machine.
* **No duplicates.** Every event id ever logged is remembered; ``append`` skips (and reports) an event whose
  id was already logged, or repeats one earlier in the same call. :meth:`FeedbackLog.replay` de-duplicates
  again by ``event_id`` (keeping the first), so even a log written by other means replays each id once.
* **Torn tails.** A crash during a write can leave the last line of a segment incomplete: it has no final
  newline (every complete record ends with one, written before the fsync), was never acknowledged, and is
  dropped on replay. Any other unreadable line is a :class:`~funnelrec.errors.DataError` naming the file and
  line. An unacknowledged batch may survive a crash in part (its complete lines); a client that retries it
  with the same event ids gets them acknowledged as duplicates, never applied twice.
* **Crash-safe compaction.** :meth:`FeedbackLog.compact` writes the closed segments' events to a temporary
  Parquet file, fsyncs it, renames it atomically to ``part-<first>-<last>.parquet``, fsyncs the folder, then
  deletes the segments. Killed before the rename: the temporary file is removed on the next open and the
  segments are still there. Killed after it: the segments ``first..last`` are covered by the part and are
  deleted on the next open. Either way every event is stored exactly once after re-opening.

Memory: the set of logged event ids is kept in memory (ids are ≤ 128 characters).

Example:
    >>> import tempfile
    >>> from funnelrec.serving.schemas import FeedbackEvent
    >>> d = tempfile.mkdtemp()
    >>> log = FeedbackLog(d)
    >>> ev = [FeedbackEvent(event_id=f"e{i}", user_id=1, item_id=i, time_ms=1000 + i) for i in range(3)]
    >>> len(log.append(ev)), len(log.append(ev[:2]))  # the repeat is skipped
    (3, 0)
    >>> log.rotate(); log.compact()
    3
    >>> log.close()
    >>> [e.event_id for e in FeedbackLog(d).replay()]
    ['e0', 'e1', 'e2']
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import TypeAdapter, ValidationError

from funnelrec.errors import DataError
from funnelrec.serving.schemas import ACTION_FIELDS, FeedbackEvent

__all__ = ["FeedbackLog", "EVENT_SCHEMA"]

#: The Arrow schema of a compacted part (the columns of a :class:`FeedbackEvent`).
EVENT_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("time_ms", pa.int64()),
    ("request_id", pa.string()), *[(name, pa.int8()) for name in ACTION_FIELDS], ("play_time_ms", pa.int64()),
])
_SEG = re.compile(r"^seg-(\d{12})\.jsonl$")
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_EVENTS = TypeAdapter(list[FeedbackEvent])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FeedbackLog:
    """An append-only, fsynced event log in ``directory`` (see the module doc for the layout and guarantees).

    Args:
        directory: the log folder (created if missing).
        fsync: fsync every append (True). False only for throw-away logs (benchmarks of the HTTP layer); an
            acknowledged event may then be lost in a machine crash (not in a process crash).

    Opening the log removes left-over temporary files and segments already covered by a Parquet part, and
    starts a new open segment. Methods are thread-safe.
    """

    def __init__(self, directory: str | os.PathLike, *, fsync: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = bool(fsync)
        self._lock = threading.RLock()
        self._compact_lock = threading.Lock()
        self._seen: set[str] | None = None
        self._fd: int | None = None
        self.appended = 0  # events written by this process
        self.since_compact = 0  # events written since the last compaction started
        self._recover()
        self._open_segment(self._max_seq() + 1)

    # ------------------------------------------------------------------ files
    def _segments(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _SEG.match(p.name)))

    def _parts(self) -> list[tuple[int, int, Path]]:
        return sorted((int(m.group(1)), int(m.group(2)), p) for p in self.dir.iterdir()
                      if (m := _PART.match(p.name)))

    def _max_seq(self) -> int:
        return max([s for s, _ in self._segments()] + [b for _, b, _ in self._parts()] + [0])

    def _covered(self, seq: int, parts) -> bool:
        return any(a <= seq <= b for a, b, _ in parts)

    def _recover(self) -> None:
        """Finish or undo a compaction that a crash interrupted (see the module doc)."""
        changed = False
        for p in self.dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink()
                changed = True
        parts = self._parts()
        for seq, path in self._segments():
            if self._covered(seq, parts):
                path.unlink()
                changed = True
        if changed:
            _fsync_dir(self.dir)

    def _open_segment(self, seq: int) -> None:
        self._seq = seq
        self._path = self.dir / f"seg-{seq:012d}.jsonl"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._segment_events = 0
        _fsync_dir(self.dir)

    @property
    def current_segment(self) -> Path:
        """The open segment's path."""
        return self._path

    # ------------------------------------------------------------------ writes
    def _ensure_seen(self) -> set[str]:
        if self._seen is None:
            self._seen = {e.event_id for e in self.replay()}
        return self._seen

    def append(self, events: Iterable[FeedbackEvent]) -> list[FeedbackEvent]:
        """Write the events whose ``event_id`` is new and fsync before returning.

        Args:
            events: validated :class:`FeedbackEvent` objects.

        Returns:
            The events written (new ids, in input order); the others were duplicates and are not written.

        Raises:
            OSError: the write or the fsync failed: nothing of this call is acknowledged, and the log moves on
                to a new segment (the failed one ends in at most a torn line).
        """
        with self._lock:
            if self._fd is None:
                raise DataError("the log is closed", path=self.dir)
            seen = self._ensure_seen()
            new, ids = [], set()
            for e in events:
                if e.event_id not in seen and e.event_id not in ids:
                    ids.add(e.event_id)
                    new.append(e)
            if not new:
                return new
            data = "".join(e.model_dump_json() + "\n" for e in new).encode()
            try:
                _write_all(self._fd, data)
                if self.fsync:
                    os.fsync(self._fd)
            except OSError:
                self._close_fd()
                self._open_segment(self._max_seq() + 1)
                raise
            seen.update(ids)
            self.appended += len(new)
            self.since_compact += len(new)
            self._segment_events += len(new)
            return new

    def contains(self, event_id: str) -> bool:
        """Whether an event with this id has been logged."""
        with self._lock:
            return event_id in self._ensure_seen()

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    def rotate(self) -> None:
        """Close the open segment (if it holds any event) and open the next one."""
        with self._lock:
            if self._fd is None or self._segment_events == 0:
                return
            self._close_fd()
            self._open_segment(self._max_seq() + 1)

    def close(self) -> None:
        """Close the open segment; the log can no longer be appended to."""
        with self._lock:
            self._close_fd()

    # ------------------------------------------------------------------ compaction
    def compact(self) -> int:
        """Move every closed segment into one Parquet part; returns the events compacted.

        Safe against a crash at any point (see the module doc); concurrent appends go on in the open segment.
        """
        with self._compact_lock:
            with self._lock:
                self.since_compact = 0
                parts = self._parts()
                closed = [(s, p) for s, p in self._segments()
                          if s != self._seq and not self._covered(s, parts)]
            if not closed:
                return 0
            events = []
            for _, path in closed:
                events.extend(self._read_segment(path))
            first, last = closed[0][0], closed[-1][0]
            target = self.dir / f"part-{first:012d}-{last:012d}.parquet"
            tmp = self.dir / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                if events:
                    with open(tmp, "wb") as f:
                        pq.write_table(_to_table(_dedupe(events)), f)
                        f.flush()
                        os.fsync(f.fileno())
                with self._lock:  # a replay sees either the segments or the part, never neither
                    if events:
                        os.replace(tmp, target)
                        _fsync_dir(self.dir)
                    for _, path in closed:
                        path.unlink()
                    _fsync_dir(self.dir)
            finally:
                if tmp.exists():
                    tmp.unlink()
            return len(events)

    # ------------------------------------------------------------------ reads
    def _read_segment(self, path: Path) -> list[FeedbackEvent]:
        """The events of one segment, a torn last line dropped; a DataError naming the file otherwise."""
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes after the last newline = a torn, unacknowledged tail
        lines = data[:end].split(b"\n")[:-1]
        if not lines:
            return []
        try:
            return _EVENTS.validate_json(b"[" + b",".join(lines) + b"]")
        except ValidationError:
            pass
        for i, line in enumerate(lines, start=1):  # find the culprit, for the message
            try:
                FeedbackEvent.model_validate_json(line)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise DataError(f"line {i}: corrupt feedback record ({where + ': ' if where else ''}"
                                f"{first['msg']})", path=path) from None
        raise DataError("corrupt feedback segment (records do not parse as a JSON list)", path=path)

    def _read_part(self, path: Path) -> list[FeedbackEvent]:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"unreadable Parquet part ({err})", path=path) from None
        missing = [n for n in EVENT_SCHEMA.names if n not in table.column_names]
        if missing:
            raise DataError("missing column", path=path, column=missing[0])
        try:
            return _EVENTS.validate_python(table.select(EVENT_SCHEMA.names).to_pylist())
        except ValidationError as err:
            first = err.errors()[0]
            raise DataError(f"row {first['loc'][0]}: {first['msg']}", path=path,
                            column=str(first["loc"][-1])) from None

    def replay(self) -> list[FeedbackEvent]:
        """Every logged event in log order, each ``event_id`` once (the first occurrence).

        Reads the Parquet parts and the segments (the open one included), dropping torn last lines.

        Raises:
            DataError: a corrupt segment or part, naming the file (and the line or column).
        """
        with self._lock:
            parts = self._parts()
            sources = [(a, p, True) for a, _, p in parts]
            sources += [(s, p, False) for s, p in self._segments() if not self._covered(s, parts)]
            events: list[FeedbackEvent] = []
            for _, path, is_part in sorted(sources, key=lambda x: x[0]):
                events.extend(self._read_part(path) if is_part else self._read_segment(path))
            events = _dedupe(events)
            if self._seen is None:
                self._seen = {e.event_id for e in events}
            return events

    def stats(self) -> dict:
        """Counts, for ``/healthz``."""
        with self._lock:
            return {"dir": str(self.dir), "segments": len(self._segments()), "parts": len(self._parts()),
                    "open_segment": self._path.name, "appended": self.appended,
                    "event_ids": None if self._seen is None else len(self._seen), "fsync": self.fsync}


def _dedupe(events: Sequence[FeedbackEvent]) -> list[FeedbackEvent]:
    seen: set[str] = set()
    out = []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            out.append(e)
    return out


def _to_table(events: Sequence[FeedbackEvent]) -> pa.Table:
    rows = _EVENTS.dump_python(list(events))
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def read_raw(directory: str | os.PathLike) -> list[str]:
    """Every stored event id, duplicates included (torn tails dropped): for checking that the log stores each
    event once. Opens nothing for writing.

    Example:
        >>> import tempfile
        >>> read_raw(tempfile.mkdtemp())
        []
    """
    d = Path(directory)
    ids: list[str] = []
    reader = FeedbackLog.__new__(FeedbackLog)
    for p in sorted(d.iterdir()):
        if _PART.match(p.name):
            ids += pq.read_table(p, columns=["event_id"]).column("event_id").to_pylist()
        elif _SEG.match(p.name):
            ids += [e.event_id for e in reader._read_segment(p)]
    return ids
