"""The JSON contract: strict, closed request models; limits; agreement with the data schema."""

import numpy as np
import pytest
from pydantic import ValidationError

from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.data.schema import NUM_TABS as DATA_NUM_TABS
from funnelrec.serving.schemas import (ACTION_FIELDS, DEFAULT_MAX_COUNT, NUM_TABS, FeedbackEvent,
                                       FeedbackRequest, RecommendRequest, RecommendResponse, bounded_models)


def _locs(err: ValidationError) -> list[tuple]:
    return [tuple(e["loc"]) for e in err.errors()]


def _event(**kw):
    return {"event_id": "e1", "user_id": 1, "item_id": 2, "time_ms": 3, **kw}


def test_constants_match_the_data_schema():
    assert NUM_TABS == DATA_NUM_TABS
    assert ACTION_FIELDS == ACTION_COLUMNS
    assert all(name in FeedbackEvent.model_fields for name in ACTION_FIELDS)


def test_recommend_request_defaults_and_nested_models():
    req = RecommendRequest.model_validate({"user_id": 5})
    assert (req.count, req.context.tab, req.context.hour, req.device_state, req.time_ms, req.request_id) == \
        (10, None, None, None, None, None)
    req = RecommendRequest.model_validate({
        "user_id": 5, "count": 3, "context": {"tab": 14, "hour": 0},
        "device_state": {"network": "4g", "bandwidth_mbps": 2, "battery": 0.5, "charging": False,
                         "recent_stalls": 1}})
    assert req.device_state.bandwidth_mbps == 2.0 and req.device_state.network == "4g"


@pytest.mark.parametrize("body, loc", [
    ({"user_id": "5"}, ("user_id",)),
    ({"user_id": -1}, ("user_id",)),
    ({"user_id": 1.5}, ("user_id",)),
    ({"user_id": True}, ("user_id",)),
    ({}, ("user_id",)),
    ({"user_id": 1, "count": "3"}, ("count",)),
    ({"user_id": 1, "count": 0}, ("count",)),
    ({"user_id": 1, "count": DEFAULT_MAX_COUNT + 1}, ("count",)),
    ({"user_id": 1, "colour": "red"}, ("colour",)),
    ({"user_id": 1, "context": {"tab": NUM_TABS}}, ("context", "tab")),
    ({"user_id": 1, "context": {"hour": 24}}, ("context", "hour")),
    ({"user_id": 1, "context": {"weekday": 2}}, ("context", "weekday")),
    ({"user_id": 1, "device_state": {"network": "carrier-pigeon"}}, ("device_state", "network")),
    ({"user_id": 1, "device_state": {"battery": 1.5}}, ("device_state", "battery")),
    ({"user_id": 1, "device_state": {"charging": 1}}, ("device_state", "charging")),
    ({"user_id": 1, "request_id": "has space"}, ("request_id",)),
    ({"user_id": 1, "request_id": "x" * 65}, ("request_id",)),
])
def test_recommend_request_rejects(body, loc):
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate(body)
    assert loc in _locs(info.value)


@pytest.mark.parametrize("event, loc", [
    (_event(is_click=2), ("is_click",)),
    (_event(is_click=True), ("is_click",)),
    (_event(long_view="1"), ("long_view",)),
    (_event(play_time_ms=-1), ("play_time_ms",)),
    (_event(event_id=""), ("event_id",)),
    (_event(event_id="a/b"), ("event_id",)),
    (_event(event_id="x" * 129), ("event_id",)),
    (_event(item_id=-3), ("item_id",)),
    (_event(unknown=1), ("unknown",)),
    ({"user_id": 1, "item_id": 2, "time_ms": 3}, ("event_id",)),
])
def test_feedback_event_rejects(event, loc):
    with pytest.raises(ValidationError) as info:
        FeedbackEvent.model_validate(event)
    assert loc in _locs(info.value)


def test_feedback_event_round_trip_and_actions():
    ev = FeedbackEvent.model_validate(_event(is_like=1, is_hate=1, play_time_ms=1234, request_id="r:1"))
    assert ev.actions() == (0, 0, 1, 0, 0, 0, 1)
    assert FeedbackEvent.model_validate_json(ev.model_dump_json()) == ev


def test_feedback_request_bounds():
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate({"events": []})
    assert ("events",) in _locs(info.value)
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate({"events": [_event(), _event(is_click=5)]})
    assert ("events", 1, "is_click") in _locs(info.value)


def test_bounded_models_apply_service_limits():
    rec, fb = bounded_models(max_count=3, max_events=2)
    assert issubclass(rec, RecommendRequest) and issubclass(fb, FeedbackRequest)
    assert rec.model_validate({"user_id": 1}).count == 3  # the default is capped by the limit
    assert rec.model_validate({"user_id": 1, "count": 3}).count == 3
    with pytest.raises(ValidationError):
        rec.model_validate({"user_id": 1, "count": 4})
    fb.model_validate({"events": [_event(), _event(event_id="e2")]})
    with pytest.raises(ValidationError):
        fb.model_validate({"events": [_event(event_id=f"e{i}") for i in range(3)]})
    with pytest.raises(ValueError, match="max_count"):
        bounded_models(max_count=0)


def test_response_accepts_numpy_scalars():
    resp = RecommendResponse.model_validate({
        "user_id": np.int64(1), "request_id": "r",
        "items": [{"item_id": np.int64(4), "rank": 1, "scores": {"ranking": np.float32(0.25)}}],
        "timings_ms": {"ranking": np.float64(1.5)}, "sizes": {"ranking": np.int64(1)}})
    assert resp.items[0].scores["ranking"] == 0.25
    assert isinstance(resp.model_dump_json(), str)


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, funnelrec.serving as s; assert 'LiveTimelines' in s.__all__; s.FeedbackEvent; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
