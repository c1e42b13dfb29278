"""``CascadeBackend``: the production ``ServingBackend`` — the HTTP service's requests served by the cascade.

It maps a validated ``RecommendRequest`` to one cascade call (B = 1; the request's time, tab and hour — the
server's clock and the hour of that time in the log's clock (Beijing time, as ``hourmin``) where absent, tab 1
where absent) and its ``CascadeResult`` back to the response JSON; ``observe`` appends feedback to the cascade's
live histories, so the user's next request reads it. ``explore`` serves the same request with every stage's
candidates and scores (the funnel explorer, ``funnelrec.serving.explorer``).

Example:
    >>> backend = CascadeBackend(load_bundle("bundles/demo"))                      # doctest: +SKIP
    >>> serve(backend, ServiceConfig(port=8000))                                   # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np

from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS
from funnelrec.serving.cascade import Cascade
from funnelrec.serving.history import events_frame
from funnelrec.serving.schemas import RecommendedItem, RecommendResponse

__all__ = ["CascadeBackend", "DEFAULT_TAB", "hour_of"]

#: Tab of a request that names none (KuaiRand's main feed).
DEFAULT_TAB = 1


def hour_of(time_ms: int) -> int:
    """Hour of day of an epoch-ms time in the log's clock (Beijing time, as KuaiRand's ``hourmin``)."""
    return int((int(time_ms) - KUAIRAND_START_MS) % DAY_MS // 3_600_000)


class CascadeBackend:
    """Serve ``RecommendRequest``s with a :class:`~funnelrec.serving.cascade.Cascade`.

    Args:
        cascade: the cascade (e.g. ``load_bundle(path)``).
        clock_ms: returns "now" in epoch milliseconds for requests without ``time_ms``.
    """

    def __init__(self, cascade: Cascade, clock_ms=None):
        self.cascade = cascade
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._catalog = None

    def _args(self, request) -> tuple[int, int, int, int]:
        """(time_ms, tab, hour, count) of a request, defaults filled in."""
        t = request.time_ms if request.time_ms is not None else self.clock_ms()
        ctx = request.context
        tab = ctx.tab if ctx.tab is not None else DEFAULT_TAB
        hour = ctx.hour if ctx.hour is not None else hour_of(t)
        return t, tab, hour, min(request.count, self.cascade.sizes.pool)

    def recommend(self, request) -> RecommendResponse:
        t, tab, hour, count = self._args(request)
        out = self.cascade.recommend([request.user_id], [t], [tab], [hour], count=count)
        items = []
        for rank, item in enumerate(out.items[0].tolist(), start=1):
            if item < 0:
                break
            scores = {k: float(v[0, rank - 1]) for k, v in out.scores.items()
                      if np.isfinite(v[0, rank - 1])}
            items.append(RecommendedItem(item_id=int(item), rank=rank, scores=scores))
        return RecommendResponse(user_id=request.user_id, request_id=request.request_id or "", items=items,
                                 timings_ms=out.timings_ms, sizes=out.sizes, cold_start=bool(out.cold_start[0]))

    def explore(self, request, max_per_stage: int = 100) -> dict:
        """The request served with ``detail=True``, as the funnel explorer's JSON
        (:func:`~funnelrec.serving.explorer.explore_payload`): history, every stage's candidates (the first
        ``max_per_stage`` and any served item below them) with their scores, the served list with its item
        features.
        """
        from funnelrec.serving.explorer import ItemCatalog, explore_payload

        if self._catalog is None:
            self._catalog = ItemCatalog(self.cascade)  # built once; a concurrent first call builds it twice
        t, tab, hour, count = self._args(request)
        out = self.cascade.recommend([request.user_id], [t], [tab], [hour], count=count, detail=True)
        asked = {"user_id": request.user_id, "request_id": request.request_id, "time_ms": int(t),
                 "tab": int(tab), "hour": int(hour), "count": int(count)}
        return explore_payload(self.cascade, out, asked, self._catalog, max_per_stage=max_per_stage)

    def observe(self, events) -> None:
        if not events:
            return
        self.cascade.history.append(events_frame(events))

    def describe(self) -> dict:
        c = self.cascade
        return {"name": c.metadata.get("name", "cascade"), **{k: v for k, v in c.metadata.items() if k != "name"},
                "items": c.num_items - 1, "sizes": {"retrieve": c.sizes.retrieve, "prerank": c.sizes.prerank,
                                                    "pool": c.sizes.pool, "serve": c.sizes.serve},
                "recent_events": c.history.num_recent}

    def known_item(self, item_id: int) -> bool:
        return self.cascade.known_item(item_id)

    def known_user(self, user_id: int) -> bool:
        return self.cascade.known_user(user_id)
