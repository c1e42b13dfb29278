"""SIGKILL during a feedback stream loses no acknowledged event, and replay applies each exactly once.

A real server subprocess (``python -m funnelrec.serving.server`` with the rule backend) takes concurrent
feedback POSTs while compacting every few events; it is killed with SIGKILL mid-stream, restarted on the same
log folder, streamed to and killed again, then restarted once more. Every event_id that was acknowledged (HTTP
200) must be stored exactly once on disk, replayed exactly once into the backend, and be reported as a
duplicate when re-sent.
"""

import itertools
import threading
import time
from collections import Counter

import httpx
from serving_testkit import ServerProcess

from funnelrec.serving.feedback_log import FeedbackLog, read_raw

MAX_EVENTS = 50


def _stream(url: str, prefix: str, acked: list[str], stop: threading.Event, lock: threading.Lock) -> None:
    """POST batches of 1-4 new events until the server dies or ``stop`` is set; record acknowledged ids."""
    sizes = itertools.cycle([1, 3, 2, 4])
    with httpx.Client(base_url=url, timeout=10) as client:
        for j in itertools.count():
            if stop.is_set():
                return
            batch = [{"event_id": f"{prefix}-{j}-{m}", "user_id": j % 7, "item_id": (j + m) % 50,
                      "time_ms": 1_700_000_000_000 + j, "is_click": m % 2} for m in range(next(sizes))]
            try:
                resp = client.post("/feedback", json={"events": batch})
            except httpx.TransportError:
                return  # the server is gone: this batch was not acknowledged
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"accepted": len(batch), "duplicates": 0}
            with lock:
                acked.extend(e["event_id"] for e in batch)


def _stream_then_kill(server: ServerProcess, round_: int, acked: list[str], min_acked: int) -> None:
    lock, stop = threading.Lock(), threading.Event()
    start = len(acked)
    threads = [threading.Thread(target=_stream, args=(server.url, f"k{round_}t{k}", acked, stop, lock))
               for k in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) - start < min_acked and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL while the clients are still posting
    for t in threads:
        t.join(timeout=30)
    stop.set()
    assert len(acked) - start >= min_acked, server.log_text()


def test_sigkill_during_feedback_stream_loses_no_acknowledged_event(tmp_path):
    log_dir = tmp_path / "log"
    cfg = {"compact_every": 20, "max_events": MAX_EVENTS}
    acked: list[str] = []
    for round_ in range(2):
        server = ServerProcess(log_dir, tmp_path, **cfg).start()
        _stream_then_kill(server, round_, acked, min_acked=150)

    server = ServerProcess(log_dir, tmp_path, **cfg).start()
    try:
        health = httpx.get(f"{server.url}/healthz").json()
        backend = health["backend"]
        # replay applied each logged event exactly once, and the acknowledged ones are among them
        replayed = health["feedback_log"]["replayed"]
        assert backend["observed_events"] == backend["distinct_observed"] == replayed
        assert health["feedback_log"]["replayed"] >= len(acked)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(0, len(acked), MAX_EVENTS):  # re-sending acknowledged events applies nothing
                chunk = [{"event_id": eid, "user_id": 0, "item_id": 0, "time_ms": 0}
                         for eid in acked[i:i + MAX_EVENTS]]
                assert client.post("/feedback", json={"events": chunk}).json() == {"accepted": 0,
                                                                                  "duplicates": len(chunk)}
        after = httpx.get(f"{server.url}/healthz").json()["backend"]
        assert after["observed_events"] == backend["observed_events"]
    finally:
        server.stop()

    stored = Counter(read_raw(log_dir))  # on disk, after the graceful stop: each event once
    assert all(stored[eid] == 1 for eid in acked), [eid for eid in acked if stored[eid] != 1][:10]
    assert max(stored.values()) == 1
    assert any(p.suffix == ".parquet" for p in log_dir.iterdir())  # compaction ran during the stream
    replayed = [e.event_id for e in FeedbackLog(log_dir).replay()]
    assert len(replayed) == len(set(replayed)) and set(acked) <= set(replayed)
