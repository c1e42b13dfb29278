"""Closed-loop sessions: a cascade (or a baseline) serving the simulated world's users, page after page.

The world's own session loop (``World.run_sessions``) asks a policy for each page (``select``) and reports the
page's sampled feedback (``observe``); the policies here append that feedback to the cascade's live histories,
so every next request reads it — the loop a deployed system runs. Used by ``funnelrec bench cascade`` and by the
closed-loop tuning of the cascade's fusion weights (:func:`funnelrec.serving.build.tune_fusion_closed_loop`).

Requests carry the end of the session day as their time (every event appended so far is then strictly earlier),
hour 20 (sessions start between 19:00 and 20:00) and tab 1.

Example:
    >>> policy = CascadePolicy(cascade, world, day=world.cfg.days, oracle_top=10)          # doctest: +SKIP
    >>> run_sessions(world, policy, users, day=world.cfg.days, seed=0)["watch_s"]          # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, long_view_rule
from funnelrec.serving.cascade import STAGES, Cascade

__all__ = ["CascadePolicy", "PopularityPolicy", "LiveFeedback", "run_sessions", "request_time_ms", "SURVIVAL_STAGES"]

#: Stages whose kept candidates are checked against the oracle's top list (``Cascade`` stage names).
SURVIVAL_STAGES = ("retrieval", "prerank", "fusion", "rerank")
REQUEST_HOUR = 20
REQUEST_TAB = 1


def request_time_ms(day: int) -> int:
    """The time every closed-loop request of ``day`` carries: the end of that day."""
    return KUAIRAND_START_MS + (day + 1) * DAY_MS


class LiveFeedback:
    """Appends the world's page records to a cascade's live histories (the closed loop)."""

    def __init__(self, cascade: Cascade, world):
        self.cascade = cascade
        self.user_ids = world.population.user_id
        self.video_ids = torch.from_numpy(world.catalog.videos["video_id"].to_numpy().astype(np.int64))
        # item index (video_id + 1) -> catalogue row of the world (-1 for indices without a video)
        size = max(int(self.video_ids.max()) + 2, cascade.num_items)
        self.to_catalog = torch.full((size,), -1, dtype=torch.int64)
        self.to_catalog[self.video_ids + 1] = torch.arange(self.video_ids.shape[0])

    def observe(self, page: dict) -> None:
        items = page["items"]
        b, m = items.shape
        play = page["play_ms"].long()
        click = page["click"].bool()
        frame = pl.DataFrame({
            "user_id": self.user_ids[page["user"]].repeat_interleave(m).numpy(),
            "video_id": self.video_ids[items].reshape(-1).numpy(),
            "time_ms": page["time"].repeat_interleave(m).numpy(),
            "is_click": click.reshape(-1).long().numpy(),
            "long_view": (click & long_view_rule(play, page["duration"].long())).reshape(-1).long().numpy(),
            **{col: page[key].reshape(-1).long().numpy()
               for col, key in (("is_like", "like"), ("is_follow", "follow"), ("is_comment", "comment"),
                                ("is_forward", "forward"), ("is_hate", "hate"))},
            "play_time_ms": play.reshape(-1).numpy(),
        })
        self.cascade.history.append(frame)


class CascadePolicy(LiveFeedback):
    """A world policy served by the cascade (``select`` / ``observe``), counting the oracle top-10 survival.

    Args:
        cascade: the trained cascade.
        world: the world (ids, catalogue, oracle).
        day: the session day.
        oracle_top: size of the oracle list whose survival is counted (0 = do not count: no oracle calls).
    """

    def __init__(self, cascade: Cascade, world, day: int, oracle_top: int = 10):
        super().__init__(cascade, world)
        self.world = world
        self.day = day
        self.request_ms = request_time_ms(day)
        self.oracle_top = oracle_top
        self.page_size = world.cfg.sessions.page_size
        self.seen_users = torch.zeros(world.population.num_users, dtype=torch.bool)
        self.survived = {s: 0.0 for s in SURVIVAL_STAGES}
        self.first_requests = 0
        self.timings = {s: 0.0 for s in STAGES}
        self.requests = 0

    def _oracle_top(self, user: Tensor, hist_items: Tensor) -> Tensor:
        """[B, top] item indices of the oracle's top by true expected watch time (history window excluded)."""
        w = self.world
        items = torch.arange(w.catalog.num_items)
        chunk = max(1, 1_000_000 // max(1, user.shape[0]))
        values = []
        for lo in range(0, items.shape[0], chunk):
            part = items[lo: lo + chunk]
            grid = part.expand(user.shape[0], -1).reshape(-1, 1)
            uu = user.repeat_interleave(part.shape[0])
            value = w.oracle.expected_watch_time(uu, grid, tab=REQUEST_TAB, day=self.day)
            values.append(value.view(user.shape[0], -1))
        value = torch.cat(values, 1)
        item_index = self.video_ids + 1  # [I_cat]
        seen = (item_index.view(1, -1, 1) == hist_items.unsqueeze(1)).any(-1)
        return item_index[value.masked_fill(seen, float("-inf")).topk(self.oracle_top, dim=1).indices]

    def select(self, user, g):
        uid = self.user_ids[user].numpy()
        b = len(uid)
        out = self.cascade.recommend(uid, np.full(b, self.request_ms), np.full(b, REQUEST_TAB),
                                     np.full(b, REQUEST_HOUR), count=self.page_size)
        first = ~self.seen_users[user]
        if self.oracle_top > 0 and first.any():
            rows = torch.nonzero(first).squeeze(1)
            hist = self.cascade.history.history(uid[rows.numpy()], np.full(len(rows), self.request_ms),
                                                self.cascade.history_len)
            top = self._oracle_top(user[rows], hist.items)
            for stage in SURVIVAL_STAGES:
                kept = out.stage_items[stage][rows]
                hit = (top.unsqueeze(-1) == kept.unsqueeze(1)).any(-1).float().mean(1)
                self.survived[stage] += float(hit.sum())
            self.first_requests += len(rows)
            self.seen_users[user[rows]] = True
        for s in STAGES:
            self.timings[s] += out.timings_ms[s]
        self.requests += b
        items = torch.from_numpy(out.items + 1)  # video id -> item index (0 where missing)
        catalog = self.to_catalog[items.clamp(min=0)]
        fallback = self.world.logging_policy.popular(b, self.page_size, g)
        catalog = torch.where(catalog >= 0, catalog, fallback)
        return catalog, torch.zeros(b, self.page_size, dtype=torch.bool)


class PopularityPolicy(LiveFeedback):
    """The most popular items (the cascade's training popularity) the user has not seen in the history window
    or this session (live histories, as the cascade)."""

    def __init__(self, cascade: Cascade, world, day: int):
        super().__init__(cascade, world)
        self.request_ms = request_time_ms(day)
        self.page_size = world.cfg.sessions.page_size
        n = cascade.history_len + 64 * self.page_size
        self.top = cascade.popular_items[:n]

    def select(self, user, g):
        uid = self.user_ids[user].numpy()
        b = len(uid)
        hist = self.cascade.history.history(uid, np.full(b, self.request_ms), self.cascade.history_len)
        cand = self.top.expand(b, -1)
        fresh = ~(cand.unsqueeze(-1) == hist.items.unsqueeze(1)).any(-1)
        key = torch.where(fresh, torch.arange(cand.shape[1]).expand(b, -1), torch.full_like(cand, 1 << 30))
        pick = cand.gather(1, key.topk(self.page_size, dim=1, largest=False).indices)
        catalog = self.to_catalog[pick]
        return catalog, torch.zeros(b, self.page_size, dtype=torch.bool)


def run_sessions(world, policy, users: Tensor, day: int, seed: int) -> dict[str, float]:
    """One session of each user under ``policy``; mean watch seconds, pages, distinct items served."""
    g = torch.Generator().manual_seed(1_000 + seed)
    n = users.shape[0]
    start = (KUAIRAND_START_MS + day * DAY_MS + (REQUEST_HOUR - 1) * 3_600_000
             + (torch.rand(n, generator=g) * 3_600_000).long())
    horizon = KUAIRAND_START_MS + (day + 1) * DAY_MS
    available = world.available_items(day)
    if hasattr(policy, "set_available"):
        policy.set_available(available)
    pages: list[dict] = []
    world.run_sessions(users, start, torch.arange(n), day, policy, g, pages, horizon)
    session = torch.cat([p["session"] for p in pages])
    play = torch.cat([p["play_ms"].sum(1) for p in pages]).double() / 1000
    watch = torch.zeros(n, dtype=torch.float64).index_add_(0, session, play)
    length = torch.bincount(session, minlength=n).float()
    served = torch.cat([p["items"].reshape(-1) for p in pages])
    return {"watch_s": float(watch.mean()), "pages": float(length.mean()),
            "coverage": float(served.unique().numel() / int(available.sum()))}
