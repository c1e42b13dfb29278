"""FeedbackLog: fsync before acknowledging, de-duplication, torn tails, corrupt files, safe compaction."""

import os
from collections import Counter
from pathlib import Path

import pytest

from funnelrec.errors import DataError
from funnelrec.serving import feedback_log as fl
from funnelrec.serving.feedback_log import FeedbackLog, read_raw
from funnelrec.serving.schemas import FeedbackEvent


def _events(prefix, n, user=1):
    return [FeedbackEvent(event_id=f"{prefix}{i}", user_id=user, item_id=i, time_ms=1_000 + i, is_click=i % 2,
                          play_time_ms=10 * i, request_id=None if i % 3 else f"r{i}") for i in range(n)]


def _ids(events):
    return [e.event_id for e in events]


def test_append_replay_round_trip_keeps_fields_and_order(tmp_path):
    log = FeedbackLog(tmp_path)
    a, b = _events("a", 5), _events("b", 3, user=2)
    assert log.append(a) == a
    assert log.append(b) == b
    log.close()
    back = FeedbackLog(tmp_path).replay()
    assert back == a + b  # every field, in log order


def test_duplicates_are_skipped_within_a_call_across_calls_and_restarts(tmp_path):
    log = FeedbackLog(tmp_path)
    ev = _events("e", 4)
    assert _ids(log.append(ev[:2] + ev[:1])) == ["e0", "e1"]
    assert _ids(log.append(ev)) == ["e2", "e3"]
    assert log.append(ev) == []
    log.close()
    log2 = FeedbackLog(tmp_path)
    assert log2.append(ev[1:2] + _events("f", 1)) == _events("f", 1)
    assert log2.contains("e3") and not log2.contains("zz")
    log2.close()
    assert Counter(read_raw(tmp_path)) == Counter(["e0", "e1", "e2", "e3", "f0"])


def test_append_fsyncs_the_segment_before_returning(tmp_path, monkeypatch):
    log = FeedbackLog(tmp_path)
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(fl.os, "fsync", spy)
    log.append(_events("e", 2))
    assert log._fd in calls
    assert log.current_segment.read_bytes().count(b"\n") == 2  # written, whole lines
    calls.clear()
    log.append(_events("e", 2))  # all duplicates: nothing to write, nothing to sync
    assert calls == []


def test_failed_write_is_not_acknowledged_and_moves_to_a_new_segment(tmp_path, monkeypatch):
    log = FeedbackLog(tmp_path)
    log.append(_events("a", 1))
    first = log.current_segment

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fl.os, "fsync", broken)
    with pytest.raises(OSError):
        log.append(_events("b", 2))
    monkeypatch.undo()
    assert log.current_segment != first
    assert not log.contains("b0")  # not acknowledged, so a retry is written
    assert _ids(log.append(_events("b", 2))) == ["b0", "b1"]
    log.close()
    assert set(_ids(FeedbackLog(tmp_path).replay())) == {"a0", "b0", "b1"}


def test_torn_last_line_is_dropped(tmp_path):
    log = FeedbackLog(tmp_path)
    log.append(_events("e", 3))
    seg = log.current_segment
    log.close()
    with open(seg, "ab") as f:  # a crash in the middle of writing a 4th record
        f.write(_events("x", 1)[0].model_dump_json().encode()[:25])
    log2 = FeedbackLog(tmp_path)
    assert _ids(log2.replay()) == ["e0", "e1", "e2"]
    assert log2.current_segment != seg  # a torn segment is never appended to again
    log2.append(_events("x", 1))
    log2.rotate()
    assert log2.compact() == 4
    log2.close()
    assert _ids(FeedbackLog(tmp_path).replay()) == ["e0", "e1", "e2", "x0"]


def test_corrupt_middle_line_names_the_file(tmp_path):
    log = FeedbackLog(tmp_path)
    log.append(_events("e", 3))
    seg = log.current_segment
    log.close()
    lines = seg.read_bytes().split(b"\n")
    lines[1] = b'{"event_id": "e1", "user_id": "oops"}'
    seg.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{seg.name}.*line 2"):
        FeedbackLog(tmp_path).replay()


def test_corrupt_parquet_part_names_the_file(tmp_path):
    log = FeedbackLog(tmp_path)
    log.append(_events("e", 3))
    log.rotate()
    log.compact()
    log.close()
    (part,) = tmp_path.glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(DataError, match=part.name):
        FeedbackLog(tmp_path).replay()


def test_compaction_moves_closed_segments_to_parquet(tmp_path):
    log = FeedbackLog(tmp_path)
    log.append(_events("a", 4))
    log.rotate()
    log.append(_events("b", 2))
    log.rotate()
    log.append(_events("c", 1))  # the open segment stays JSON lines
    assert log.compact() == 6
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    assert [p.name for p in tmp_path.glob("seg-*.jsonl")] == [log.current_segment.name]
    assert log.compact() == 0
    assert log.replay() == _events("a", 4) + _events("b", 2) + _events("c", 1)
    log.append(_events("d", 1))
    log.close()
    log2 = FeedbackLog(tmp_path)  # earlier runs' segments are closed: the next compaction takes them
    assert log2.compact() == 2
    assert _ids(log2.replay()) == _ids(_events("a", 4) + _events("b", 2) + _events("c", 1) + _events("d", 1))
    assert Counter(read_raw(tmp_path)).most_common(1)[0][1] == 1


def test_empty_closed_segments_are_removed(tmp_path):
    FeedbackLog(tmp_path).close()
    FeedbackLog(tmp_path).close()
    log = FeedbackLog(tmp_path)
    assert len(list(tmp_path.glob("seg-*.jsonl"))) == 3
    assert log.compact() == 0
    assert list(tmp_path.glob("part-*")) == [] and len(list(tmp_path.glob("seg-*.jsonl"))) == 1


def test_crash_after_the_parquet_rename_neither_loses_nor_duplicates(tmp_path, monkeypatch):
    log = FeedbackLog(tmp_path)
    log.append(_events("a", 5))
    log.rotate()
    log.append(_events("b", 2))

    def crash(self, *a, **k):  # the process dies right after the part is in place, before deleting segments
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        log.compact()
    monkeypatch.undo()
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    assert Counter(read_raw(tmp_path))["a0"] == 2  # stored twice on disk for now ...
    assert _ids(log.replay()) == _ids(_events("a", 5) + _events("b", 2))  # ... but replayed once
    log.close()
    log2 = FeedbackLog(tmp_path)  # re-opening finishes the compaction
    assert Counter(read_raw(tmp_path)) == Counter(_ids(_events("a", 5) + _events("b", 2)))
    assert _ids(log2.replay()) == _ids(_events("a", 5) + _events("b", 2))


def test_crash_before_the_parquet_rename_leaves_the_segments(tmp_path, monkeypatch):
    log = FeedbackLog(tmp_path)
    log.append(_events("a", 3))
    log.rotate()

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fl.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        log.compact()
    monkeypatch.undo()
    assert list(tmp_path.glob("part-*.parquet")) == []
    log.close()
    (tmp_path / ".part-000000000001-000000000001.parquet.tmp-deadbeef").write_bytes(b"half a parquet file")
    log2 = FeedbackLog(tmp_path)
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
    assert _ids(log2.replay()) == ["a0", "a1", "a2"]
    log2.rotate()
    assert log2.compact() == 3
    assert _ids(log2.replay()) == ["a0", "a1", "a2"]


def test_closed_log_refuses_appends(tmp_path):
    log = FeedbackLog(tmp_path)
    log.close()
    with pytest.raises(DataError, match="closed"):
        log.append(_events("a", 1))
