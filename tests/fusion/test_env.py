"""The session environment: gymnasium API, shapes, autoreset modes, determinism, predictions, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, VectorEnv

from funnelrec.errors import ConfigError, DataError
from funnelrec.fusion.env import (TASKS, OracleGreedy, SessionEnv, SessionEnvConfig, evaluate, hash_normal,
                                  split_users, state_dim)
from funnelrec.sim import World


@pytest.fixture(scope="module")
def world():
    return World.from_profile("small", ["num_users=60"])


def _env(world, **kw):
    kw.setdefault("num_sessions", 8)
    kw.setdefault("candidates", 12)
    return SessionEnv(SessionEnvConfig(world="small", **kw), world=world)


def _run(env, seed, steps=6):
    obs, info = env.reset(seed=seed)
    trace = [obs["pxtr"].clone()]
    rewards = []
    for _ in range(steps):
        obs, r, term, trunc, info = env.step(obs["pxtr"][..., 1])
        trace.append(obs["pxtr"].clone())
        rewards.append(torch.stack([r, term.float(), trunc.float()]))
    return torch.stack(trace), torch.stack(rewards)


def test_is_a_gymnasium_vector_env_with_documented_shapes(world):
    env = _env(world)
    assert isinstance(env, VectorEnv) and env.num_envs == 8
    assert env.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    t = len(TASKS)
    assert env.num_tasks == t and env.state_dim == state_dim(t)
    obs, info = env.reset(seed=0)
    assert obs["pxtr"].shape == (8, 12, t) and obs["mask"].shape == (8, 12)
    assert obs["mask"].dtype == torch.bool
    assert obs["user_state"].shape == (8, env.state_dim)
    assert ((obs["pxtr"] > 0) & (obs["pxtr"] < 1)).all() and torch.isfinite(obs["user_state"]).all()
    # the observation (as numpy) lies in the declared spaces
    as_np = {"pxtr": obs["pxtr"].numpy(), "mask": obs["mask"].numpy().astype(np.int8),
             "user_state": obs["user_state"].numpy()}
    assert env.observation_space.contains(as_np)
    assert env.single_observation_space["pxtr"].shape == (12, t)
    assert env.action_space.shape == (8, 12) and env.single_action_space.shape == (12,)
    obs, reward, term, trunc, info = env.step(torch.randn(8, 12))
    assert reward.shape == term.shape == trunc.shape == (8,)
    assert (reward > 0).all()  # every session saw a page: someone watched something
    assert info["served"].shape == (8, world.cfg.sessions.page_size)
    assert (info["pages"] == 1).all()
    assert torch.allclose(info["served_watch_s"].sum(1), reward)
    assert set(info["oracle"]) == {"pxtr", "play_s", "hate", "watch_ratio"}
    assert not (term & trunc).any()


def test_same_seed_same_actions_same_run_and_other_seed_differs(world):
    a = _run(_env(world), seed=3)
    b = _run(_env(world), seed=3)
    c = _run(_env(world), seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_evaluation_mode_runs_every_session_to_its_end(world):
    env = _env(world, num_sessions=30)
    out = evaluate(env, lambda obs, info: obs["pxtr"][..., 0], seed=1)
    assert env.done and not env.alive.any()
    assert out["watch_s"].shape == (30,) and (out["watch_s"] > 0).all()
    assert (out["pages"] >= 1).all() and (out["pages"] <= world.cfg.sessions.max_pages).all()
    # stepping an ended batch changes nothing and returns zeros
    _, r, term, trunc, info = env.step(torch.zeros(30, 12))
    assert (r == 0).all() and not term.any() and not trunc.any() and info["episode_mask"].sum() == 0
    with pytest.raises(ConfigError, match="autoreset"):
        evaluate(_env(world, autoreset=True), lambda o, i: o["pxtr"][..., 0], seed=0)


def test_page_cap_truncates_and_autoreset_starts_new_sessions_in_the_same_step():
    w = World.from_profile("small", ["num_users=40", "sessions.max_pages=2", "sessions.leave_bias=-30"])
    env = _env(w, num_sessions=6, autoreset=True)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = env.reset(seed=0)
    obs, _, term, trunc, info = env.step(obs["pxtr"][..., 0])
    assert not (term | trunc).any() and (info["pages"] == 1).all()
    obs, _, term, trunc, info = env.step(obs["pxtr"][..., 0])
    assert trunc.all() and not term.any()  # nobody leaves (hazard ~0), everyone hits the 2-page cap
    assert info["episode_mask"].all() and (info["episode_pages"] == 2).all()
    assert (info["pages"] == 0).all() and info["alive"].all()  # the rows already hold new sessions
    assert (info["episode_watch_s"] > 0).all()


def test_integer_actions_serve_those_positions(world):
    env = _env(world, num_sessions=4)
    obs, info = env.reset(seed=2)
    m = world.cfg.sessions.page_size
    pos = torch.arange(m).expand(4, m).contiguous()
    _, _, _, _, info = env.step(pos)
    assert torch.equal(info["served"], pos)


def test_bad_actions_and_configs_name_the_field(world):
    env = _env(world, num_sessions=4)
    with pytest.raises(ConfigError, match="reset"):
        env.step(torch.zeros(4, 12))
    env.reset(seed=0)
    with pytest.raises(DataError, match="actions"):
        env.step(torch.zeros(3, 12))
    with pytest.raises(DataError, match="actions"):
        env.step(torch.full((4, 6), 99, dtype=torch.int64))
    with pytest.raises(DataError, match="NaN"):
        env.step(torch.full((4, 12), float("nan")))
    with pytest.raises(ConfigError, match="predictions"):
        _env(world, predictions="ranker")
    with pytest.raises(ConfigError, match="candidates"):
        _env(world, candidates=3)  # fewer than a page
    with pytest.raises(ConfigError, match="num_sessions"):
        _env(world, num_sessions=0)
    with pytest.raises(DataError, match="users"):
        env.reset(options={"users": torch.tensor([0, 1])})
    with pytest.raises(ConfigError, match="eval_users"):
        split_users(10, 10, seed=0)


def test_oracle_mode_predicts_the_truth_and_noise_is_persistent(world):
    exact = _env(world, predictions="oracle", include_watch_time=False)
    obs, info = exact.reset(seed=5)
    torch.testing.assert_close(obs["pxtr"], info["oracle"]["pxtr"].clamp(1e-6, 1 - 1e-6))
    noisy = _env(world, noise_std=1.0)
    obs, info = noisy.reset(seed=5)
    assert not torch.allclose(obs["pxtr"][..., :6], info["oracle"]["pxtr"])
    # the same (user, item, task) always gets the same noise
    z = hash_normal(torch.tensor([3, 3, 4]), torch.tensor([7, 7, 7]), torch.tensor([0, 0, 0]), seed=1)
    assert z[0] == z[1] and z[0] != z[2]
    many = hash_normal(torch.arange(20000), torch.zeros(20000, dtype=torch.int64), seed=2)
    assert abs(float(many.mean())) < 0.05 and abs(float(many.std()) - 1) < 0.05


def test_oracle_greedy_references_pick_valid_distinct_candidates(world):
    env = _env(world, num_sessions=10, candidates=20)
    obs, info = env.reset(seed=0)
    pos = OracleGreedy(env, "satisfaction")(obs, info)
    assert pos.shape == (10, world.cfg.sessions.page_size)
    assert all(len(set(row)) == len(row) for row in pos.tolist())
    assert obs["mask"].gather(1, pos).all()
    scores = OracleGreedy(env, "watch")(obs, info)
    assert torch.equal(scores, info["oracle"]["play_s"])
    with pytest.raises(ConfigError, match="objective"):
        OracleGreedy(env, "clicks")


def test_satisfaction_aware_oracle_keeps_sessions_longer():
    """The world's long-term trade-off seen through the env: greedy on watch time tires users."""
    w = World.from_profile("small", ["num_users=400"])
    env = SessionEnv(SessionEnvConfig(world="small", num_sessions=400, candidates=32), world=w)
    watch = evaluate(env, OracleGreedy(env, "watch"), seed=0)
    sat = evaluate(env, OracleGreedy(env, "satisfaction"), seed=0)
    assert sat["pages"].float().mean() > watch["pages"].float().mean()


def test_common_random_numbers_pair_policies():
    """With leaving independent of satisfaction, any two policies get the same session lengths on one seed."""
    w = World.from_profile("small", ["num_users=80", "sessions.leave_slope=0"])
    env = SessionEnv(SessionEnvConfig(world="small", num_sessions=80, candidates=12), world=w)
    a = evaluate(env, lambda obs, info: obs["pxtr"][..., 0], seed=4)
    b = evaluate(env, lambda obs, info: -obs["pxtr"][..., 0], seed=4)
    assert torch.equal(a["pages"], b["pages"]) and not torch.equal(a["watch_s"], b["watch_s"])
