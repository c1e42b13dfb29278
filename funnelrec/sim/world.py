"""The simulated world: users come back in sessions, see pages chosen by a policy, respond, and may leave.

One ``World`` = catalog (items) + population (users) + response model + logging policy + oracle, all derived
deterministically from a ``WorldConfig`` and its seed. ``World.simulate`` runs every session of every day in
vectorised batches (all sessions of the same per-user slot of a day advance together, page by page) and returns a
``SimLog`` whose ``log`` is in the KuaiRand log schema. What no real log has — the true probabilities of every
impression, satisfaction, questionnaire answers — goes to separate side tables that no model reads.

A session (DESIGN §3): satisfaction s starts near the user's baseline; after every examined impression
``s ← decay·s + (1 − decay)·r`` with r from watch ratio, like, follow, comment, forward, minus is_hate and minus
repetition of a tag or creator within the session window; after every page the user leaves with hazard
``sigmoid(leave_bias + leave_slope·(0.5 − s))``, and at the latest after ``max_pages`` pages (a documented cap).

Example:
    >>> w = World.from_profile("small")
    >>> sim = w.simulate(days=1, progress=False)
    >>> sim.log.columns[:5]
    ['user_id', 'video_id', 'date', 'hourmin', 'time_ms']
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, LOG_COLUMNS, long_view_rule
from funnelrec.sim.catalog import Catalog, _unit
from funnelrec.sim.config import WorldConfig, profile
from funnelrec.sim.extensions import Extensions
from funnelrec.sim.oracle import Oracle
from funnelrec.sim.policy import LoggingPolicy
from funnelrec.sim.population import Population
from funnelrec.sim.responses import PageState, ResponseModel
from funnelrec.utils.io import atomic_path

#: Share of sessions starting in each hour of the day (Beijing time): low at night, peaks at lunch and evening.
HOUR_WEIGHTS = torch.tensor([2.0, 1.2, 0.7, 0.4, 0.3, 0.4, 1.0, 2.0, 3.0, 3.5, 3.5, 3.8, 5.0, 5.0, 4.0, 3.6,
                             3.6, 4.0, 4.8, 5.8, 6.5, 6.8, 6.0, 4.0])
#: Oracle side-table columns, aligned row by row with the log.
ORACLE_COLUMNS = ("p_click", "p_long_view", "p_like", "p_follow", "p_comment", "p_forward", "p_hate", "e_play_ms",
                  "p_exam", "relevance")
SIM_VERSION = "world-v1"


@dataclass
class SimLog:
    """What a simulation produced.

    Args:
        log: interaction log in the KuaiRand schema (sorted by user_id, time_ms, display position).
        users: user-feature table of the simulated users (KuaiRand columns).
        videos: video-feature table of the corpus (KuaiRand columns).
        oracle: true probabilities per log row (``ORACLE_COLUMNS``) + session_id and satisfaction; never a feature.
        questionnaire: sparse satisfaction answers (user_id, video_id, time_ms, answer).
        extras: other side tables (network, server load, uploads), present when their extension is on.
        config: the world config that produced it.
    """

    log: pl.DataFrame
    users: pl.DataFrame
    videos: pl.DataFrame
    oracle: pl.DataFrame
    questionnaire: pl.DataFrame
    config: WorldConfig
    extras: dict[str, pl.DataFrame] = field(default_factory=dict)

    def write(self, out: str | Path) -> Path:
        """Write every table as Parquet into the folder ``out`` (atomically) and a ``world.json``."""
        out = Path(out)
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            self.log.write_parquet(tmp / "log.parquet", compression="zstd")
            self.users.write_parquet(tmp / "user_features.parquet", compression="zstd")
            self.videos.write_parquet(tmp / "video_features_basic.parquet", compression="zstd")
            side = tmp / "oracle"
            side.mkdir()
            self.oracle.write_parquet(side / "oracle.parquet", compression="zstd")
            self.questionnaire.write_parquet(side / "questionnaire.parquet", compression="zstd")
            for name, frame in self.extras.items():
                frame.write_parquet(side / f"{name}.parquet", compression="zstd")
            meta = {"sim_version": SIM_VERSION, "config": self.config.to_dict(), "rows": self.log.height,
                    "users": self.log["user_id"].n_unique(), "note": "oracle/ holds ground truth: never a feature"}
            (tmp / "world.json").write_text(json.dumps(meta, indent=2, default=str))
        return out


class World:
    """The simulated world of a ``WorldConfig`` (see the module docstring)."""

    def __init__(self, config: WorldConfig):
        self.cfg = config.validate()
        cc = config.catalog
        self.catalog = Catalog.build(seed=config.seed, latent_dim=cc.latent_dim, tag_weight=cc.tag_weight,
                                     creator_weight=cc.creator_weight, noise_weight=cc.noise_weight,
                                     quality_scale=cc.quality_scale, num_items=cc.num_items)
        self.extensions = Extensions(config, self.catalog, seed=config.seed)
        # Items of the base corpus are always available (the real upload dates fall inside the logged month);
        # only items of the uploads extension appear on their upload day.
        self._base_items = self.catalog.num_items
        self.catalog = self.extensions.extend_catalog(self.catalog, config.days)
        self.population = Population.build(
            num_users=config.num_users, catalog=self.catalog, seed=config.seed,
            num_long_term=config.interests.num_long_term, dirichlet_alpha=config.interests.dirichlet_alpha,
            heavy_users_only=config.heavy_users_only, initial_satisfaction=config.sessions.initial_satisfaction)
        self.responses = ResponseModel(config, self.catalog, self.population, seed=config.seed)
        self.logging_policy = LoggingPolicy(config.logging, self.catalog, self.population,
                                            page_size=config.sessions.page_size)
        self.oracle = Oracle(self)
        self._long_term_cache: dict[int, Tensor] = {}
        tabs = sorted(config.tabs)
        self._tab_ids = torch.tensor(tabs)
        self._tab_p = torch.tensor([config.tabs[t] for t in tabs], dtype=torch.float32)

    @classmethod
    def from_profile(cls, name: str, overrides: list[str] | None = None) -> "World":
        """The world of a built-in profile (``small``, ``bench-v1``, ``long``), with optional key=value overrides."""
        from funnelrec.sim.config import apply_overrides

        cfg = profile(name)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        return cls(cfg)

    # ------------------------------------------------------------ user state
    def long_term_on_day(self, day: int) -> Tensor:
        """[U, D] long-term vectors on ``day`` (cached; drift is a seeded random walk)."""
        if day not in self._long_term_cache:
            self._long_term_cache[day] = self.population.long_term_on_day(
                day, self.cfg.interests.drift_per_day, self.cfg.seed)
        return self._long_term_cache[day]

    def draw_short_term(self, user: Tensor, g: torch.Generator) -> Tensor:
        """[B, D] a short-term intent: one of the user's long-term clusters half of the time (when long-term
        interests are on), otherwise a cluster drawn by catalog size."""
        cat, pop = self.catalog, self.population
        b = user.shape[0]
        sizes = torch.bincount(cat.primary_tag, minlength=cat.num_clusters).float()
        global_pick = torch.multinomial(sizes, b, replacement=True, generator=g)
        if self.cfg.interests.long_term_enabled:
            w = pop.interest_weights[user]
            k = torch.multinomial(w.clamp(min=1e-9), 1, generator=g).squeeze(1)
            own = pop.interest_clusters[user].gather(1, k.unsqueeze(1)).squeeze(1)
            use_own = torch.rand(b, generator=g) < 0.5
            pick = torch.where(use_own, own, global_pick)
        else:
            pick = global_pick
        return cat.centroids[pick]

    def drift_short_term(self, short: Tensor, user: Tensor, g: torch.Generator) -> Tensor:
        """One page of AR(1) drift of the short-term intent towards a freshly drawn intent."""
        rho = self.cfg.interests.short_term_rho
        fresh = self.draw_short_term(user, g)
        return _unit(rho * short + (1 - rho) * fresh)

    # ---------------------------------------------------------- simulation
    def session_plan(self, days: int, g: torch.Generator) -> Tensor:
        """[days, U] int64 number of sessions of every user on every day (Poisson by activity)."""
        ac = self.cfg.activity
        rate = self.population.sessions_per_day(ac.sessions_per_day, ac.default_sessions, ac.scale)
        counts = torch.poisson(rate.expand(days, -1).contiguous(), generator=g).long()
        counts = counts.clamp(max=max(1, int(math.ceil(rate.max().item() * 3)) + 2))
        if ac.guarantee_every_user:
            none = counts.sum(0) == 0
            if none.any():
                day = torch.randint(0, days, (int(none.sum()),), generator=g)
                counts[day, torch.nonzero(none).squeeze(1)] = 1
        return counts

    def simulate(self, days: int | None = None, progress: bool = True, policy=None) -> SimLog:
        """Simulate ``days`` days (default: the config's) of every user's sessions under ``policy``.

        Args:
            days: how many days from 2022-04-08.
            progress: show a progress bar.
            policy: an object with ``select(user [B], g) -> (items [B, M], is_rand [B, M])``; default: the
                logging policy. If it has ``observe(page)``, it is called after every page with the page's record
                (users, items, time, sampled feedback), so a closed-loop policy can update its state.
        """
        days = self.cfg.days if days is None else days
        if days < 1:
            from funnelrec.errors import ConfigError
            raise ConfigError(f"days must be >= 1, got {days}")
        policy = policy or self.logging_policy
        plan_g = torch.Generator().manual_seed(self.cfg.seed * 7 + 1)
        plan = self.session_plan(days, plan_g)
        pages: list[dict[str, Tensor]] = []
        total = int(plan.sum())
        bar = tqdm(total=total, desc=f"simulating {self.cfg.name}", unit="session", disable=not progress)
        session_counter = 0
        # A session that runs past midnight delays the user's first session of the next day.
        end_prev = torch.full((self.population.num_users,), -1, dtype=torch.int64)
        # The log ends at midnight after the last day: sessions still running then are cut there.
        horizon = KUAIRAND_START_MS + days * DAY_MS
        for day in range(days):
            available = self.available_items(day)
            if hasattr(policy, "set_available"):
                policy.set_available(available)
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + day)
            counts = plan[day]
            slots = int(counts.max())
            starts = self._planned_starts(counts, slots, day, g)  # [U, slots]
            for j in range(slots):
                user = torch.nonzero(counts > j).squeeze(1)
                start = torch.maximum(starts[user, j], end_prev[user] + 300_000)
                ids = torch.arange(session_counter, session_counter + user.shape[0])
                session_counter += user.shape[0]
                end = self.run_sessions(user, start, ids, day, policy, g, pages, horizon)
                end_prev[user] = end
                bar.update(int(user.shape[0]))
        bar.close()
        return self._assemble(pages)

    def _planned_starts(self, counts: Tensor, slots: int, day: int, g: torch.Generator) -> Tensor:
        u = self.population.num_users
        hours = torch.multinomial(HOUR_WEIGHTS, u * max(slots, 1), replacement=True, generator=g).view(u, -1)
        offset = (torch.rand(u, max(slots, 1), generator=g) * 3_600_000).long()
        t = KUAIRAND_START_MS + day * DAY_MS + hours * 3_600_000 + offset
        return t.sort(dim=1).values

    def available_items(self, day: int) -> Tensor:
        """[I] bool: the items that can be served on ``day`` (the base corpus always; uploads from their day)."""
        return (self.catalog.upload_day <= day) | (torch.arange(self.catalog.num_items) < self._base_items)

    def draw_tabs(self, n: int, g: torch.Generator) -> Tensor:
        """[n] int64 tabs (scenarios) drawn from the world's tab shares."""
        return self._tab_ids[torch.multinomial(self._tab_p, n, replacement=True, generator=g)]

    def run_sessions(self, user: Tensor, start: Tensor, session_ids: Tensor, day: int, policy, g: torch.Generator,
                     pages: list[dict[str, Tensor]], horizon: int) -> Tensor:
        """Run one session for each of ``user`` ([S]) from ``start`` ([S] ms) on ``day``, pages served by
        ``policy`` (``select(users, g) -> (items [B, M], is_rand [B, M])``, optional ``observe(page)``); append
        each page's record to ``pages``; stop at ``horizon`` (ms); return the end times [S]."""
        sc = self.cfg.sessions
        s = user.shape[0]
        w = sc.repeat_window
        time = start.clone()
        sat = self.population.initial_satisfaction[user].clone()
        short = self.draw_short_term(user, g)
        long_all = self.long_term_on_day(day)
        tab = self.draw_tabs(s, g)
        recent_tags = torch.full((s, w), -1, dtype=torch.int64)
        recent_creators = torch.full((s, w), -1, dtype=torch.int64)
        alive = torch.arange(s)
        for page in range(sc.max_pages):
            alive = alive[time[alive] < horizon]
            if alive.numel() == 0:
                break
            u = user[alive]
            items, is_rand = policy.select(u, g)
            state = PageState(user=u, items=items, tab=tab[alive], long_term=long_all[u], short_term=short[alive],
                              recent_tags=recent_tags[alive], recent_creators=recent_creators[alive])
            probs = self.responses.page(state)
            marg = self.responses.marginals(probs)
            draw = self.responses.sample(probs, g)
            reward = self.reward(draw, probs)
            before = sat[alive]
            sat[alive] = self.update_satisfaction(before, reward, draw["exam"])
            pages.append({
                "user": u, "items": items, "is_rand": is_rand, "tab": tab[alive], "time": time[alive],
                "session": session_ids[alive], "page": torch.full_like(u, page), "sat": before,
                **{k: v for k, v in draw.items()}, "tasks": marg["tasks"], "hate_p": marg["hate"],
                "play_p": marg["play_ms"], "exam_p": marg["exam"], "relevance": probs.relevance,
                "duration": probs.duration_ms, "reward": reward,
            })
            if hasattr(policy, "observe"):  # closed-loop policies learn the page's feedback (e.g. live histories)
                policy.observe(pages[-1])
            time[alive] += draw["play_ms"].sum(1).long() + 1500 * items.shape[1]
            tags = self.catalog.primary_tag[items]
            cres = self.catalog.author_index[items]
            recent_tags[alive] = torch.cat([recent_tags[alive], tags], 1)[:, -w:] if w else recent_tags[alive]
            recent_creators[alive] = torch.cat([recent_creators[alive], cres], 1)[:, -w:] if w else \
                recent_creators[alive]
            short[alive] = self.drift_short_term(short[alive], u, g) if self.cfg.interests.short_term_enabled \
                else short[alive]
            hazard = self.leave_hazard(sat[alive])
            stay = torch.rand(alive.shape[0], generator=g) >= hazard
            alive = alive[stay]
        return time

    def leave_hazard(self, sat: Tensor) -> Tensor:
        """[B] probability that a user leaves after a page, at satisfaction ``sat`` ([B]):
        ``sigmoid(leave_bias + leave_slope·(0.5 − s))`` (the session model of the module docstring)."""
        sc = self.cfg.sessions
        return torch.sigmoid(sc.leave_bias + sc.leave_slope * (0.5 - sat))

    def reward(self, draw: dict[str, Tensor], probs) -> Tensor:
        """[B, M] per-impression reward r that moves satisfaction (``draw``: a sampled page response,
        ``probs``: its page probabilities)."""
        sc = self.cfg.sessions
        ratio = (draw["play_ms"] / probs.duration_ms).clamp(max=1.0)
        r = sc.reward_watch * ratio * draw["click"] + sc.reward_like * draw["like"] + \
            sc.reward_follow * draw["follow"] + sc.reward_comment * draw["comment"] + \
            sc.reward_forward * draw["forward"] - sc.reward_hate * draw["hate"] - sc.reward_repeat * probs.repeats
        return r.float()

    def update_satisfaction(self, sat: Tensor, reward: Tensor, exam: Tensor) -> Tensor:
        """[B] satisfaction after a page: an exponential average of the rewards [B, M] of the examined
        impressions ``exam`` [B, M], in order, clamped to [0, 1]."""
        decay = self.cfg.sessions.satisfaction_decay
        for k in range(reward.shape[1]):
            seen = exam[:, k]
            sat = torch.where(seen, decay * sat + (1 - decay) * reward[:, k], sat)
        return sat.clamp(0.0, 1.0)

    # ------------------------------------------------------------ output
    def _assemble(self, pages: list[dict[str, Tensor]]) -> SimLog:
        m = self.cfg.sessions.page_size
        cat = {k: torch.cat([p[k] for p in pages]) for k in pages[0]}
        n_req = cat["user"].shape[0]

        def per_item(x: Tensor) -> Tensor:  # [R] -> [R*M]
            return x.repeat_interleave(m)

        def flat(x: Tensor) -> Tensor:  # [R, M] -> [R*M]
            return x.reshape(-1)

        time = per_item(cat["time"])
        since_start = time.numpy() - KUAIRAND_START_MS  # KUAIRAND_START_MS is a Beijing midnight
        day_index = since_start // DAY_MS
        dates = np.array([date_of_day(int(d)) for d in range(int(day_index.min()), int(day_index.max()) + 1)])
        date = dates[day_index - day_index.min()]
        minutes = since_start // 60_000 % 1440
        play = flat(cat["play_ms"]).long()
        duration = flat(cat["duration"]).long()
        click = flat(cat["click"])
        g = torch.Generator().manual_seed(self.cfg.seed + 55)
        u = torch.rand(play.shape[0], 3, generator=g)
        follow_p = flat(cat["tasks"][..., 3]) / flat(cat["tasks"][..., 0]).clamp(min=1e-9)
        profile_enter = click & (u[:, 0] < 0.02 + 4 * follow_p)
        stay = -torch.log1p(-u[:, 1])  # Exponential(1) by inverse CDF
        comment = flat(cat["comment"])
        comment_stay = torch.where(comment, (15_000 * stay).long(),
                                   torch.where(click & (u[:, 2] < 0.03), (5_000 * stay).long(), 0))
        user_ids = self.population.user_id[per_item(cat["user"])]
        video_ids = torch.from_numpy(self.catalog.videos["video_id"].to_numpy().copy())[flat(cat["items"])]
        position = torch.arange(m).repeat(n_req)
        log = pl.DataFrame({
            "user_id": user_ids.numpy(), "video_id": video_ids.numpy(), "date": date,
            "hourmin": (minutes // 60 * 100 + minutes % 60), "time_ms": time.numpy(),
            "is_click": click.numpy(), "is_like": flat(cat["like"]).numpy(), "is_follow": flat(cat["follow"]).numpy(),
            "is_comment": comment.numpy(), "is_forward": flat(cat["forward"]).numpy(),
            "is_hate": flat(cat["hate"]).numpy(),
            "long_view": (click & long_view_rule(play, duration)).numpy(),
            "play_time_ms": play.numpy(), "duration_ms": duration.numpy(),
            "profile_stay_time": torch.where(profile_enter, (6_000 * stay).long(), 0).numpy(),
            "comment_stay_time": comment_stay.numpy(), "is_profile_enter": profile_enter.numpy(),
            "is_rand": flat(cat["is_rand"]).numpy(), "tab": per_item(cat["tab"]).numpy(),
        }).cast(LOG_COLUMNS)
        tasks = cat["tasks"].reshape(-1, 6)
        oracle = pl.DataFrame({
            "p_click": tasks[:, 0].numpy(), "p_long_view": tasks[:, 1].numpy(), "p_like": tasks[:, 2].numpy(),
            "p_follow": tasks[:, 3].numpy(), "p_comment": tasks[:, 4].numpy(), "p_forward": tasks[:, 5].numpy(),
            "p_hate": flat(cat["hate_p"]).numpy(), "e_play_ms": flat(cat["play_p"]).numpy(),
            "p_exam": flat(cat["exam_p"]).numpy(), "relevance": flat(cat["relevance"]).numpy(),
            "session_id": per_item(cat["session"]).numpy(), "page": per_item(cat["page"]).numpy(),
            "position": position.numpy(), "satisfaction": per_item(cat["sat"]).numpy(),
            "reward": flat(cat["reward"]).numpy(),
        })
        # One sort for both tables keeps them row-aligned: by user, request time, display position.
        order = np.lexsort((position.numpy(), time.numpy(), user_ids.numpy()))
        log = log[order]
        oracle = oracle[order]
        questionnaire = self.extensions.questionnaire(log, oracle)
        users = self.population.users
        videos = self.catalog.videos
        extras = self.extensions.side_tables(log)
        return SimLog(log=log, users=users, videos=videos, oracle=oracle, questionnaire=questionnaire,
                      config=self.cfg, extras=extras)


def simulate(profile_name: str = "small", days: int | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> SimLog:
    """Shortcut: build the world of ``profile_name`` and simulate it."""
    return World.from_profile(profile_name, overrides).simulate(days=days, progress=progress)


def date_of_day(day: int) -> int:
    """YYYYMMDD of simulated ``day`` (day 0 = 2022-04-08)."""
    d = datetime.date(2022, 4, 8) + datetime.timedelta(days=day)
    return d.year * 10000 + d.month * 100 + d.day
