"""The funnel explorer's data: ``Cascade.recommend(detail=True)``, ``CascadeBackend.explore`` and the
``POST /explore`` / ``GET /explorer`` routes of a real server over the small trained cascade.

The browser test of the page is test_explorer_page.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import torch
from cascade_fixtures import HISTORY_LEN, SIZES, cascade_env  # noqa: F401
from serving_testkit import RuleBackend

from funnelrec.errors import ConfigError
from funnelrec.serving.app import ServiceConfig, create_app
from funnelrec.serving.cascade_backend import CascadeBackend
from funnelrec.serving.explorer import ItemCatalog, explore_payload, explorer_page
from funnelrec.serving.schemas import ACTION_FIELDS, RecommendRequest
from funnelrec.serving.server import background_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(cascade_env):
    """The test requests served twice: plainly and with ``detail=True``."""
    c = cascade_env.cascade0
    return c.recommend(*cascade_env.args()), c.recommend(*cascade_env.args(), detail=True)


@pytest.fixture(scope="module")
def server(cascade_env, tmp_path_factory):
    """A real server over a fresh cascade (its own live histories: the feedback test appends to them)."""
    backend = CascadeBackend(cascade_env.cascade())
    cfg = ServiceConfig(log_dir=str(tmp_path_factory.mktemp("explore_log")), fsync=False)
    with background_server(create_app(backend, cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, backend


def _request(env, i: int = 0) -> dict:
    r = env.requests.row(i, named=True)
    return {"user_id": r["user_id"], "time_ms": r["time_ms"], "context": {"tab": r["tab"], "hour": r["hour"]}}


# ---------------------------------------------------------------------------------------------- the cascade
def test_detail_changes_nothing_and_holds_every_stage_score(cascade_env, served):
    plain, full = served
    assert plain.detail is None
    np.testing.assert_array_equal(plain.items, full.items)
    for k in plain.scores:
        np.testing.assert_array_equal(plain.scores[k], full.scores[k])
    d, si = full.detail, full.stage_items
    b = cascade_env.requests.height
    assert d["retrieval"].shape == d["prerank_all"].shape == (b, SIZES.retrieve)
    assert d["pxtr"].shape == (b, SIZES.prerank, len(cascade_env.parts.tasks))
    assert d["hist_items"].shape == (b, HISTORY_LEN)
    # positions point at the stage's kept items
    assert torch.equal(si["retrieval"].gather(1, d["prerank_pos"]) * (si["prerank"] > 0), si["prerank"])
    assert torch.equal(si["prerank"].gather(1, d["pool_pos"]) * (si["fusion"] > 0), si["fusion"])
    assert torch.equal(si["prerank"].gather(1, d["final_pos"]), si["rerank"])
    # the served items' scores are the detail tensors at the served positions
    fp = d["final_pos"]
    np.testing.assert_array_equal(full.scores["fusion"], d["fusion"].gather(1, fp).numpy())
    np.testing.assert_array_equal(full.scores["prerank"], d["prerank"].gather(1, fp).numpy())
    np.testing.assert_array_equal(full.scores["watch_s"], d["watch_s"].gather(1, fp).numpy())
    np.testing.assert_array_equal(d["prerank"], d["prerank_all"].gather(1, d["prerank_pos"]))
    # stage orders: pre-rank score, then fused score, descending
    pre, fused = d["prerank"], d["fusion"].gather(1, d["pool_pos"])
    assert (pre[:, :-1] >= pre[:, 1:]).all() and (fused[:, :-1] >= fused[:, 1:]).all()


# ------------------------------------------------------------------------------------------ the payload
def test_explore_lists_every_stage_with_its_scores(cascade_env, server):
    client, _ = server
    body = _request(cascade_env)
    page = client.post("/explore", json=body)
    assert page.status_code == 200, page.text
    d = page.json()
    rec = client.post("/recommend", json=body).json()
    assert [s["name"] for s in d["stages"]] == ["retrieval", "prerank", "fusion", "rerank"]
    assert {f["stage"]: f["size"] for f in d["funnel"]} == rec["sizes"]
    assert set(d["request"]) >= {"user_id", "time_ms", "tab", "hour", "count"}
    assert d["request"]["tab"] == body["context"]["tab"] and d["request"]["time_ms"] == body["time_ms"]
    stages = {s["name"]: s for s in d["stages"]}
    final = [r["item_id"] for r in stages["rerank"]["rows"]]
    assert final == [it["item_id"] for it in rec["items"]] and len(final) == SIZES.serve
    for name, size in (("retrieval", rec["sizes"]["retrieval"]), ("prerank", rec["sizes"]["prerank"]),
                       ("fusion", rec["sizes"]["fusion"]), ("rerank", rec["sizes"]["rerank"])):
        st = stages[name]
        assert st["size"] == size and st["shown"] == len(st["rows"]) <= size
        ranks = [r["rank"] for r in st["rows"]]
        assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
        # the top rows, then every served item further down, each with its rank in the served list
        assert ranks[:min(100, size)] == list(range(1, min(100, size) + 1))
        served_rows = {r["item_id"]: r["final_rank"] for r in st["rows"] if r["final_rank"]}
        assert served_rows == {item: k + 1 for k, item in enumerate(final)}, name
        keys = {c["key"] for c in st["columns"]}
        assert all(keys <= set(r) for r in st["rows"]), name
    ret = stages["retrieval"]
    ch = ret["channels"]
    assert ch["ann"] + ch["popular"] == ret["size"] and ch["popular"] > 0
    assert all((r["channel"] == "popular") == (r["cosine"] is None) for r in ret["rows"])
    assert sum(r["kept"] for r in ret["rows"]) <= rec["sizes"]["prerank"]
    pre = [r["prerank"] for r in stages["prerank"]["rows"]]
    fused = [r["fused"] for r in stages["fusion"]["rows"]]
    assert pre == sorted(pre, reverse=True) and fused == sorted(fused, reverse=True)
    assert sum(r["in_pool"] for r in stages["prerank"]["rows"]) == rec["sizes"]["fusion"]
    for row, item in zip(stages["rerank"]["rows"], rec["items"]):  # the same scores as /recommend
        assert row["fused"] == pytest.approx(item["scores"]["fusion"], rel=1e-6)
        assert row["p_is_click"] == pytest.approx(item["scores"]["p_click"], rel=1e-6)
        assert 0 <= row["p_long_view"] <= 1 and row["watch_s"] >= 0


def test_served_items_carry_the_video_tables_features(cascade_env, server):
    client, _ = server
    d = client.post("/explore", json=_request(cascade_env, 1)).json()
    rows = d["stages"][-1]["rows"]
    videos = cascade_env.parts.videos.filter(pl.col("video_id").is_in([r["item_id"] for r in rows]))
    by_id = {v["video_id"]: v for v in videos.iter_rows(named=True)}
    assert len(by_id) == len(rows)
    for r in rows:
        v = by_id[r["item_id"]]
        assert (r["tag"], r["author_id"], r["video_type"]) == (v["tag"], v["author_id"], v["video_type"])
        assert r["duration_s"] == pytest.approx(v["video_duration"] / 1000.0, abs=1e-3)


def test_history_is_the_logged_events_before_the_request(cascade_env, server):
    client, _ = server
    body = _request(cascade_env, 2)
    d = client.post("/explore", json=body).json()
    log = (cascade_env.parts.history_log
           .filter((pl.col("user_id") == body["user_id"]) & (pl.col("time_ms") < body["time_ms"]))
           .sort("time_ms", maintain_order=True).tail(HISTORY_LEN).reverse())
    events = d["history"]["events"]
    assert d["history"]["length"] == len(events) == log.height > 0 and d["history"]["max_len"] == HISTORY_LEN
    assert [e["item_id"] for e in events] == log.get_column("video_id").to_list()
    assert [e["time_ms"] for e in events] == log.get_column("time_ms").to_list()  # exact, not float32 gaps
    actions = [[a for a in ACTION_FIELDS if a in log.columns and row[a]] for row in log.iter_rows(named=True)]
    assert [e["actions"] for e in events] == actions
    play_s = log.get_column("play_time_ms").to_numpy() / 1000
    np.testing.assert_allclose([e["play_s"] for e in events], play_s, atol=1e-3)
    assert all(e["ago_s"] > 0 for e in events) and not d["cold_start"] and d["known_user"]


def test_feedback_shows_up_first_in_the_next_history(cascade_env, server):
    client, _ = server
    body = _request(cascade_env, 3)
    before = client.post("/explore", json=body).json()
    item = before["stages"][-1]["rows"][0]["item_id"]
    event = {"event_id": "explore-fb-1", "user_id": body["user_id"], "item_id": item,
             "time_ms": body["time_ms"] - 5, "is_click": 1, "is_like": 1, "play_time_ms": 12_345}
    assert client.post("/feedback", json={"events": [event]}).status_code == 200
    after = client.post("/explore", json=body).json()
    top = after["history"]["events"][0]
    assert (top["item_id"], top["time_ms"], top["actions"], top["play_s"]) == \
        (item, body["time_ms"] - 5, ["is_click", "is_like"], 12.345)
    assert item not in [r["item_id"] for r in after["stages"][-1]["rows"]]  # never served again


def test_a_cold_start_user_has_no_history_and_a_popular_list(cascade_env, server):
    client, _ = server
    new_user = int(cascade_env.parts.users.get_column("user_id").max()) + 1000
    t = int(cascade_env.requests["time_ms"][0])
    d = client.post("/explore", json={"user_id": new_user, "time_ms": t}).json()
    assert d["cold_start"] and not d["known_user"] and d["history"] == {"length": 0, "max_len": HISTORY_LEN,
                                                                         "events": []}
    assert len(d["stages"][-1]["rows"]) == SIZES.serve


def test_max_per_stage_lists_the_top_and_every_served_item(cascade_env):
    backend = CascadeBackend(cascade_env.cascade0)
    req = RecommendRequest.model_validate({**_request(cascade_env), "request_id": "r1"})
    d = backend.explore(req, max_per_stage=3)
    for st in d["stages"]:
        top = [r for r in st["rows"] if r["rank"] <= 3]
        below = [r for r in st["rows"] if r["rank"] > 3]
        assert len(top) == min(3, st["size"]) and all(r["final_rank"] for r in below), st["name"]
    assert d["request"]["request_id"] == "r1"
    with pytest.raises(ConfigError, match="max_per_stage"):
        backend.explore(req, max_per_stage=0)
    c = cascade_env.cascade0
    out = c.recommend(*[a[:1] for a in cascade_env.args()])
    with pytest.raises(ConfigError, match="detail=True"):
        explore_payload(c, out, {"user_id": 1, "time_ms": 1}, ItemCatalog(c))


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("body, field", [
    ({"user_id": "abc"}, "user_id"), ({"user_id": -3}, "user_id"), ({}, "user_id"),
    ({"user_id": 1, "count": 0}, "count"), ({"user_id": 1, "context": {"hour": 24}}, "context.hour"),
    ({"user_id": 1, "colour": "red"}, "colour"), ({"user_id": 1, "time_ms": "now"}, "time_ms"),
])
def test_bad_requests_get_422_naming_the_field(server, body, field):
    client, _ = server
    r = client.post("/explore", json=body)
    assert r.status_code == 422 and r.json()["error"] == "validation"
    assert r.json()["fields"][0]["field"] == field and r.json()["message"].startswith(field)


def test_explore_routes_need_a_backend_that_explores(server, tmp_path):
    client, _ = server
    assert client.get("/explore").status_code == 405 and client.post("/explorer").status_code == 405
    assert client.get("/explorer", params={"x": 1}).json()["fields"][0]["field"] == "x"
    with background_server(create_app(RuleBackend(), ServiceConfig(log_dir=str(tmp_path)))) as url:
        for method, path in (("POST", "/explore"), ("GET", "/explorer")):
            r = httpx.request(method, url + path, json={"user_id": 1} if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path


def test_the_page_is_self_contained_and_packaged(server):
    client, _ = server
    r = client.get("/explorer")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert html == explorer_page() and 'id="user-id"' in html and 'id="explore"' in html
    # nothing fetched from elsewhere: no external URLs in src/href/url()/fetch, no imports
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//|@import|<script[^>]+src=", html, re.I)
    assert re.findall(r"fetch\(\"([^\"]+)\"", html) == ["explore", "healthz"]
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*.html" in data["funnelrec.serving"]
