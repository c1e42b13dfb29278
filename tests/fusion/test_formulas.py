"""Formula fusion (linear / log-sum / power-product), formula-based RL scoring and CEM."""

from __future__ import annotations

import math

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.fusion import Fusion
from funnelrec.fusion.env import SessionEnv, SessionEnvConfig
from funnelrec.fusion.formulas import (FORMULAS, CEMConfig, FormulaFusion, FormulaRL, cem_tune, fuse,
                                       reference_log_weights)
from funnelrec.sim import World


def test_formulas_compute_what_they_say():
    o = torch.tensor([[[0.5, 0.1], [0.2, 0.4]]])
    w = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(fuse(o, w, "linear"), torch.tensor([[1.1, 0.8]]))
    expected = [[2 * math.log(0.6) + math.log(0.2), 2 * math.log(0.3) + math.log(0.5)]]
    torch.testing.assert_close(fuse(o, w, "logsum", beta=0.1), torch.tensor(expected))
    power = fuse(o, w, "power")
    torch.testing.assert_close(power.exp(), torch.tensor([[0.5 ** 2 * 0.1, 0.2 ** 2 * 0.4]]))
    # per-request weights [B, T]
    per = fuse(o.expand(2, 2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "linear")
    torch.testing.assert_close(per, torch.tensor([[0.5, 0.2], [0.1, 0.4]]))


@pytest.mark.parametrize("kind", FORMULAS)
def test_every_formula_is_monotone_in_every_task(kind):
    g = torch.Generator().manual_seed(0)
    o = torch.rand(64, 1, 5, generator=g) * 0.9 + 0.05
    w = torch.rand(5, generator=g) + 0.1
    base = fuse(o, w, kind)
    for k in range(5):
        up = o.clone()
        up[..., k] += 0.01
        assert (fuse(up, w, kind) > base).all(), (kind, k)


def test_bad_formula_input_names_the_problem():
    with pytest.raises(ConfigError, match="kind"):
        fuse(torch.rand(1, 2, 3), torch.ones(3), "sum")
    with pytest.raises(ConfigError, match="tasks"):
        fuse(torch.rand(1, 2, 3), torch.ones(4), "linear")
    with pytest.raises(ConfigError, match="span"):
        FormulaRL("linear", torch.zeros(3), torch.nn.Identity(), span=0)
    with pytest.raises(ConfigError, match="population"):
        CEMConfig(population=0).validate()


def test_reference_weights_equalise_task_scales():
    o = torch.tensor([[[0.3, 0.003], [0.1, 0.001]]])
    theta = reference_log_weights("linear", o)
    torch.testing.assert_close((theta.exp() * o.mean((0, 1))), torch.ones(2))
    assert torch.equal(reference_log_weights("power", o), torch.zeros(2))


def test_fusions_follow_the_protocol():
    fixed = FormulaFusion("logsum", torch.zeros(3))
    actor = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    rl = FormulaRL("linear", torch.zeros(3), actor, span=0.5)
    for f in (fixed, rl):
        assert isinstance(f, Fusion)
        assert f.score(torch.rand(2, 7, 3), torch.randn(2, 4)).shape == (2, 7)
    w = rl.weights(torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-0.5), 1.0]]))


def test_cem_finds_the_optimum_of_a_known_objective(monkeypatch):
    """CEM's search itself: a stand-in for the rollout scores each session by −‖θ − θ*‖² of the weights its
    policy uses (read back through a linear formula on one-hot predictions), so the optimum is known."""
    import funnelrec.fusion.env as env_mod

    target = torch.tensor([1.0, -2.0, 0.5])

    def fake_evaluate(env, policy, seed, users=None):
        b = users.shape[0]
        # a linear formula on one-hot rows returns the weights themselves
        weights = policy({"pxtr": torch.eye(3).expand(b, 3, 3)}, {})
        return {"watch_s": -((weights.log() - target) ** 2).sum(1), "pages": torch.ones(b)}

    monkeypatch.setattr(env_mod, "evaluate", fake_evaluate)

    class FakeEnv:
        num_envs = 8 * 4
        user_pool = torch.arange(10)

    cfg = CEMConfig(iterations=15, population=8, sessions_per_candidate=4, seed=0, init_std=2.0)
    theta, hist = cem_tune(FakeEnv(), "linear", torch.zeros(3), cfg)
    torch.testing.assert_close(theta, target, atol=0.15, rtol=0)
    assert hist[-1]["best_watch_s"] > hist[0]["best_watch_s"] and hist[-1]["std"] < hist[0]["std"]


def test_cem_runs_on_the_session_env():
    world = World.from_profile("small", ["num_users=100"])
    cfg = CEMConfig(iterations=2, population=4, sessions_per_candidate=10, seed=0)
    env = SessionEnv(SessionEnvConfig(world="small", num_sessions=40, candidates=12), world=world)
    theta, hist = cem_tune(env, "logsum", torch.zeros(7), cfg)
    again, _ = cem_tune(env, "logsum", torch.zeros(7), cfg)
    assert theta.shape == (7,) and torch.isfinite(theta).all() and torch.equal(theta, again)  # seeded
    assert len(hist) == 2 and all(h["mean_watch_s"] > 0 for h in hist)
    with pytest.raises(ConfigError, match="sessions"):
        cem_tune(SessionEnv(SessionEnvConfig(world="small", num_sessions=5, candidates=12), world=world),
                 "logsum", torch.zeros(7), cfg)
