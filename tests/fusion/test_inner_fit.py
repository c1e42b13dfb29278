"""xMTF's inner stage fitted to a randomly served log: collection, the fit's signal, monotonicity, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import funnelrec.bench.fusion as bf
from funnelrec.errors import ConfigError
from funnelrec.fusion.env import SessionEnv, SessionEnvConfig
from funnelrec.fusion.inner_fit import LogFitConfig, RequestLog, collect_request_log, fit_cells_to_log
from funnelrec.fusion.xmtf import MonotonicFusionCells, violation_rate
from funnelrec.sim import World


@pytest.fixture(scope="module")
def world():
    return World.from_profile("small", ["num_users=60"])


def _env(world, autoreset=True):
    cfg = SessionEnvConfig(world="small", num_sessions=8, candidates=12, autoreset=autoreset)
    return SessionEnv(cfg, world=world)


def _synthetic_log(watch_of_o, n=1536, c=16, t=2, s=3, seed=0) -> RequestLog:
    """Requests whose served items earn ``watch_of_o(o of task 0)`` + noise; task 1 carries nothing."""
    g = torch.Generator().manual_seed(seed)
    pxtr = torch.rand(n, c, t, generator=g) * 0.9 + 0.05
    served = torch.stack([torch.randperm(c, generator=g)[:4] for _ in range(n)])
    o = pxtr[..., 0].gather(1, served)
    watch = watch_of_o(o) + 2.0 * torch.randn(o.shape, generator=g)
    return RequestLog(pxtr, torch.ones(n, c, dtype=torch.bool), torch.randn(n, s, generator=g), served, watch)


def _cells(seed=0):
    torch.manual_seed(seed)
    return MonotonicFusionCells(num_tasks=2, state_dim=3, hidden=8)


def test_collected_log_has_the_documented_shapes_and_is_deterministic(world):
    log = collect_request_log(_env(world), steps=3, seed=5)
    n, c, t = log.pxtr.shape
    assert (n, c) == (3 * 8, 12) and log.mask.shape == (n, c) and log.state.shape[0] == n
    assert log.served.shape == log.watch_s.shape == (n, 6)
    served = log.served[log.served >= 0]
    assert served.numel() > 0 and int(served.max()) < c
    assert bool(log.mask.gather(1, log.served.clamp(min=0))[log.served >= 0].all())  # only valid candidates
    assert bool((log.watch_s >= 0).all())
    again = collect_request_log(_env(world), steps=3, seed=5)
    assert torch.equal(log.served, again.served) and torch.equal(log.watch_s, again.watch_s)
    other = collect_request_log(_env(world), steps=3, seed=6)
    assert not torch.equal(log.served, other.served)


def test_fit_recovers_a_monotone_signal_and_ranks_by_it():
    log = _synthetic_log(lambda o: 30.0 * o)
    cells = _cells()
    fig = fit_cells_to_log(cells, log, lam=0.4, config=LogFitConfig(epochs=8, batch=128))
    assert fig["holdout_r2"] > 0.3 and fig["scale"] > 0 and 1 <= fig["epochs"] <= 8
    with torch.no_grad():
        z = cells(log.pxtr[:64], log.state[:64]).sum(-1)  # [64, C]
    o = log.pxtr[:64, :, 0]
    # the fitted sum orders candidates by the task that carries the signal
    agree = ((z.unsqueeze(1) < z.unsqueeze(2)) == (o.unsqueeze(1) < o.unsqueeze(2))).float().mean()
    assert agree > 0.9


def test_monotonicity_loss_keeps_cells_monotone_against_a_non_monotone_target():
    log = _synthetic_log(lambda o: 30.0 * torch.sin(5.0 * o))  # rises up to o ≈ 0.31, then falls
    rates = {}
    for lam in (0.0, 0.9):
        cells = _cells()
        fit_cells_to_log(cells, log, lam=lam, config=LogFitConfig(epochs=8, batch=128, mono_requests=128))
        with torch.no_grad():
            h = cells(log.pxtr[:128], log.state[:128])
        rates[lam] = violation_rate(log.pxtr[:128], h, log.mask[:128])[1][0].item()
    assert rates[0.0] > 0.5  # without the hinge the cell follows the target's longer fall
    assert rates[0.9] < rates[0.0] / 2


def test_bad_logs_and_settings_are_refused_by_name(world):
    log = _synthetic_log(lambda o: o, n=32)
    with pytest.raises(ConfigError, match="RequestLog.mask"):
        dataclasses.replace(log, mask=log.mask[:, :3]).validate()
    with pytest.raises(ConfigError, match="RequestLog.watch_s"):
        dataclasses.replace(log, watch_s=log.watch_s[:, :2]).validate()
    with pytest.raises(ConfigError, match="RequestLog.served: positions must be < C=16"):
        dataclasses.replace(log, served=log.served + 16).validate()
    with pytest.raises(ConfigError, match="no served item"):
        dataclasses.replace(log, served=torch.full_like(log.served, -1)).validate()
    with pytest.raises(ConfigError, match="lam=1.5"):
        fit_cells_to_log(_cells(), log, lam=1.5)
    with pytest.raises(ConfigError, match="holdout=1.0"):
        fit_cells_to_log(_cells(), log, lam=0.4, config=LogFitConfig(holdout=1.0))
    with pytest.raises(ConfigError, match="mono_requests"):
        LogFitConfig(mono_requests=0).validate()
    with pytest.raises(ConfigError, match="autoreset=True"):
        collect_request_log(_env(world, autoreset=False), steps=2, seed=0)
    with pytest.raises(ConfigError, match="steps=0"):
        collect_request_log(_env(world), steps=0, seed=0)


def test_plan_refuses_an_unknown_inner_start_by_name():
    plan = dataclasses.replace(bf.QUICK_PLAN, xmtf_grid=({"inner": "warm", "tau": 0.05, "rl_lr": 0.0,
                                                          "action_reg": 0.5},))
    with pytest.raises(ConfigError, match=r"inner start\(s\) \['warm'\] unknown"):
        plan.validate()
    with pytest.raises(ConfigError, match="log_steps=0"):
        dataclasses.replace(bf.QUICK_PLAN, log_steps=0).validate()


def test_random_log_start_is_frozen_at_rl_lr_zero_and_moves_otherwise():
    world = World.from_profile("small", ["num_users=60"])
    plan = dataclasses.replace(bf.QUICK_PLAN, world="small", inner_start="random_log", rl_steps=6,
                               train_sessions=8, candidates=12, hidden=16, log_sessions=8, log_steps=4)
    pool = torch.arange(world.population.num_users)
    logged = bf._LoggedInnerStarts(world, plan, pool, seed=0)
    fitted = logged.cells(plan.lam)
    assert {"lam0.4.holdout_r2", "lam0.4.mono"} <= set(logged.figures)
    for rl_lr, frozen in ((0.0, True), (1e-2, False)):
        trial = dataclasses.replace(plan, xmtf={"tau": 0.05, "rl_lr": rl_lr})
        model, _ = bf._xmtf_from(world, trial, pool, 0, "xmtf", None, None, logged)
        same = all(torch.equal(v, fitted[k]) for k, v in model.cells.state_dict().items())
        assert same == frozen, rl_lr
    assert logged.cells(plan.lam) is fitted  # fitted once per λ, the log collected once
    assert set(logged.fitted) == {plan.lam}
