"""The JSON contract of the HTTP service: requests, responses and feedback events (pydantic v2).

Every *request* model is strict and closed (``extra="forbid"``, ``strict=True``): an unknown field, a string
where an integer belongs (``"5"``), a boolean where a 0/1 flag belongs (``true``) or a number out of range is
a validation error naming the field, never a silent coercion. *Response* models are closed but lax, so that a
backend may fill them with numpy scalars.

The models follow the funnel's request contract of DESIGN §5 (user id, context = tab and hour, device/network
state) and the KuaiRand log schema for feedback (``funnelrec.data.schema``: the action flags of
``funnelrec.data.objectives.ACTION_COLUMNS``, ``play_time_ms``, ``time_ms`` in epoch milliseconds, items named
by their ``video_id``). All of it is ours; no paper specifies a wire format.

The limits of a running service (``count`` ≤ ``max_count``, at most ``max_events`` events per POST) are set
per app by :func:`bounded_models`, which returns subclasses with the tighter bounds; the classes here carry
the defaults (200 and 1,000).

Example:
    >>> req = RecommendRequest.model_validate({"user_id": 7, "count": 5, "context": {"tab": 1, "hour": 20}})
    >>> req.count, req.context.hour, req.device_state is None
    (5, 20, True)
    >>> ev = FeedbackEvent(event_id="e-1", user_id=7, item_id=42, time_ms=1_700_000_000_000, is_click=1)
    >>> ev.actions()
    (1, 0, 0, 0, 0, 0, 0)
    >>> from pydantic import ValidationError
    >>> try:
    ...     RecommendRequest.model_validate({"user_id": "7", "colour": "red"})
    ... except ValidationError as err:
    ...     print([(e["loc"], e["type"]) for e in err.errors()])
    [(('user_id',), 'int_type'), (('colour',), 'extra_forbidden')]
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ACTION_FIELDS", "DEFAULT_MAX_COUNT", "DEFAULT_MAX_EVENTS", "NETWORKS", "NUM_TABS", "Context",
    "DeviceState", "FeedbackEvent", "FeedbackRequest", "FeedbackResponse", "RecommendRequest",
    "RecommendResponse", "RecommendedItem", "bounded_models",
]

#: Default upper bound of ``RecommendRequest.count``.
DEFAULT_MAX_COUNT = 200
#: Default upper bound of the number of events in one ``FeedbackRequest``.
DEFAULT_MAX_EVENTS = 1000
#: KuaiRand tabs (scenarios): ``tab`` ∈ [0, NUM_TABS); equal to ``funnelrec.data.schema.NUM_TABS`` (tested).
NUM_TABS = 15
#: The 0/1 action flags of a feedback event, in the channel order of ``data.objectives.ACTION_COLUMNS``.
ACTION_FIELDS: tuple[str, ...] = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward",
                                  "is_hate")
#: Network kinds a client may report in ``DeviceState.network``.
NETWORKS = ("wifi", "5g", "4g", "3g", "2g", "offline")

_INT64_MAX = 2**63 - 1
_ID_PATTERN = r"^[A-Za-z0-9._:\-]+$"
_STRICT = ConfigDict(extra="forbid", strict=True)
_LAX = ConfigDict(extra="forbid")


class Context(BaseModel):
    """Request context (DESIGN §5): the surface and the local hour.

    Args:
        tab: the KuaiRand tab (scenario) the request comes from, in [0, 15); None = unknown.
        hour: local hour of day in [0, 23]; None = unknown (the server does not guess).
    """

    model_config = _STRICT
    tab: int | None = Field(None, ge=0, lt=NUM_TABS)
    hour: int | None = Field(None, ge=0, le=23)


class DeviceState(BaseModel):
    """What the client device reports about itself (used by on-device gating and stall-aware serving).

    Args:
        network: one of ``NETWORKS`` or None.
        bandwidth_mbps: measured downlink bandwidth in Mbit/s (the simulator's network extension uses the same
            unit), in [0, 100000].
        battery: battery level as a fraction in [0, 1].
        charging: whether the device is charging.
        recent_stalls: playback stalls in the current session so far (≥ 0).
    """

    model_config = _STRICT
    network: Literal["wifi", "5g", "4g", "3g", "2g", "offline"] | None = None
    bandwidth_mbps: float | None = Field(None, ge=0, le=100_000)
    battery: float | None = Field(None, ge=0, le=1)
    charging: bool | None = None
    recent_stalls: int | None = Field(None, ge=0, le=1_000_000)


class RecommendRequest(BaseModel):
    """``POST /recommend``: one user's request for ``count`` items.

    Args:
        user_id: the user (≥ 0). A user the backend has never seen is a valid cold-start request.
        count: items wanted, in [1, max_count] (default 10).
        context: tab and hour (both optional).
        device_state: optional device/network state.
        time_ms: request time in epoch milliseconds; None = the server's clock. The user's history holds only
            events strictly before it (the no-leakage rule of DESIGN §5), which lets logged requests be
            replayed.
        request_id: optional client-chosen id (letters, digits, ``._:-``; ≤ 64 chars), echoed in the response
            and meant to be sent back in feedback events; the service assigns one when it is missing.
    """

    model_config = _STRICT
    user_id: int = Field(ge=0, le=_INT64_MAX)
    count: int = Field(10, ge=1, le=DEFAULT_MAX_COUNT)
    context: Context = Field(default_factory=Context)
    device_state: DeviceState | None = None
    time_ms: int | None = Field(None, ge=0, le=_INT64_MAX)
    request_id: str | None = Field(None, min_length=1, max_length=64, pattern=_ID_PATTERN)


class RecommendedItem(BaseModel):
    """One served item: its id (``video_id``), its 1-based rank and its score at every stage it passed."""

    model_config = _LAX
    item_id: int
    rank: int = Field(ge=1)
    scores: dict[str, float] = Field(default_factory=dict)


class RecommendResponse(BaseModel):
    """The answer to ``POST /recommend``.

    Args:
        user_id: echoed.
        request_id: the request's id (send it back in feedback events).
        items: the served list, best first (``rank`` 1, 2, …).
        timings_ms: wall time of every stage in milliseconds (e.g. retrieval, prerank, ranking, fusion,
            rerank).
        sizes: candidates leaving every stage.
        cold_start: True when the backend knew nothing about the user (no history, base or real-time).
        served_from: with the result cache (``funnelrec.serving.result_cache``): ``"cascade"`` when the list
            was computed for this request, ``"cache"`` when it came from the user's cached next items (degrade
            mode); None from a backend without the cache.
    """

    model_config = _LAX
    user_id: int
    request_id: str
    items: list[RecommendedItem]
    timings_ms: dict[str, float] = Field(default_factory=dict)
    sizes: dict[str, int] = Field(default_factory=dict)
    cold_start: bool = False
    served_from: Literal["cache", "cascade"] | None = None


class FeedbackEvent(BaseModel):
    """One impression and what the user did with it (KuaiRand log columns).

    Args:
        event_id: client-chosen unique id (letters, digits, ``._:-``; 1–128 chars): the de-duplication key. An
            event whose id the service has already logged is acknowledged again but not re-applied.
        user_id, item_id: the user and the item (``video_id``), ≥ 0.
        time_ms: when the impression happened, epoch milliseconds.
        request_id: the ``/recommend`` response that served it, if any.
        is_click, long_view, is_like, is_follow, is_comment, is_forward, is_hate: 0/1 action flags (default
            0).
        play_time_ms: watch time in milliseconds, in [0, 86,400,000] (default 0).
    """

    model_config = _STRICT
    event_id: str = Field(min_length=1, max_length=128, pattern=_ID_PATTERN)
    user_id: int = Field(ge=0, le=_INT64_MAX)
    item_id: int = Field(ge=0, le=_INT64_MAX)
    time_ms: int = Field(ge=0, le=_INT64_MAX)
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=_ID_PATTERN)
    is_click: int = Field(0, ge=0, le=1)
    long_view: int = Field(0, ge=0, le=1)
    is_like: int = Field(0, ge=0, le=1)
    is_follow: int = Field(0, ge=0, le=1)
    is_comment: int = Field(0, ge=0, le=1)
    is_forward: int = Field(0, ge=0, le=1)
    is_hate: int = Field(0, ge=0, le=1)
    play_time_ms: int = Field(0, ge=0, le=86_400_000)

    def actions(self) -> tuple[int, ...]:
        """The action flags in ``ACTION_FIELDS`` order."""
        return tuple(getattr(self, name) for name in ACTION_FIELDS)


class FeedbackRequest(BaseModel):
    """``POST /feedback``: 1 to max_events events (all-or-nothing: one bad event rejects the request)."""

    model_config = _STRICT
    events: list[FeedbackEvent] = Field(min_length=1, max_length=DEFAULT_MAX_EVENTS)


class FeedbackResponse(BaseModel):
    """The answer to ``POST /feedback``, sent only once the new events are fsynced to the log.

    ``accepted`` events were new and are applied; ``duplicates`` had an event_id already logged (or repeated
    within the request) and were acknowledged without being applied again; ``accepted + duplicates`` = events
    sent.
    """

    model_config = _LAX
    accepted: int
    duplicates: int


def bounded_models(max_count: int = DEFAULT_MAX_COUNT, max_events: int = DEFAULT_MAX_EVENTS,
                   ) -> tuple[type[RecommendRequest], type[FeedbackRequest]]:
    """Request models with a service's own limits: subclasses, so a backend still sees a ``RecommendRequest``.

    Args:
        max_count: the largest ``count`` accepted (≥ 1).
        max_events: the most events in one feedback request (≥ 1).

    Example:
        >>> Rec, Fb = bounded_models(max_count=3)
        >>> issubclass(Rec, RecommendRequest), Rec.model_fields["count"].metadata[-1].le
        (True, 3)
    """
    for name, value in (("max_count", max_count), ("max_events", max_events)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    class BoundedRecommendRequest(RecommendRequest):
        __doc__ = RecommendRequest.__doc__
        count: int = Field(min(10, max_count), ge=1, le=max_count)

    class BoundedFeedbackRequest(FeedbackRequest):
        __doc__ = FeedbackRequest.__doc__
        events: list[FeedbackEvent] = Field(min_length=1, max_length=max_events)

    return BoundedRecommendRequest, BoundedFeedbackRequest
