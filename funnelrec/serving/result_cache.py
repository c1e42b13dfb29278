"""The per-user result cache: each user's next items, a session's served set, and a degrade mode under load.

:class:`CachedBackend` wraps any :class:`~funnelrec.serving.backend.ServingBackend` (the cascade's in
production). For a request of ``count`` items it asks the backend for ``count + extra + s`` (``s`` = items
already served in the session; the cascade caps the list at its re-ranking pool), and the cache **claims**, in
one atomic step, the first ``count`` items the user has not been served in this session: they are served and
added to the user's served set, and the next ``extra`` unserved items become the user's cached list (replacing
the previous one). So

* **an item is never served twice to a user in a session** — a session lasts until ``ttl_s`` pass without a
  request of the user (every request extends it) or until :meth:`ResultCache.reset`; the served set and the
  cached list expire together. Concurrent requests of one user claim disjoint items (the claim is atomic: a
  lock in memory, a Lua script in Redis);
* **degrade mode**: when more than ``degrade_in_flight`` ``/recommend`` requests are in flight (received by
  the service and not answered: queued + running, counted by the app) and the user has cached items, the
  request is served from the cached list (up to ``count`` items, popped and added to the served set) without
  running the backend; the response says ``served_from: "cache"`` (``"cascade"`` otherwise) and its only stage
  is ``cache``. A user without cached items is computed as usual. ``serve_cached=True`` serves from the cache
  whenever it holds ``count`` items, load or not;
* **feedback invalidates** a user's cached list: lists are stored with the user's history version
  (``LiveTimelines.version`` of the backend's histories when it exposes them, else a count of the events this
  wrapper observed), a list of another version is never served, and ``observe`` drops the lists of the users
  in the events. The served set alone would not suffice: the cached items were ranked on the old history, and
  feedback (a hate, a long view) changes what the next items should be;
* **a store that fails** (Redis gone, timeouts) never fails a request: the error is logged once per outage and
  counted, the request is computed by the backend without the cache (no served-set filter: the never-twice
  rule is suspended while the store is down), and the store is tried again after ``retry_s``.

Two stores behind one interface (:class:`ResultCache`): :class:`MemoryResultCache` — in-process, LRU-bounded
to ``max_users`` sessions (an evicted user's session, served set included, is forgotten);
:class:`RedisResultCache` — Redis through redis-py, three keys per user
(``{prefix}{<user>}:meta|items|served``, one hash slot) with the session's TTL as their expiry, every
operation one Lua script. Both take an injectable clock (expiry is decided against it; Redis's own key expiry
is a backstop in wall time).

Metrics (``/metrics`` when served by the app, through :meth:`CachedBackend.instrument`):
``funnelrec_recommend_served_total{source}``, ``funnelrec_result_cache_degraded_total{outcome=hit|miss}``,
``funnelrec_result_cache_errors_total``, ``funnelrec_result_cache_bypassed_total``,
``funnelrec_result_cache_invalidations_total``, ``funnelrec_result_cache_up``.

Limits: the served set filters the backend's final list, so a user served more than the cascade's pool
(60 items by default) in one session without sending feedback may get short lists; cached items carry the
scores and context of the request that computed them (tab, hour and time of the later request are ignored).

All of this is ours (result caches and degradation under load are industry practice; no paper of the funnel
specifies them).

Example:
    >>> from funnelrec.serving.schemas import RecommendRequest, RecommendResponse, RecommendedItem
    >>> class Top:   # serves items 0, 1, 2, ... to everyone
    ...     def recommend(self, r):
    ...         items = [RecommendedItem(item_id=i, rank=i + 1) for i in range(r.count)]
    ...         return RecommendResponse(user_id=r.user_id, request_id=r.request_id, items=items)
    ...     def observe(self, events): pass
    ...     def describe(self): return {"name": "top"}
    >>> config = CacheConfig(extra=4, degrade_in_flight=None)
    >>> backend = CachedBackend(Top(), MemoryResultCache(ttl_s=60), config)
    >>> first = backend.recommend(RecommendRequest(user_id=1, count=2, request_id="a"))
    >>> second = backend.recommend(RecommendRequest(user_id=1, count=2, request_id="b"))
    >>> [i.item_id for i in first.items], [i.item_id for i in second.items], second.served_from
    ([0, 1], [2, 3], 'cascade')
    >>> backend.cache.peek(1)
    ([4, 5, 6, 7], [0, 1, 2, 3])
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from funnelrec.errors import ConfigError, FunnelrecError
from funnelrec.serving.schemas import RecommendedItem, RecommendResponse

__all__ = ["CacheConfig", "CacheUnavailable", "ResultCache", "MemoryResultCache", "RedisResultCache",
           "CachedBackend", "CachedItem", "make_cache"]

log = logging.getLogger("funnelrec.serving.cache")
#: Backend calls of one request at most (more only when concurrent requests of the user took the items).
_ATTEMPTS = 3

#: One cached item: (item id, its per-stage scores).
CachedItem = tuple[int, dict[str, float]]


class CacheUnavailable(FunnelrecError):
    """The cache store could not be reached or answered with an error (the request goes on without it)."""


def _check_positive(name: str, value, integer: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float)) and value > 0
    if not ok:
        kind = "an integer >= 1" if integer else "a number > 0"
        raise ConfigError(f"result cache: {name} must be {kind}, got {value!r}")


@dataclass
class CacheConfig:
    """How :class:`CachedBackend` uses its cache.

    Args:
        extra: N, the items cached beyond what a request serves (the user's next items).
        degrade_in_flight: serve from the cache when more than this many ``/recommend`` requests are in flight
            (0 = always, when the user has cached items); None = never degrade.
        serve_cached: also serve from the cache, whatever the load, when it holds ``count`` items of the user.
        retry_s: after a store failure, go without the store for this long, then try it again.
    """

    extra: int = 20
    degrade_in_flight: int | None = 32
    serve_cached: bool = False
    retry_s: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 0:
            raise ConfigError(f"result cache: extra must be an integer >= 0, got {self.extra!r}")
        d = self.degrade_in_flight
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ConfigError(f"result cache: degrade_in_flight must be an integer >= 0 or None, got {d!r}")
        if not isinstance(self.serve_cached, bool):
            raise ConfigError(f"result cache: serve_cached must be true or false, got {self.serve_cached!r}")
        if isinstance(self.retry_s, bool) or not isinstance(self.retry_s, (int, float)) or self.retry_s < 0:
            raise ConfigError(f"result cache: retry_s must be a number >= 0, got {self.retry_s!r}")


# ---------------------------------------------------------------------------------------------------- stores
class ResultCache:
    """The store interface (every method is atomic per user; ``CacheUnavailable`` when the store fails).

    Args:
        ttl_s: session length: a user's served set and cached list expire ``ttl_s`` after their last request.
        clock: seconds, for expiry (injectable for tests).
    """

    name = "base"

    def __init__(self, ttl_s: float, clock: Callable[[], float]):
        _check_positive("ttl_s", ttl_s)
        self.ttl_s = float(ttl_s)
        self.clock = clock

    def session_size(self, user_id: int) -> int:
        """Items served to the user in the current session (0 without one)."""
        raise NotImplementedError

    def claim(self, user_id: int, items: list[CachedItem], count: int, keep: int, version: str,
              cold: bool) -> list[CachedItem]:
        """Serve the first ``count`` of ``items`` (best first) not yet served in the session, add them to the
        served set, and cache the next ``keep`` unserved ones as the user's list (replacing it) under
        ``version``; starts a session when there is none and extends it. Returns the served items."""
        raise NotImplementedError

    def take(self, user_id: int, count: int, version: str, minimum: int = 1) -> tuple[list[CachedItem], bool]:
        """Pop up to ``count`` items of the user's cached list if it was stored under ``version`` and holds at
        least ``minimum`` (else nothing is popped); they join the served set and the session is extended.
        Returns (items, the cold-start flag of the request that computed them)."""
        raise NotImplementedError

    def invalidate(self, user_ids: Iterable[int]) -> None:
        """Drop the cached lists of these users (their served sets stay)."""
        raise NotImplementedError

    def reset(self, user_id: int | None = None) -> None:
        """End the session of ``user_id`` (served set and list), or of every user."""
        raise NotImplementedError

    def peek(self, user_id: int) -> tuple[list[int], list[int]]:
        """(cached item ids in order, served item ids sorted) of a live session; for inspection and tests."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"store": self.name, "ttl_s": self.ttl_s}

    def close(self) -> None:
        """Release connections (the memory store has none)."""


class _Session:
    __slots__ = ("items", "served", "version", "cold", "expires")

    def __init__(self, expires: float):
        self.items: list[CachedItem] = []
        self.served: set[int] = set()
        self.version = ""
        self.cold = False
        self.expires = expires


class MemoryResultCache(ResultCache):
    """In-process store: an LRU-ordered dict of sessions under one lock.

    The dict is kept in order of last request, which is also the order of expiry, so expired sessions are
    dropped from its front in O(1) each; beyond ``max_users`` live sessions the least recently active one is
    evicted (its served set is forgotten).

    Args:
        ttl_s: session length in seconds.
        max_users: the most sessions held.
        clock: monotonic seconds (default ``time.monotonic``).
    """

    name = "memory"

    def __init__(self, ttl_s: float = 1800.0, max_users: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(ttl_s, clock)
        _check_positive("max_users", max_users, integer=True)
        self.max_users = int(max_users)
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def _live(self, user_id: int, now: float, create: bool) -> _Session | None:
        """The user's live session (created when asked), moved to the most-recent end and extended."""
        while self._sessions:  # drop expired sessions from the front (oldest activity first)
            first = next(iter(self._sessions.values()))
            if first.expires > now:
                break
            self._sessions.popitem(last=False)
        s = self._sessions.get(user_id)
        if s is None:
            if not create:
                return None
            s = self._sessions[user_id] = _Session(now + self.ttl_s)
            while len(self._sessions) > self.max_users:
                self._sessions.popitem(last=False)
                self.evictions += 1
        else:
            self._sessions.move_to_end(user_id)
        s.expires = now + self.ttl_s
        return s

    def session_size(self, user_id: int) -> int:
        with self._lock:
            s = self._sessions.get(int(user_id))
            return len(s.served) if s is not None and s.expires > self.clock() else 0

    def claim(self, user_id, items, count, keep, version, cold):
        with self._lock:
            s = self._live(int(user_id), self.clock(), create=True)
            fresh = [it for it in items if it[0] not in s.served]
            out = []
            for it in fresh:  # ids are distinct in a served list; guard anyway
                if len(out) == count:
                    break
                if it[0] not in s.served:
                    s.served.add(it[0])
                    out.append(it)
            s.items = [it for it in fresh if it[0] not in s.served][:keep]
            s.version, s.cold = str(version), bool(cold)
            return out

    def take(self, user_id, count, version, minimum=1):
        with self._lock:
            now = self.clock()
            s = self._sessions.get(int(user_id))
            if s is None or s.expires <= now or s.version != str(version):
                return [], False
            avail = [it for it in s.items if it[0] not in s.served]
            if len(avail) < max(1, minimum):
                return [], False
            s = self._live(int(user_id), now, create=False)
            out, s.items = avail[:count], avail[count:]
            s.served.update(it[0] for it in out)
            return out, s.cold

    def invalidate(self, user_ids):
        with self._lock:
            for u in user_ids:
                s = self._sessions.get(int(u))
                if s is not None:
                    s.items = []

    def reset(self, user_id=None):
        with self._lock:
            if user_id is None:
                self._sessions.clear()
            else:
                self._sessions.pop(int(user_id), None)

    def peek(self, user_id):
        with self._lock:
            s = self._sessions.get(int(user_id))
            if s is None or s.expires <= self.clock():
                return [], []
            return [it[0] for it in s.items], sorted(s.served)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def describe(self) -> dict:
        return {**super().describe(), "max_users": self.max_users, "users": len(self),
                "evictions": self.evictions}


# Redis: KEYS = meta hash (exp, ver, cold), items list ("<id>\t<json scores>"), served set (ids).
_CLAIM = """
local now, exp, ttl_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local count, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
local old = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if (not old) or old <= now then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
redis.call('DEL', KEYS[2])
local out, kept = {}, 0
for i = 8, #ARGV do
  local e = ARGV[i]
  local id = string.sub(e, 1, string.find(e, '\\t', 1, true) - 1)
  if redis.call('SISMEMBER', KEYS[3], id) == 0 then
    if #out < count then
      redis.call('SADD', KEYS[3], id)
      out[#out + 1] = e
    elseif kept < keep then
      redis.call('RPUSH', KEYS[2], e)
      kept = kept + 1
    end
  end
end
redis.call('HSET', KEYS[1], 'exp', exp, 'ver', ARGV[6], 'cold', ARGV[7])
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl_ms) end
return out
"""

_TAKE = """
local now, exp, ttl_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local count, minimum = tonumber(ARGV[4]), tonumber(ARGV[6])
local old = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if (not old) or old <= now then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]); return {} end
if redis.call('HGET', KEYS[1], 'ver') ~= ARGV[5] then return {} end
local avail = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local id = string.sub(e, 1, string.find(e, '\\t', 1, true) - 1)
  if redis.call('SISMEMBER', KEYS[3], id) == 0 then avail[#avail + 1] = e end
end
if #avail < minimum then return {} end
local out = {redis.call('HGET', KEYS[1], 'cold')}
redis.call('DEL', KEYS[2])
for i, e in ipairs(avail) do
  if i <= count then
    redis.call('SADD', KEYS[3], string.sub(e, 1, string.find(e, '\\t', 1, true) - 1))
    out[#out + 1] = e
  else
    redis.call('RPUSH', KEYS[2], e)
  end
end
redis.call('HSET', KEYS[1], 'exp', exp)
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl_ms) end
return out
"""

_SIZE = """
local old = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if (not old) or old <= tonumber(ARGV[1]) then return 0 end
return redis.call('SCARD', KEYS[2])
"""


def _encode(item: CachedItem) -> str:
    return f"{int(item[0])}\t{json.dumps(item[1], separators=(',', ':'))}"


def _decode(raw: bytes | str) -> CachedItem:
    text = raw.decode() if isinstance(raw, bytes) else raw
    head, _, scores = text.partition("\t")
    return int(head), json.loads(scores)


class RedisResultCache(ResultCache):
    """Redis store (redis-py): per user ``{prefix}{<user>}:meta`` (hash: expiry, version, cold flag),
    ``:items`` (list) and ``:served`` (set), each operation one Lua script (atomic on the server).

    Args:
        url: a redis-py URL (``redis://host:6379/0``, ``unix:///path/redis.sock``); or pass ``client``.
        ttl_s: session length in seconds.
        prefix: key prefix (several services may share one Redis).
        timeout_s: socket connect / read timeout; a slower store counts as unavailable.
        clock: wall-clock seconds (default ``time.time``: shared by every process using the Redis).
        client: an existing ``redis.Redis`` (``url`` is then ignored).
    """

    name = "redis"

    def __init__(self, url: str | None = "redis://127.0.0.1:6379/0", ttl_s: float = 1800.0,
                 prefix: str = "funnelrec:cache:", timeout_s: float = 0.25,
                 clock: Callable[[], float] = time.time, client=None):
        super().__init__(ttl_s, clock)
        _check_positive("timeout_s", timeout_s)
        if not isinstance(prefix, str):
            raise ConfigError(f"result cache: prefix must be a string, got {prefix!r}")
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.exceptions.RedisError, OSError)
        if client is None:
            if not url:
                raise ConfigError("result cache: the Redis store needs a url or a client")
            try:  # no retries of its own: a failed call is answered without the cache and retried later
                client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry=Retry(NoBackoff(), 0))
            except ValueError as e:
                raise ConfigError(f"result cache: bad Redis url {url!r} ({e})") from None
        self.url, self.prefix, self.client = url, prefix, client
        self._claim = client.register_script(_CLAIM)
        self._take = client.register_script(_TAKE)
        self._size = client.register_script(_SIZE)

    def _keys(self, user_id: int) -> list[str]:
        base = f"{self.prefix}{{{int(user_id)}}}"
        return [f"{base}:meta", f"{base}:items", f"{base}:served"]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise CacheUnavailable(f"redis {self.url}: {type(e).__name__}: {e}") from e

    def _times(self) -> tuple[str, str, int]:
        now = self.clock()
        return repr(now), repr(now + self.ttl_s), int(self.ttl_s * 1000) + 1

    def session_size(self, user_id):
        k = self._keys(user_id)
        return int(self._call(self._size, keys=[k[0], k[2]], args=[repr(self.clock())]))

    def claim(self, user_id, items, count, keep, version, cold):
        now, exp, ttl_ms = self._times()
        args = [now, exp, ttl_ms, int(count), int(keep), str(version), int(bool(cold)), *map(_encode, items)]
        return [_decode(e) for e in self._call(self._claim, keys=self._keys(user_id), args=args)]

    def take(self, user_id, count, version, minimum=1):
        now, exp, ttl_ms = self._times()
        out = self._call(self._take, keys=self._keys(user_id),
                         args=[now, exp, ttl_ms, int(count), str(version), max(1, int(minimum))])
        if not out:
            return [], False
        return [_decode(e) for e in out[1:]], out[0] in (b"1", "1")

    def invalidate(self, user_ids):
        users = list(user_ids)
        if users:
            self._call(self.client.delete, *[self._keys(u)[1] for u in users])

    def reset(self, user_id=None):
        if user_id is not None:
            self._call(self.client.delete, *self._keys(user_id))
            return
        keys = self._call(lambda: list(self.client.scan_iter(match=f"{self.prefix}*", count=1000)))
        if keys:
            self._call(self.client.delete, *keys)

    def peek(self, user_id):
        meta, items, served = self._keys(user_id)
        exp = self._call(self.client.hget, meta, "exp")
        if exp is None or float(exp) <= self.clock():
            return [], []
        ids = [_decode(e)[0] for e in self._call(self.client.lrange, items, 0, -1)]
        return ids, sorted(int(x) for x in self._call(self.client.smembers, served))

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "prefix": self.prefix}

    def close(self) -> None:
        try:
            self.client.close()
        except self._errors:
            pass


def make_cache(kind: str, redis_url: str | None = None, ttl_s: float = 1800.0,
               max_users: int = 100_000) -> ResultCache | None:
    """The store named on the command line: ``"memory"``, ``"redis"`` (at ``redis_url``) or ``"none"``."""
    if kind == "none":
        return None
    if kind == "memory":
        return MemoryResultCache(ttl_s=ttl_s, max_users=max_users)
    if kind == "redis":
        return RedisResultCache(redis_url or "redis://127.0.0.1:6379/0", ttl_s=ttl_s)
    raise ConfigError(f"result cache: cache must be one of memory, redis, none; got {kind!r}")


# --------------------------------------------------------------------------------------------------- backend
class _Collector:
    """Prometheus collector over a :class:`CachedBackend`'s counters (registered in the app's registry)."""

    def __init__(self, owner: "CachedBackend"):
        self.owner = owner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.owner.counters()
        served = CounterMetricFamily("funnelrec_recommend_served",
                                     "Recommend requests by where the list came from", labels=["source"])
        served.add_metric(["cascade"], c["served_cascade"])
        served.add_metric(["cache"], c["served_cache"])
        degraded = CounterMetricFamily("funnelrec_result_cache_degraded",
                                       "Requests over the in-flight threshold: served from the cache (hit) "
                                       "or computed (miss)", labels=["outcome"])
        degraded.add_metric(["hit"], c["degraded_hit"])
        degraded.add_metric(["miss"], c["degraded_miss"])
        yield served
        yield degraded
        yield CounterMetricFamily("funnelrec_result_cache_errors", "Failed result-cache store calls",
                                  value=c["errors"])
        yield CounterMetricFamily("funnelrec_result_cache_bypassed", "Store calls skipped while it was down",
                                  value=c["bypassed"])
        yield CounterMetricFamily("funnelrec_result_cache_invalidations", "Users whose cached list feedback "
                                  "dropped", value=c["invalidations"])
        yield GaugeMetricFamily("funnelrec_result_cache_up", "1 while the result-cache store answers",
                                value=c["up"])


class CachedBackend:
    """A ``ServingBackend`` serving through a :class:`ResultCache` (see the module doc).

    Args:
        backend: the backend computing the lists (e.g. ``CascadeBackend``); other attributes (``cascade``,
            ``explore``) are reached through the wrapper.
        cache: the store (default: ``MemoryResultCache()``).
        config: :class:`CacheConfig`.
        clock: monotonic seconds for the retry-after-failure delay.
    """

    def __init__(self, backend, cache: ResultCache | None = None, config: CacheConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        for name in ("recommend", "observe", "describe"):
            if not callable(getattr(backend, name, None)):
                raise ConfigError(f"result cache: the backend {type(backend).__name__} has no {name}() "
                                  f"method")
        self.backend = backend
        self.cache = MemoryResultCache() if cache is None else cache
        self.config = CacheConfig() if config is None else config
        self.clock = clock
        histories = (getattr(getattr(backend, "cascade", None), "history", None)
                     or getattr(backend, "history", None))
        self._history_version = getattr(histories, "version", None)  # LiveTimelines.version when exposed
        self._versions: dict[int, int] = {}  # events observed per user (when the backend exposes no version)
        self._lock = threading.Lock()
        self._active = 0  # recommend calls running here (the load when no app tells the in-flight count)
        self._in_flight: Callable[[], int] | None = None
        self._down_until = 0.0
        self._down = False
        self._count = dict.fromkeys(("served_cascade", "served_cache", "degraded_hit", "degraded_miss",
                                     "errors", "bypassed", "invalidations"), 0)

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (construction failed or unpickling)
            raise AttributeError(name)
        return getattr(self.backend, name)

    # ----------------------------------------------------------------------------------------- plumbing
    def instrument(self, registry, in_flight: Callable[[], int]) -> None:
        """Called by ``create_app``: register the metrics; the app's in-flight count becomes the load."""
        self._in_flight = in_flight
        registry.register(_Collector(self))

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {**self._count, "up": int(not self._down)}

    def _inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._count[key] += n

    def _store(self, fn: Callable, default):
        """``fn()`` against the store, or ``default`` when it is down (failures logged once, counted, retried
        after ``retry_s``)."""
        if self._down and self.clock() < self._down_until:
            self._inc("bypassed")
            return default
        try:
            out = fn()
        except CacheUnavailable as err:
            self._inc("errors")
            with self._lock:
                first, self._down = not self._down, True
                self._down_until = self.clock() + self.config.retry_s
            if first:
                log.warning("result cache unavailable, serving without it (retrying every %.1f s): %s",
                            self.config.retry_s, err)
            return default
        if self._down:
            with self._lock:
                self._down = False
            log.warning("result cache available again")
        return out

    def _version(self, user_id: int) -> str:
        if self._history_version is not None:
            return str(self._history_version(user_id))
        return str(self._versions.get(int(user_id), 0))

    # ------------------------------------------------------------------------------------------ backend
    def recommend(self, request) -> RecommendResponse:
        with self._lock:
            self._active += 1
            active = self._active
        try:
            return self._recommend(request, self._in_flight() if self._in_flight is not None else active)
        finally:
            with self._lock:
                self._active -= 1

    def _recommend(self, request, load: int) -> RecommendResponse:
        cfg, user = self.config, request.user_id
        t0 = time.perf_counter()
        version = self._version(user)
        degrade = cfg.degrade_in_flight is not None and load > cfg.degrade_in_flight
        if degrade or cfg.serve_cached:
            minimum = 1 if degrade else request.count
            items, cold = self._store(lambda: self.cache.take(user, request.count, version, minimum),
                                      ([], False))
            if degrade:
                self._inc("degraded_hit" if items else "degraded_miss")
            if items:
                self._inc("served_cache")
                ms = (time.perf_counter() - t0) * 1e3
                return RecommendResponse(user_id=user, request_id=request.request_id or "",
                                         items=_ranked(items), timings_ms={"cache": ms},
                                         sizes={"cache": len(items)}, cold_start=cold, served_from="cache")
        served: list[CachedItem] = []
        backend_ms = 0.0
        for _ in range(_ATTEMPTS):  # again only when concurrent requests of the user claimed the items first
            missing = request.count - len(served)
            want = missing + cfg.extra + self._store(lambda: self.cache.session_size(user), 0)
            t1 = time.perf_counter()
            out = self.backend.recommend(request.model_copy(update={"count": want}))
            if not isinstance(out, RecommendResponse):
                out = RecommendResponse.model_validate(out)
            backend_ms += (time.perf_counter() - t1) * 1e3
            computed = [(int(it.item_id), dict(it.scores)) for it in out.items]
            served += self._store(lambda: self.cache.claim(user, computed, missing, cfg.extra, version,
                                                           out.cold_start), computed[:missing])
            if len(served) >= request.count or len(computed) < want:
                break
        cache_ms = (time.perf_counter() - t0) * 1e3 - backend_ms
        self._inc("served_cascade")
        sizes = {**out.sizes, "cache": len(served)} if out.sizes else {"cache": len(served)}
        return out.model_copy(update={"items": _ranked(served),
                                      "timings_ms": {**out.timings_ms, "cache": cache_ms},
                                      "sizes": sizes, "served_from": "cascade",
                                      "request_id": request.request_id or out.request_id})

    def observe(self, events) -> None:
        self.backend.observe(events)
        if not events:
            return
        users = sorted({int(e.user_id) for e in events})
        if self._history_version is None:
            with self._lock:
                for e in events:
                    self._versions[int(e.user_id)] = self._versions.get(int(e.user_id), 0) + 1
        self._store(lambda: self.cache.invalidate(users), None)
        self._inc("invalidations", len(users))

    def describe(self) -> dict:
        return {**self.backend.describe(),
                "result_cache": {**self.cache.describe(), "extra": self.config.extra,
                                 "degrade_in_flight": self.config.degrade_in_flight,
                                 "serve_cached": self.config.serve_cached, **self.counters()}}

    def known_item(self, item_id: int) -> bool:
        known = getattr(self.backend, "known_item", None)
        return True if known is None else known(item_id)

    def known_user(self, user_id: int) -> bool:
        known = getattr(self.backend, "known_user", None)
        return False if known is None else known(user_id)


def _ranked(items: list[CachedItem]) -> list[RecommendedItem]:
    return [RecommendedItem(item_id=i, rank=r, scores=s) for r, (i, s) in enumerate(items, start=1)]
