"""TD3, the replay buffer and the session training loop."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.fusion.env import SessionEnv, SessionEnvConfig
from funnelrec.fusion.formulas import FormulaRL
from funnelrec.fusion.rl import TD3, ReplayBuffer, TD3Config, TrainConfig, train_agent
from funnelrec.sim import World


def test_td3_learns_a_state_dependent_bandit():
    """One-step episodes (done = True): reward −(a − target(s))², target = ±0.5 by the sign of the state."""
    agent = TD3(TD3Config(state_dim=1, action_dim=1, hidden=32, seed=0, policy_delay=1, actor_lr=3e-3,
                           action_reg=0.0))
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(10_000, 1, 1)
    for _ in range(300):
        s = torch.randn(64, 1, generator=g).sign()
        a = agent.act(s, noise_std=0.5, generator=g)
        r = -((a - 0.5 * s) ** 2).squeeze(1)
        buf.add(s, a, r, s, torch.ones(64, dtype=torch.bool))
        agent.update(buf.sample(128, g))
    with torch.no_grad():
        a = agent.actor(torch.tensor([[1.0], [-1.0]]))
    assert a[0, 0] == pytest.approx(0.5, abs=0.15) and a[1, 0] == pytest.approx(-0.5, abs=0.15)


def test_replay_buffer_is_a_ring():
    buf = ReplayBuffer(5, 2, 1)
    for i in range(3):
        buf.add(torch.full((2, 2), float(i)), torch.zeros(2, 1), torch.full((2,), float(i)),
                torch.zeros(2, 2), torch.zeros(2, dtype=torch.bool))
    assert len(buf) == 5
    assert sorted(buf.reward.tolist()) == [0.0, 1.0, 1.0, 2.0, 2.0]  # the oldest transition was overwritten
    with pytest.raises(ConfigError, match="empty"):
        ReplayBuffer(3, 1, 1).sample(2, torch.Generator())
    with pytest.raises(ConfigError, match="gamma"):
        TD3Config(state_dim=1, action_dim=1, gamma=1.0).validate()


def test_train_agent_runs_formula_rl_on_sessions():
    world = World.from_profile("small", ["num_users=50"])
    cfg = SessionEnvConfig(world="small", num_sessions=16, candidates=12, autoreset=True)
    env = SessionEnv(cfg, world=world)
    agent = TD3(TD3Config(state_dim=env.state_dim, action_dim=env.num_tasks, hidden=16))
    fusion = FormulaRL("power", torch.zeros(env.num_tasks), agent.actor)
    calls = []
    curve = train_agent(env, agent, lambda obs, a: fusion.fused(obs["pxtr"], a),
                        TrainConfig(steps=20, warmup_steps=2, batch_size=32, seed=0),
                        hook=lambda obs, a, info: calls.append(a.shape))
    assert len(calls) == 20 and calls[0] == (16, env.num_tasks)
    assert curve and all(c["watch_s"] > 0 and c["pages"] >= 1 for c in curve)
    assert agent.updates == 18 * 2
    with pytest.raises(ConfigError, match="autoreset"):
        no_reset = SessionEnv(SessionEnvConfig(world="small", num_sessions=4, candidates=12), world=world)
        train_agent(no_reset, agent, lambda obs, a: obs["pxtr"][..., 0], TrainConfig(steps=1))
