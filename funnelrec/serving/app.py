"""The HTTP service: a FastAPI app around a :class:`~funnelrec.serving.backend.ServingBackend` and a
feedback log.

Endpoints (JSON in and out; the full contract with examples is docs/serving.md):

* ``POST /recommend`` — :class:`~funnelrec.serving.schemas.RecommendRequest` → ``RecommendResponse`` (items
  with per-stage scores, per-stage timings and sizes). An unknown user is a cold start, not an error.
* ``POST /feedback`` — :class:`~funnelrec.serving.schemas.FeedbackRequest` → ``{"accepted": n, "duplicates":
  d}``, sent only after the new events are fsynced to the :class:`~funnelrec.serving.feedback_log.FeedbackLog`
  and applied to the backend (``observe``), so the user's next ``/recommend`` sees them.
* ``GET /healthz`` — status, the backend's ``describe()``, log counts, uptime.
* ``GET /metrics`` — Prometheus text format from an app-local registry.
* ``POST /explore`` (a ``RecommendRequest``) and ``GET /explorer`` (the page) — the funnel explorer
  (``funnelrec.serving.explorer``), only when the backend has ``explore(request)``; 404 otherwise.

Errors are JSON objects ``{"error": kind, "message": text}``; bad input adds ``"fields": [{"field": "count",
"message": ..., "type": ...}]`` (dotted paths, list indices included: ``events.3.is_click``):

====  ======================  ==========================================================================
code  ``error``               when
====  ======================  ==========================================================================
422   ``validation``          wrong type, unknown field, value out of range, empty or non-JSON body,
                              unknown query parameter, feedback on an unknown item
413   ``too_large``           body over ``max_body_bytes`` (by Content-Length, or counted while
                              streaming), refused before any parsing
404   ``not_found``           unknown route
405   ``method_not_allowed``  known route, wrong method (``Allow`` header set)
503   ``log_unavailable``     the feedback log could not be written (nothing was acknowledged)
500   ``internal``            the backend failed
====  ======================  ==========================================================================

Start-up (the ASGI lifespan, before the first request is accepted): open the log (finishing an interrupted
compaction), compact segments left by earlier runs, replay every logged event into ``backend.observe`` — each
``event_id`` once. Every ``compact_every`` new events the closed segments are compacted after the response is
sent.

All of it is ours (FastAPI, Starlette and prometheus-client are used as documented). No ``from __future__
import annotations`` here: FastAPI reads the endpoint annotations, which name classes local to
:func:`create_app`.

Example:
    >>> import httpx, tempfile
    >>> from funnelrec.serving.schemas import RecommendResponse
    >>> from funnelrec.serving.server import background_server
    >>> class Echo:
    ...     def recommend(self, r):
    ...         return RecommendResponse(user_id=r.user_id, request_id=r.request_id, items=[])
    ...     def observe(self, events): pass
    ...     def describe(self): return {"name": "echo"}
    >>> app = create_app(Echo(), ServiceConfig(log_dir=tempfile.mkdtemp()))
    >>> with background_server(app) as url:
    ...     ok = httpx.post(f"{url}/recommend", json={"user_id": 1}).status_code
    ...     bad = httpx.post(f"{url}/recommend", json={"user_id": 1, "count": "3"}).json()
    >>> ok, bad["fields"][0]["field"]
    (200, 'count')
"""

import dataclasses
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool

from funnelrec.errors import ConfigError, DataError
from funnelrec.serving.feedback_log import FeedbackLog
from funnelrec.serving.schemas import (DEFAULT_MAX_COUNT, DEFAULT_MAX_EVENTS, FeedbackResponse,
                                       RecommendResponse, bounded_models)

__all__ = ["ServiceConfig", "create_app", "validation_body"]

log = logging.getLogger("funnelrec.serving")
_ENDPOINTS = ("/recommend", "/feedback", "/healthz", "/metrics", "/explore", "/explorer")
_REPLAY_CHUNK = 10_000


@dataclass
class ServiceConfig:
    """Settings of one service process.

    Args:
        host: interface to bind; loopback by default (put a reverse proxy in front to expose it).
        port: TCP port; 0 = any free port (the bound port is printed / written by ``serve``).
        log_dir: the feedback log folder (created if missing).
        max_body_bytes: the largest request body accepted; larger ones get 413 before parsing.
        max_count: the largest ``count`` of a recommend request.
        max_events: the most events in one feedback request.
        compact_every: compact the log's closed segments after this many new events (the open segment is
            rotated first).
        fsync: fsync every feedback append before acknowledging it; turn off only for throw-away benchmarks.
        log_level: uvicorn's log level.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    log_dir: str = "runs/serve/feedback"
    max_body_bytes: int = 1 << 20
    max_count: int = DEFAULT_MAX_COUNT
    max_events: int = DEFAULT_MAX_EVENTS
    compact_every: int = 100_000
    fsync: bool = True
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"serve: host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"serve: port must be an integer in [0, 65535], got {self.port!r}")
        if not str(self.log_dir):
            raise ConfigError("serve: log_dir must be a folder path, got ''")
        for name in ("max_body_bytes", "max_count", "max_events", "compact_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"serve: {name} must be an integer >= 1, got {v!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"serve: log_level must be one of critical/error/warning/info/debug/trace, "
                              f"got {self.log_level!r}")


# ---------------------------------------------------------------------------------------------------- errors
def _field(loc: tuple) -> str:
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_body(fields: list[dict[str, str]], message: str = "invalid request") -> dict[str, Any]:
    """The JSON body of a 422: ``{"error": "validation", "message": ..., "fields": [...]}``."""
    return {"error": "validation", "message": message, "fields": fields}


def _validation_fields(errors: list[dict]) -> list[dict[str, str]]:
    out = []
    for err in errors:
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            out.append({"field": "body", "message": f"invalid JSON: {ctx.get('error', 'decode error')}",
                        "type": kind})
            continue
        field = _field(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if field == "body" and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
            msg = "expected a JSON object (Content-Type: application/json)" if kind != "missing" \
                else "the request needs a JSON body"
        out.append({"field": field, "message": msg, "type": kind})
    return out


def _error(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status, headers=headers)


_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
               415: "unsupported_media_type", 503: "unavailable"}


# ------------------------------------------------------------------------------------------------- middleware
class _Metrics:
    """The app's Prometheus collectors, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("funnelrec_http_requests_total",
                                "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("funnelrec_http_request_duration_seconds",
                                 "HTTP request latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.stage = Histogram("funnelrec_recommend_stage_duration_seconds", "Wall time of each funnel stage",
                               ["stage"], registry=r,
                               buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                        1))
        self.stage_size = Histogram("funnelrec_recommend_stage_size", "Candidates leaving each funnel stage",
                                    ["stage"], registry=r,
                                    buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        self.cold_start = Counter("funnelrec_recommend_cold_start_total",
                                  "Recommend requests of unknown users", registry=r)
        self.feedback = Counter("funnelrec_feedback_events_total", "Feedback events by result",
                                ["result"], registry=r)
        self.fsync = Histogram("funnelrec_feedback_append_seconds", "Feedback log append + fsync time",
                               registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.replayed = Gauge("funnelrec_feedback_replayed_events",
                              "Events replayed from the log at start-up", registry=r)
        self.compactions = Counter("funnelrec_feedback_compactions_total", "Log compactions", registry=r)
        self.in_flight_recommend = 0  # /recommend requests received and not answered yet (queued + running)
        Gauge("funnelrec_recommend_in_flight", "Recommend requests received and not answered yet",
              registry=r).set_function(lambda: self.in_flight_recommend)


class _Guard:
    """Pure ASGI middleware: body-size limit (before any parsing) and per-endpoint request metrics.

    The body is read here up to ``max_body_bytes`` + 1 and handed on unchanged; a declared Content-Length over
    the limit is refused without reading anything.
    """

    def __init__(self, app, max_body_bytes: int, metrics: _Metrics):
        self.app, self.max, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}
        start = time.perf_counter()
        if endpoint == "/recommend":  # the load a backend may degrade on (the result cache); event-loop thread
            self.metrics.in_flight_recommend += 1

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            too_large = _error(413, "too_large", f"request body exceeds {self.max} bytes",
                               fields=[{"field": "body", "message": f"at most {self.max} bytes",
                                        "type": "too_large"}],
                               headers={"Connection": "close"})
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    declared = -1
                if declared < 0:
                    return await _error(400, "bad_request", "invalid Content-Length header")(scope, receive,
                                                                                            send_wrapper)
                if declared > self.max:
                    return await too_large(scope, receive, send_wrapper)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max:
                    return await too_large(scope, receive, send_wrapper)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay_receive():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay_receive, send_wrapper)
        finally:
            if endpoint == "/recommend":
                self.metrics.in_flight_recommend -= 1
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- the app
class _State:
    def __init__(self, backend, config: ServiceConfig, metrics: _Metrics):
        self.backend, self.config, self.metrics = backend, config, metrics
        self.log: FeedbackLog | None = None
        self.feedback_lock = threading.Lock()  # log order == observe order
        self.compacting = threading.Lock()
        self.started = time.time()
        self.replayed = 0

    def startup(self) -> None:
        self.log = FeedbackLog(self.config.log_dir, fsync=self.config.fsync)
        self.log.compact()  # segments of earlier runs
        events = self.log.replay()
        for i in range(0, len(events), _REPLAY_CHUNK):
            self.backend.observe(events[i:i + _REPLAY_CHUNK])
        self.replayed = len(events)
        self.metrics.replayed.set(len(events))
        log.info("feedback log %s: replayed %d events", self.config.log_dir, len(events))

    def compact(self) -> None:
        if not self.compacting.acquire(blocking=False):
            return  # one compaction at a time; the next trigger catches up
        try:
            self.log.rotate()
            self.log.compact()
            self.metrics.compactions.inc()
        except Exception:  # the events stay in their segments; compaction is retried later
            log.exception("feedback log compaction failed")
        finally:
            self.compacting.release()


def _no_query(request: Request) -> None:
    """No endpoint takes query parameters: an unknown one is a 422 naming it."""
    if request.query_params:
        name = next(iter(request.query_params.keys()))
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("query", name),
                                       "msg": "unknown query parameter"}])


def create_app(backend, config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` (see the module doc).

    Args:
        backend: a :class:`~funnelrec.serving.backend.ServingBackend` (``recommend``, ``observe``,
            ``describe``; ``known_item`` is used when present).
        config: the service settings (default ``ServiceConfig()``).

    Returns:
        The app; its start-up (lifespan) replays the feedback log into the backend. Several apps may live in
        one process: each has its own Prometheus registry (``app.state.metrics.registry``).
    """
    config = ServiceConfig() if config is None else config
    if not isinstance(config, ServiceConfig):
        raise ConfigError(f"serve: config must be a ServiceConfig, got {type(config).__name__}")
    config.__post_init__()  # fields may have been set after construction (key=value overrides)
    for name in ("recommend", "observe", "describe"):
        if not callable(getattr(backend, name, None)):
            raise ConfigError(f"serve: the backend {type(backend).__name__} has no {name}() method")
    RecReq, FbReq = bounded_models(config.max_count, config.max_events)
    metrics = _Metrics()
    state = _State(backend, config, metrics)
    instrument = getattr(backend, "instrument", None)
    if callable(instrument):  # optional hook: the app's registry and its in-flight /recommend count
        instrument(metrics.registry, lambda: metrics.in_flight_recommend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(state.startup)
        try:
            yield
        finally:
            if state.log is not None:
                state.log.close()

    app = FastAPI(title="funnelrec", version=_version(), lifespan=lifespan,
                  dependencies=[Depends(_no_query)])
    app.state.service = state
    app.state.metrics = metrics
    app.add_middleware(_Guard, max_body_bytes=config.max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        fields = _validation_fields(list(exc.errors())) or [{"field": "body", "message": "invalid request",
                                                              "type": "invalid"}]
        more = f" (+{len(fields) - 1} more)" if len(fields) > 1 else ""
        return JSONResponse(validation_body(fields, f"{fields[0]['field']}: {fields[0]['message']}{more}"),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        kind = _HTTP_KINDS.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, kind, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    def _backend_failed(path: str, exc: Exception):
        # answered here, not by the Exception handler above: Starlette re-raises after that handler's response,
        # and the server then drops the connection, which a client can see as a reset instead of the 500
        log.exception("backend error on %s", path)
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend(body: RecReq):  # a sync endpoint: runs in the thread pool
        if body.request_id is None:
            body = body.model_copy(update={"request_id": uuid.uuid4().hex})
        try:
            out = backend.recommend(body)
        except DataError as err:
            return JSONResponse(validation_body([{"field": err.column or "body", "message": err.reason,
                                                  "type": "backend"}], "the backend refused the request"),
                                status_code=422)
        except Exception as err:  # noqa: BLE001 - any backend failure is a 500 JSON body
            return _backend_failed("/recommend", err)
        if not isinstance(out, RecommendResponse):
            out = RecommendResponse.model_validate(out)
        for stage, ms in out.timings_ms.items():
            metrics.stage.labels(stage).observe(ms / 1000.0)
        for stage, n in out.sizes.items():
            metrics.stage_size.labels(stage).observe(n)
        if out.cold_start:
            metrics.cold_start.inc()
        return out

    @app.post("/feedback", response_model=FeedbackResponse)
    def feedback(body: FbReq, background: BackgroundTasks):
        known = getattr(backend, "known_item", None)
        if known is not None:
            bad = [{"field": f"events.{i}.item_id", "message": f"unknown item {e.item_id}",
                    "type": "unknown_item"} for i, e in enumerate(body.events) if not known(e.item_id)]
            if bad:
                return JSONResponse(validation_body(bad[:20], "feedback on unknown items"), status_code=422)
        with state.feedback_lock:
            t0 = time.perf_counter()
            try:
                new = state.log.append(body.events)
            except OSError as err:
                log.exception("feedback log append failed")
                return _error(503, "log_unavailable", f"the feedback log could not be written ({err})")
            metrics.fsync.observe(time.perf_counter() - t0)
            if new:
                backend.observe(new)
        dup = len(body.events) - len(new)
        metrics.feedback.labels("accepted").inc(len(new))
        metrics.feedback.labels("duplicate").inc(dup)
        if state.log.since_compact >= config.compact_every:
            background.add_task(state.compact)
        return FeedbackResponse(accepted=len(new), duplicates=dup)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "backend": backend.describe(),
                "feedback_log": {**state.log.stats(), "replayed": state.replayed},
                "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "log_level"},
                "uptime_s": round(time.time() - state.started, 3)}

    @app.get("/metrics")
    def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if callable(getattr(backend, "explore", None)):  # the funnel explorer (funnelrec.serving.explorer)
        from funnelrec.serving.explorer import explorer_page

        page = explorer_page()

        @app.post("/explore")
        def explore(body: RecReq):
            if body.request_id is None:
                body = body.model_copy(update={"request_id": uuid.uuid4().hex})
            try:
                return JSONResponse(backend.explore(body))
            except DataError as err:
                return JSONResponse(validation_body([{"field": err.column or "body", "message": err.reason,
                                                      "type": "backend"}], "the backend refused the request"),
                                    status_code=422)
            except Exception as err:  # noqa: BLE001 - any backend failure is a 500 JSON body
                return _backend_failed("/explore", err)

        @app.get("/explorer", response_class=HTMLResponse)
        def explorer():
            return HTMLResponse(page)

    return app


def _version() -> str:
    from funnelrec import __version__

    return __version__
