"""A tiny deterministic backend and a server-process launcher for the HTTP-layer tests.

``RuleBackend`` ranks the catalogue ``0 .. num_items-1`` by a fixed per-(user, item) hash score and excludes
every item in the user's history (a ``LiveTimelines`` over an empty log: item index = video id + 1),
caching the excluded set per ``(user, version)``: a feedback event must invalidate the cache for the next
``/recommend`` to change. It also counts what ``observe`` received, so tests can check that replay applies
each event exactly once.

The subprocess tests start it with ``python -m funnelrec.serving.server --backend <this file>:make_backend``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.data.timeline import Timelines
from funnelrec.errors import DataError
from funnelrec.serving.history import LiveTimelines, events_frame
from funnelrec.serving.schemas import RecommendedItem, RecommendResponse

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
#: Request time of a read without one: after every event.
FAR_FUTURE_MS = 2**62


def empty_history() -> LiveTimelines:
    """A ``LiveTimelines`` with no logged events (no spec: item index = video id + 1)."""
    log = pl.DataFrame({c: pl.Series(c, [], dtype=pl.Int64)
                        for c in ("user_id", "video_id", "time_ms", *ACTION_COLUMNS)})
    return LiveTimelines(Timelines.from_log(log))


class RuleBackend:
    """Deterministic test backend (see the module doc)."""

    def __init__(self, num_items: int = 50, history: LiveTimelines | None = None, max_hist: int = 1000,
                 fail_user: int | None = None, refuse_user: int | None = None):
        self.num_items = num_items
        self.history = empty_history() if history is None else history
        self.max_hist = max_hist
        self.fail_user, self.refuse_user = fail_user, refuse_user
        self._items = np.arange(num_items, dtype=np.int64)
        self._cache: dict[int, tuple[int, np.ndarray]] = {}
        self.cache_hits = 0
        self.observed = 0
        self.observed_ids: set[str] = set()
        self.observe_calls = 0
        self._lock = threading.Lock()

    def _scores(self, user_id: int) -> np.ndarray:
        return ((self._items * 7919 + (user_id % 10_007) * 104_729) % 1009).astype(np.float64) / 1009.0

    def _seen_mask(self, user_id: int, time_ms: int | None) -> np.ndarray:
        version = self.history.version(user_id)
        cached = self._cache.get(user_id) if time_ms is None else None
        if cached is not None and cached[0] == version:
            self.cache_hits += 1
            return cached[1]
        t = FAR_FUTURE_MS if time_ms is None else time_ms
        seen = self.history.history([user_id], [t], self.max_hist).items[0].numpy() - 1  # index 0 = padding
        mask = np.zeros(self.num_items, bool)
        mask[seen[(seen >= 0) & (seen < self.num_items)]] = True
        if time_ms is None:
            self._cache[user_id] = (version, mask)
        return mask

    def recommend(self, request) -> RecommendResponse:
        if request.user_id == self.fail_user:
            raise RuntimeError("backend failure on purpose")
        if request.user_id == self.refuse_user:
            raise DataError("this user cannot be served", column="user_id")
        t0 = time.perf_counter()
        mask = self._seen_mask(request.user_id, request.time_ms)
        cand = self._items[~mask]
        t1 = time.perf_counter()
        scores = self._scores(request.user_id)[cand]
        order = np.argsort(-scores, kind="stable")[: request.count]
        t2 = time.perf_counter()
        items = [RecommendedItem(item_id=int(cand[j]), rank=r + 1,
                                 scores={"retrieval": 1.0, "ranking": float(scores[j])})
                 for r, j in enumerate(order)]
        return RecommendResponse(user_id=request.user_id, request_id=request.request_id, items=items,
                                 timings_ms={"retrieval": (t1 - t0) * 1e3, "ranking": (t2 - t1) * 1e3},
                                 sizes={"retrieval": int(len(cand)), "ranking": len(items)},
                                 cold_start=not self.history.known_user(request.user_id))

    def observe(self, events) -> None:
        with self._lock:
            self.observe_calls += 1
            self.observed += len(events)
            self.observed_ids.update(e.event_id for e in events)
        self.history.append(events_frame(events))

    def describe(self) -> dict:
        return {"name": "rule", "num_items": self.num_items, "observed_events": self.observed,
                "distinct_observed": len(self.observed_ids),
                "history": {"num_recent": self.history.num_recent}}

    def known_item(self, item_id: int) -> bool:
        return 0 <= item_id < self.num_items

    def known_user(self, user_id: int) -> bool:
        return self.history.known_user(user_id)


def make_backend(num_items: int = 50) -> RuleBackend:
    """Factory for ``--backend serving_testkit.py:make_backend``."""
    return RuleBackend(num_items=num_items)


class ServerProcess:
    """``python -m funnelrec.serving.server`` with the rule backend in a subprocess, on a free port."""

    def __init__(self, log_dir: Path, work: Path, **config):
        self.log_dir, self.work = Path(log_dir), Path(work)
        self.config = {"port": 0, "log_dir": str(log_dir), **config}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        port_file = self.work / f"port-{time.monotonic_ns()}"
        cmd = [sys.executable, "-m", "funnelrec.serving.server", "--backend", f"{THIS}:make_backend",
               "--port-file", str(port_file), *[f"{k}={v}" for k, v in self.config.items()]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.stderr = open(self.work / f"server-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.stderr, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            if port_file.exists() and not self.url:
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
            if self.url:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not become healthy in {timeout_s} s: {self.log_text()}")

    def log_text(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL, no shutdown of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM: graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()
