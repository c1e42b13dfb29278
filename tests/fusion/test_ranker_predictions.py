"""The fusion env's trained-ranker mode: predictions equal the cascade's ranker on the same request, each page's
feedback reaches the next request's history, reset forgets it, the env's random numbers do not change, and bad
set-ups are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from cascade_fixtures import cascade_env  # noqa: E402, F401

from funnelrec.errors import ConfigError  # noqa: E402
from funnelrec.fusion.env import SessionEnv, SessionEnvConfig  # noqa: E402
from funnelrec.fusion.ranker_predictions import CascadeRankerPredictions  # noqa: E402
from funnelrec.serving.closed_loop import REQUEST_HOUR, request_time_ms  # noqa: E402
from funnelrec.sim.oracle import TASKS as ORACLE_TASKS  # noqa: E402

B, C = 6, 16


def _env(cascade_env, predictions="ranker", day=None, predictor="make"):
    world = cascade_env.source.world
    day = world.cfg.days if day is None else day
    if predictor == "make":
        predictor = CascadeRankerPredictions(cascade_env.cascade(), world, day=world.cfg.days)
    cfg = SessionEnvConfig(world=world.cfg.name, num_sessions=B, candidates=C, predictions=predictions, day=day)
    return SessionEnv(cfg, world=world, predictor=predictor), predictor


def test_predictions_equal_the_cascade_ranker_on_the_same_request(cascade_env):
    env, pred = _env(cascade_env)
    obs, _ = env.reset(seed=3)
    cascade = pred.cascade
    uid = pred.user_ids[env.user].numpy()
    items = pred.video_ids[env.cand] + 1
    t = np.full(B, request_time_ms(env.cfg.day))
    hist = cascade.history.history(uid, t, cascade.history_len)
    pxtr, watch = cascade.rank(uid, t, env.tab.numpy(), np.full(B, REQUEST_HOUR), items,
                               torch.ones_like(items, dtype=torch.bool), hist)
    order = [cascade.tasks.index(name) for name in ORACLE_TASKS]
    assert obs["pxtr"].shape == (B, C, 7)
    torch.testing.assert_close(obs["pxtr"][..., :6], pxtr[..., order].clamp(1e-6, 1 - 1e-6).float())
    squashed = watch.clamp(min=1e-3) / (watch.clamp(min=1e-3) + env.cfg.watch_scale_s)
    torch.testing.assert_close(obs["pxtr"][..., 6], squashed.float())


def test_served_pages_reach_the_next_history_and_reset_forgets_them(cascade_env):
    env, pred = _env(cascade_env)
    obs, _ = env.reset(seed=0)
    history = pred.cascade.history
    assert history.num_recent == 0
    _, _, _, _, info = env.step(obs["pxtr"][..., 0])
    page = env.page_size
    assert history.num_recent == B * page  # every session was live on the first step
    uid = pred.user_ids[info["user"]].numpy()
    hist = history.history(uid, np.full(B, request_time_ms(env.cfg.day)), pred.cascade.history_len)
    recent = history.recent_events()
    for row in range(B):
        mine = recent.filter(recent["user_id"] == int(uid[row]))
        assert mine.height == page
        got = set(hist.items[row][: int(hist.length[row])].tolist())
        assert set((mine["video_id"].to_numpy() + 1).tolist()) <= got, row
    env.reset(seed=0)
    assert history.num_recent == 0


def test_ranker_mode_leaves_the_env_random_numbers_unchanged(cascade_env):
    ranker_env, _ = _env(cascade_env)
    oracle_env, _ = _env(cascade_env, predictions="oracle", predictor=None)
    a, _ = ranker_env.reset(seed=11)
    b, _ = oracle_env.reset(seed=11)
    for _ in range(3):
        assert torch.equal(ranker_env.user, oracle_env.user) and torch.equal(ranker_env.cand, oracle_env.cand)
        positions = torch.arange(ranker_env.page_size).expand(B, -1).contiguous()
        *_, ia = ranker_env.step(positions)
        *_, ib = oracle_env.step(positions)
        torch.testing.assert_close(ia["watch_s"], ib["watch_s"])


def test_bad_set_ups_are_refused_by_name(cascade_env):
    with pytest.raises(ConfigError, match="predictions='ranker' needs predictor="):
        _env(cascade_env, predictor=None)
    with pytest.raises(ConfigError, match="predictions='oracle'"):
        _env(cascade_env, predictions="oracle")
    world = cascade_env.source.world
    with pytest.raises(ConfigError, match=f"day=0 but the predictor serves day {world.cfg.days}"):
        _env(cascade_env, day=0)
    cascade = cascade_env.cascade()
    cascade.tasks = tuple(t for t in cascade.tasks if t != "is_follow")
    with pytest.raises(ConfigError, match="the fusion env needs is_follow too"):
        CascadeRankerPredictions(cascade, world, day=world.cfg.days)
