"""xMTF: monotonicity of the outer stage at the extreme actions, the losses, the cells and the ablations."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.fusion import Fusion
from funnelrec.fusion.xmtf import (XMTF, MonotonicFusionCells, XMTFConfig, action_to_a, monotonicity_loss,
                                   outer_map, pairwise_bpr_loss, violation_rate)


@pytest.mark.parametrize("q_max, a_max", [(1.0, 2.0), (0.5, 5.0), (3.0, 0.1)])
def test_outer_map_is_monotone_on_a_grid_of_q_at_the_extreme_actions(q_max, a_max):
    q = torch.linspace(0, q_max, 2001).view(1, -1, 1).expand(1, -1, 3)
    extreme = torch.tensor([[-1.0, 1.0, 0.0]])  # the lowest, the highest and the neutral action
    a = action_to_a(extreme, q_max, a_max)
    assert a[0, 0] > -1 / (2 * q_max) and a[0, 1] == pytest.approx(a_max) and a[0, 2] == 0
    h = outer_map(q, a)
    assert (h[0, 1:] - h[0, :-1] > 0).all()  # strictly increasing along q for every action
    slope = 1 + 2 * a * q_max  # the smallest slope on [0, q_max] of the map at the lowest action
    assert (slope > 0).all()


def test_the_full_score_is_monotone_in_q_at_the_extreme_actions():
    """Through the whole model: with monotone inner cells (no inner stage: q = o) and the extreme actions, the
    fused score rises with every task's prediction on a grid."""
    cfg = XMTFConfig(num_tasks=4, state_dim=2, use_inner=False)
    actor = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh())
    model = XMTF(cfg, actor=actor)
    grid = torch.linspace(0.0, 1.0, 501)
    for action in (torch.full((1, 4), -1.0), torch.full((1, 4), 1.0)):
        for k in range(4):
            o = torch.full((1, 501, 4), 0.3)
            o[0, :, k] = grid
            z = model.fused(o, torch.zeros(1, 2), action)[0]
            assert (z[1:] > z[:-1]).all(), (action, k)


def test_monotonicity_loss_is_zero_for_monotone_and_positive_for_decreasing_cells():
    o = torch.rand(3, 10, 2)
    mask = torch.ones(3, 10, dtype=torch.bool)
    assert monotonicity_loss(o, 2 * o + 1, mask) == 0
    assert monotonicity_loss(o, -o, mask) > 0
    # masked candidates do not count
    bad = o.clone()
    bad[:, 0] = 10.0
    h = o.clone()
    h[:, 0] = -10.0
    mask[:, 0] = False
    assert monotonicity_loss(bad, h, mask) == 0


def test_bpr_loss_prefers_the_target_order():
    mask = torch.ones(1, 3, dtype=torch.bool)
    target = torch.tensor([[0.0, 1.0, 2.0]])
    good = pairwise_bpr_loss(target, torch.tensor([[0.0, 5.0, 10.0]]), mask)
    bad = pairwise_bpr_loss(target, torch.tensor([[10.0, 5.0, 0.0]]), mask)
    assert good < 0.01 < bad


def test_violation_rate_counts_pairs():
    o = torch.tensor([[[0.1, 0.1], [0.2, 0.3], [0.3, 0.2]]])
    h = torch.tensor([[[0.1, 0.0], [0.2, 0.4], [0.3, 0.5]]])
    rate, per_task = violation_rate(o, h, torch.ones(1, 3, dtype=torch.bool))
    assert per_task.tolist() == [0.0, pytest.approx(1 / 3)]
    assert rate == pytest.approx(1 / 6)


def test_cells_shapes_range_and_state_personalisation():
    cells = MonotonicFusionCells(num_tasks=3, state_dim=4, hidden=8, q_max=2.0)
    o = torch.rand(5, 6, 3)
    s = torch.randn(5, 4)
    q = cells(o, s)
    assert q.shape == (5, 6, 3) and (q >= 0).all() and (q <= 2.0).all()
    q2 = cells(o, s + 1.0)
    assert not torch.allclose(q, q2)  # the user state changes the curves


def test_monotonicity_loss_makes_a_cell_monotone():
    """λ = 1 (monotonicity only) on random requests drives the violation rate of random cells towards 0."""
    torch.manual_seed(0)
    model = XMTF(XMTFConfig(num_tasks=2, state_dim=3, hidden=16, lam=1.0, lr=1e-2, use_outer=False))
    g = torch.Generator().manual_seed(1)
    o = torch.rand(32, 16, 2, generator=g)
    s = torch.randn(32, 3, generator=g)
    mask = torch.ones(32, 16, dtype=torch.bool)
    before = violation_rate(o, model.inner(o, s).detach(), mask)[0]
    for _ in range(150):
        model.inner_step(o, mask, s, torch.zeros(32, 16))
    after = model.violations(o, mask, s)[0]
    assert after < 0.01 and after < before


def test_transfer_loss_absorbs_a_target_ranking():
    torch.manual_seed(0)
    cfg = XMTFConfig(num_tasks=2, state_dim=1, hidden=16, lam=0.0, lr=1e-2, use_outer=False, q_max=5.0)
    model = XMTF(cfg)
    o = torch.rand(16, 12, 2, generator=torch.Generator().manual_seed(2))
    s = torch.zeros(16, 1)
    mask = torch.ones(16, 12, dtype=torch.bool)
    target = o[..., 1]  # rank by the second task only
    first = model.inner_step(o, mask, s, target)["transfer"]
    for _ in range(300):
        last = model.inner_step(o, mask, s, target)["transfer"]
    assert last < first  # bounded q: the BPR loss cannot reach 0, but the order is learned
    z = model.inner(o, s).sum(-1).detach()
    pairs = target.unsqueeze(2) < target.unsqueeze(1)
    agree = (z.unsqueeze(2) < z.unsqueeze(1))[pairs].float().mean()  # concordant pairs
    assert agree > 0.9


def test_ablations_and_config_errors():
    no_inner = XMTF(XMTFConfig(num_tasks=2, state_dim=1, use_inner=False))
    o = torch.rand(1, 4, 2)
    torch.testing.assert_close(no_inner.fused(o, torch.zeros(1, 1), torch.zeros(1, 2)), o.sum(-1))  # a = 0
    with pytest.raises(ConfigError, match="no inner loss"):
        no_inner.inner_loss(o, torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 1), o.sum(-1))
    no_outer = XMTF(XMTFConfig(num_tasks=2, state_dim=1, use_outer=False))
    assert no_outer.policy_action(torch.zeros(1, 1)) is None
    assert isinstance(no_outer, Fusion) and no_outer.score(o, torch.zeros(1, 1)).shape == (1, 4)
    with pytest.raises(ConfigError, match="lam"):
        XMTFConfig(num_tasks=2, state_dim=1, lam=1.5).validate()
    with pytest.raises(ConfigError, match="a_max"):
        XMTFConfig(num_tasks=2, state_dim=1, a_max=-1.0).validate()
    with pytest.raises(ConfigError, match="both"):
        XMTFConfig(num_tasks=2, state_dim=1, use_inner=False, use_outer=False).validate()
