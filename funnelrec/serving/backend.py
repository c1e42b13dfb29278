"""The interface between the HTTP service and whatever computes recommendations.

The service (``funnelrec.serving.app``) knows nothing about models: it validates requests, makes feedback
durable and calls a :class:`ServingBackend`. The cascade of ``funnelrec.serving.cascade`` (retrieval →
pre-ranking → ranking → fusion → re-ranking over a model bundle) is the production backend; tests use a tiny
rule-based one.

Call order the service guarantees:

1. at start-up, before the first request is served, ``observe(events)`` with every logged event, in log order,
   each ``event_id`` exactly once (possibly in several calls);
2. ``recommend(request)`` concurrently from several threads;
3. ``observe(new_events)`` after each ``/feedback`` request's new events are fsynced to the log, one call at a
   time and in log order (duplicates already removed), from a worker thread while ``recommend`` calls may be
   running.

So a backend must be thread-safe between ``recommend`` and ``observe`` (``LiveTimelines`` of
``funnelrec.serving.history`` is), and the next ``recommend`` of a user must see that user's feedback: key any
cached per-user state by ``LiveTimelines.version(user_id)``.

This interface is ours.

Example:
    >>> from funnelrec.serving.schemas import RecommendRequest, RecommendResponse
    >>> class Empty:
    ...     def recommend(self, request):
    ...         return RecommendResponse(user_id=request.user_id, request_id=request.request_id, items=[])
    ...     def observe(self, events): pass
    ...     def describe(self): return {"name": "empty"}
    ...     def known_item(self, item_id): return True
    ...     def known_user(self, user_id): return False
    >>> isinstance(Empty(), ServingBackend)
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from funnelrec.serving.schemas import FeedbackEvent, RecommendRequest, RecommendResponse

__all__ = ["ServingBackend"]


@runtime_checkable
class ServingBackend(Protocol):
    """What the HTTP service needs from a recommender (see the module doc for the call order)."""

    def recommend(self, request: "RecommendRequest") -> "RecommendResponse":
        """Serve one request.

        Args:
            request: validated; ``request.request_id`` is always set (by the client or the service) and must
                be echoed in the response; ``request.count`` ≤ the service's ``max_count``;
                ``request.time_ms`` None means now.

        Returns:
            A :class:`~funnelrec.serving.schemas.RecommendResponse` with at most ``count`` items ranked 1, 2,
            …, each with its per-stage scores, and per-stage ``timings_ms`` and ``sizes``; ``cold_start`` True
            when the user has no history. An unknown user is a cold-start request, not an error.

        Raises:
            funnelrec.errors.DataError: the request cannot be served as asked (the service answers 422 naming
                ``err.column`` as the field); anything else is a 500.
        """
        ...

    def observe(self, events: "list[FeedbackEvent]") -> None:
        """Apply durable feedback events to the real-time state (histories, counters); each event once."""
        ...

    def describe(self) -> dict:
        """JSON-serialisable facts for ``/healthz``: at least ``name``; model versions, sizes."""
        ...

    def known_item(self, item_id: int) -> bool:
        """Whether ``item_id`` exists in the catalogue (feedback on an unknown item is refused with a 422)."""
        ...

    def known_user(self, user_id: int) -> bool:
        """Whether the user has any history (unknown users are served as cold starts)."""
        ...
