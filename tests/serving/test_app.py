"""The HTTP service on a real uvicorn server (loopback, free port) with an httpx client."""

import threading
import time
from collections import Counter

import httpx
import pytest
from serving_testkit import FAR_FUTURE_MS, RuleBackend

from funnelrec.errors import ConfigError
from funnelrec.serving.app import ServiceConfig, create_app
from funnelrec.serving.feedback_log import FeedbackLog, read_raw
from funnelrec.serving.server import background_server

MAX_COUNT, MAX_EVENTS, MAX_BODY = 20, 8, 4096


def _event(eid, user=1, item=3, **kw):
    return {"event_id": eid, "user_id": user, "item_id": item, "time_ms": 1_700_000_000_000, **kw}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backend = RuleBackend(num_items=50, fail_user=666, refuse_user=777)
    cfg = ServiceConfig(port=0, log_dir=str(tmp_path_factory.mktemp("log")), max_count=MAX_COUNT,
                        max_events=MAX_EVENTS, max_body_bytes=MAX_BODY, compact_every=1000)
    with background_server(create_app(backend, cfg)) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client, backend, cfg


def _history_items(backend, user, max_len=10):
    """The item ids in the backend's history of ``user`` (all events), oldest first."""
    h = backend.history.history([user], [FAR_FUTURE_MS], max_len)
    return (h.items[0, max_len - int(h.length[0]):] - 1).tolist()  # left-padded; index = item id + 1


def _field_names(resp):
    body = resp.json()
    return [f["field"] for f in body.get("fields", [])], body


# ------------------------------------------------------------------------------------------------ happy paths
def test_recommend_returns_ranked_items_with_stage_scores_and_timings(server):
    client, _, _ = server
    resp = client.post("/recommend", json={"user_id": 10, "count": 5, "context": {"tab": 1, "hour": 9},
                                           "device_state": {"network": "wifi", "battery": 0.8}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [it["rank"] for it in body["items"]] == [1, 2, 3, 4, 5]
    assert all(set(it["scores"]) == {"retrieval", "ranking"} for it in body["items"])
    ranking = [it["scores"]["ranking"] for it in body["items"]]
    assert ranking == sorted(ranking, reverse=True)
    assert set(body["timings_ms"]) == {"retrieval", "ranking"}
    assert body["sizes"] == {"retrieval": 50, "ranking": 5}
    assert body["cold_start"] is True and body["user_id"] == 10 and len(body["request_id"]) == 32
    again = client.post("/recommend", json={"user_id": 10, "count": 5, "request_id": "mine-1"}).json()
    assert again["request_id"] == "mine-1"
    assert [it["item_id"] for it in again["items"]] == [it["item_id"] for it in body["items"]]  # stable


def test_feedback_changes_the_history_seen_by_the_next_recommend(server):
    client, backend, _ = server
    user = 21
    first = client.post("/recommend", json={"user_id": user, "count": 3}).json()
    assert first["cold_start"] is True
    top = first["items"][0]["item_id"]
    hits = backend.cache_hits
    assert client.post("/recommend", json={"user_id": user, "count": 3}).json()["items"] == first["items"]
    assert backend.cache_hits == hits + 1  # the per-user state is cached ...
    ack = client.post("/feedback", json={"events": [_event("fb-21-a", user=user, item=top, is_click=1,
                                                           request_id=first["request_id"])]})
    assert ack.status_code == 200 and ack.json() == {"accepted": 1, "duplicates": 0}
    after = client.post("/recommend", json={"user_id": user, "count": 3}).json()  # ... and invalidated
    assert after["cold_start"] is False
    assert top not in [it["item_id"] for it in after["items"]]
    assert [it["item_id"] for it in after["items"]][:2] == [it["item_id"] for it in first["items"]][1:]
    assert _history_items(backend, user) == [top]


def test_duplicate_events_are_acknowledged_but_not_reapplied(server):
    client, backend, _ = server
    ev = [_event("dup-1", user=30, item=1), _event("dup-2", user=30, item=2)]
    assert client.post("/feedback", json={"events": ev}).json() == {"accepted": 2, "duplicates": 0}
    observed = backend.observed
    resp = client.post("/feedback", json={"events": [ev[1], _event("dup-3", user=30, item=3), ev[1]]})
    assert resp.json() == {"accepted": 1, "duplicates": 2}
    assert backend.observed == observed + 1
    assert _history_items(backend, 30) == [1, 2, 3]


def test_feedback_on_an_unknown_item_is_refused_and_not_logged(server):
    client, backend, _ = server
    resp = client.post("/feedback", json={"events": [_event("unk-ok", item=4), _event("unk-bad", item=999)]})
    assert resp.status_code == 422
    assert _field_names(resp)[0] == ["events.1.item_id"]
    assert client.post("/feedback", json={"events": [_event("unk-ok", item=4)]}).json()["accepted"] == 1


def test_an_unknown_user_is_a_cold_start_not_an_error(server):
    client, _, _ = server
    resp = client.post("/recommend", json={"user_id": 2**62})
    assert resp.status_code == 200 and resp.json()["cold_start"] is True and len(resp.json()["items"]) == 10


def test_healthz_and_metrics(server):
    client, _, cfg = server
    client.post("/recommend", json={"user_id": 1})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["backend"]["name"] == "rule"
    assert health["feedback_log"]["dir"] == cfg.log_dir and health["config"]["max_count"] == MAX_COUNT
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    m = text.text
    assert 'funnelrec_http_requests_total{endpoint="/recommend",method="POST",status="200"}' in m
    assert 'funnelrec_http_request_duration_seconds_bucket{endpoint="/recommend"' in m
    assert 'funnelrec_recommend_stage_duration_seconds_count{stage="ranking"}' in m
    assert 'funnelrec_recommend_stage_size_count{stage="retrieval"}' in m
    assert "funnelrec_feedback_events_total" in m and "funnelrec_feedback_append_seconds_count" in m


# ----------------------------------------------------------------------------------------------- bad requests
BAD = [
    ("/recommend", {"user_id": "7"}, "user_id"),
    ("/recommend", {"user_id": -1}, "user_id"),
    ("/recommend", {"count": 3}, "user_id"),
    ("/recommend", {"user_id": 1, "count": "3"}, "count"),
    ("/recommend", {"user_id": 1, "count": 10**12}, "count"),
    ("/recommend", {"user_id": 1, "count": MAX_COUNT + 1}, "count"),
    ("/recommend", {"user_id": 1, "count": 0}, "count"),
    ("/recommend", {"user_id": 1, "colour": "red"}, "colour"),
    ("/recommend", {"user_id": 1, "context": {"hour": 25}}, "context.hour"),
    ("/recommend", {"user_id": 1, "context": {"weekday": 1}}, "context.weekday"),
    ("/recommend", {"user_id": 1, "context": "tab1"}, "context"),
    ("/recommend", {"user_id": 1, "device_state": {"battery": "full"}}, "device_state.battery"),
    ("/recommend", [1, 2], "body"),
    ("/feedback", {"events": []}, "events"),
    ("/feedback", {"events": "e1"}, "events"),
    ("/feedback", {"events": [_event(f"many-{i}") for i in range(MAX_EVENTS + 1)]}, "events"),
    ("/feedback", {"events": [_event("b1", is_click=2)]}, "events.0.is_click"),
    ("/feedback", {"events": [_event("b1", is_click=True)]}, "events.0.is_click"),
    ("/feedback", {"events": [_event("b1"), _event("b2", play_time_ms=-5)]}, "events.1.play_time_ms"),
    ("/feedback", {"events": [_event("b1", mood="happy")]}, "events.0.mood"),
    ("/feedback", {"events": [{"user_id": 1, "item_id": 1, "time_ms": 1}]}, "events.0.event_id"),
    ("/feedback", {"events": [_event("has space")]}, "events.0.event_id"),
    ("/feedback", {"events": [_event("b1")], "extra": 1}, "extra"),
    ("/feedback", {}, "events"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD)])
def test_bad_bodies_get_422_naming_the_field(server, path, body, field):
    client, backend, _ = server
    observed = backend.observed
    resp = client.post(path, json=body)
    assert resp.status_code == 422, resp.text
    fields, payload = _field_names(resp)
    assert payload["error"] == "validation" and field in fields, payload
    assert backend.observed == observed


@pytest.mark.parametrize("path", ["/recommend", "/feedback"])
@pytest.mark.parametrize("content, headers", [
    (b"", {"content-type": "application/json"}),
    (b"", {}),
    (b"{\"user_id\": 1", {"content-type": "application/json"}),
    (b"user_id=1", {"content-type": "application/x-www-form-urlencoded"}),
    (b"{\"user_id\": 1}", {}),
    (b"null", {"content-type": "application/json"}),
], ids=["empty-json", "empty", "truncated-json", "form", "no-content-type", "null"])
def test_empty_or_non_json_bodies_get_422_naming_the_body(server, path, content, headers):
    client, _, _ = server
    resp = client.post(path, content=content, headers=headers)
    assert resp.status_code == 422, resp.text
    assert _field_names(resp)[0] == ["body"]


@pytest.mark.parametrize("method, path", [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/recommend")])
def test_unknown_query_parameters_get_422_naming_them(server, method, path):
    client, _, _ = server
    body = {"user_id": 1} if method == "POST" else None
    resp = client.request(method, path, params={"verbose": "1"}, json=body)
    assert resp.status_code == 422 and _field_names(resp)[0] == ["verbose"]


def test_oversized_bodies_get_413_before_parsing(server):
    client, backend, _ = server
    observed = backend.observed
    big = {"events": [_event(f"big-{i}") for i in range(MAX_EVENTS)], "padding": "x" * MAX_BODY}
    resp = client.post("/feedback", json=big)  # would be a 422 (unknown field) if it were parsed
    assert resp.status_code == 413 and resp.json()["error"] == "too_large"
    assert _field_names(resp)[0] == ["body"]

    def chunks():  # streamed without a Content-Length: counted while reading
        yield b'{"user_id": 1, "request_id": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    resp = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"] == "too_large"
    assert backend.observed == observed
    assert client.get("/healthz").status_code == 200  # the server is fine afterwards


def test_unknown_routes_and_wrong_methods(server):
    client, _, _ = server
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    resp = client.get("/recommend")
    assert resp.status_code == 405 and resp.json()["error"] == "method_not_allowed"
    assert "POST" in resp.headers["allow"]
    assert client.post("/healthz", json={}).status_code == 405
    assert client.delete("/feedback").status_code == 405


def test_backend_failures_are_json(server):
    client, _, _ = server
    resp = client.post("/recommend", json={"user_id": 666})
    assert resp.status_code == 500 and resp.json()["error"] == "internal"
    resp = client.post("/recommend", json={"user_id": 777})
    assert resp.status_code == 422 and _field_names(resp)[0] == ["user_id"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="max_count"):
        ServiceConfig(max_count=0)
    with pytest.raises(ConfigError, match="port"):
        ServiceConfig(port=70_000)
    with pytest.raises(ConfigError, match="recommend"):
        create_app(object(), ServiceConfig(log_dir=str(tmp_path)))


def test_command_line_errors_are_one_line(capsys):
    from funnelrec.serving.server import main

    with pytest.raises(SystemExit) as info:
        main(["--backend", "no_such_module_xyz:make"])
    assert info.value.code == 2 and "cannot import" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--backend", "serving_testkit:make_backend", "max_count=0"])  # overrides are re-validated
    assert info.value.code == 2 and "max_count" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- restarts
def test_restart_replays_the_log_once_and_keeps_deduplicating(tmp_path):
    cfg = ServiceConfig(port=0, log_dir=str(tmp_path / "log"), compact_every=5, max_events=8)
    events = [_event(f"r-{i}", user=40 + i % 2, item=i) for i in range(13)]
    backend = RuleBackend()
    with background_server(create_app(backend, cfg)) as url, httpx.Client(base_url=url) as client:
        for i in range(0, 13, 4):
            assert client.post("/feedback", json={"events": events[i:i + 4]}).status_code == 200
        before = client.post("/recommend", json={"user_id": 40, "count": 50}).json()
    assert len(list((tmp_path / "log").glob("part-*.parquet"))) >= 1  # compaction ran in the background
    backend2 = RuleBackend()
    with background_server(create_app(backend2, cfg)) as url, httpx.Client(base_url=url) as client:
        assert backend2.observed == 13 and len(backend2.observed_ids) == 13
        assert client.get("/healthz").json()["feedback_log"]["replayed"] == 13
        after = client.post("/recommend", json={"user_id": 40, "count": 50}).json()
        assert [it["item_id"] for it in after["items"]] == [it["item_id"] for it in before["items"]]
        assert after["cold_start"] is False
        resp = client.post("/feedback", json={"events": events[:3] + [_event("r-new", user=40, item=49)]})
        assert resp.json() == {"accepted": 1, "duplicates": 3}
        assert backend2.observed == 14
    assert Counter(read_raw(tmp_path / "log")) == Counter([e["event_id"] for e in events] + ["r-new"])


def test_concurrent_feedback_is_logged_and_applied_exactly_once(tmp_path):
    cfg = ServiceConfig(port=0, log_dir=str(tmp_path / "log"), compact_every=7)
    backend = RuleBackend()
    acked: list[str] = []
    lock = threading.Lock()

    def client_thread(url, k):
        with httpx.Client(base_url=url) as client:
            for j in range(15):
                batch = [_event(f"c{k}-{j}-{m}", user=k, item=(j + m) % 50) for m in range(3)]
                # the same id as a neighbour's: two requests race for it
                batch.append(_event(f"c{(k + 1) % 4}-{j}-0", user=(k + 1) % 4, item=j % 50))
                resp = client.post("/feedback", json={"events": batch})
                assert resp.status_code == 200
                with lock:
                    acked.extend(e["event_id"] for e in batch)

    with background_server(create_app(backend, cfg)) as url:
        threads = [threading.Thread(target=client_thread, args=(url, k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.2)
    distinct = set(acked)
    assert backend.observed == len(distinct) == len(backend.observed_ids)
    assert Counter(read_raw(tmp_path / "log")) == Counter(distinct)
    assert {e.event_id for e in FeedbackLog(tmp_path / "log").replay()} == distinct


def test_two_apps_in_one_process_have_separate_metrics(tmp_path):
    apps = [create_app(RuleBackend(), ServiceConfig(port=0, log_dir=str(tmp_path / f"log{i}")))
            for i in range(2)]
    with background_server(apps[0]) as u0, background_server(apps[1]) as u1:
        for _ in range(3):
            httpx.post(f"{u0}/recommend", json={"user_id": 1})
        httpx.post(f"{u1}/recommend", json={"user_id": 1})
        m0, m1 = httpx.get(f"{u0}/metrics").text, httpx.get(f"{u1}/metrics").text
    line = 'funnelrec_http_requests_total{endpoint="/recommend",method="POST",status="200"}'
    assert f"{line} 3.0" in m0 and f"{line} 1.0" in m1
