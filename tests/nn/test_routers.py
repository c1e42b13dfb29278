"""ReLU-routed per-token MoE: the formula, the L1 penalty and its controller, DTSI routing, sparse dispatch."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import funnelrec.nn.routers as routers
from funnelrec.errors import ConfigError
from funnelrec.nn.routers import ReLURouterMoE, SparsityController

T, D, E, H = 3, 8, 4, 6


def reference(moe: ReLURouterMoE, x: torch.Tensor, router: nn.Module | None = None) -> torch.Tensor:
    """v_t = Σ_j ReLU(r_t(x_t))_j · e_tj(x_t), as loops over tokens and experts."""
    router = router or moe.router
    outs = []
    for t in range(moe.num_tokens):
        gate = torch.relu(x[..., t, :] @ router.weight[t] + router.bias[t])  # [..., E]
        v = 0
        for j in range(moe.num_experts):
            g = t * moe.num_experts + j
            h = nn.functional.gelu(x[..., t, :] @ moe.first.weight[g] + moe.first.bias[g])
            v = v + gate[..., j: j + 1] * (h @ moe.second.weight[g] + moe.second.bias[g])
        outs.append(v)
    return torch.stack(outs, -2)


def test_eval_forward_matches_the_formula_and_sparse_dispatch_matches_it_with_fewer_flops():
    torch.manual_seed(0)
    moe = ReLURouterMoE(T, D, E, H).eval()
    x = torch.randn(2, 5, T, D)
    out = moe(x)
    assert out.shape == (2, 5, T, D)
    torch.testing.assert_close(out, reference(moe, x))
    assert moe.expert_outputs(x).shape == (2, 5, T, E, D)
    with torch.no_grad():  # close about half the gates
        moe.router.bias.sub_(0.3)
    dense = moe(x)
    with FlopCounterMode(display=False) as dense_flops:
        moe(x)
    moe.sparse_dispatch = True
    with FlopCounterMode(display=False) as sparse_flops:
        sparse = moe(x)
    torch.testing.assert_close(sparse, dense)
    ratio = moe.activation_ratio
    assert 0 < ratio < 1
    assert sparse_flops.get_total_flops() < dense_flops.get_total_flops()


def test_penalty_and_ratio_follow_their_formulas_and_the_mask():
    torch.manual_seed(0)
    moe = ReLURouterMoE(T, D, E, H, l1_coef=0.05)  # no target: λ fixed
    x = torch.randn(4, 3, T, D)
    mask = torch.tensor([[True, True, False]] * 4)
    moe(x, mask)
    g = moe.gates(x)[mask]  # [rows, T, E]
    torch.testing.assert_close(moe.penalty, 0.05 * g.sum((-2, -1)).mean())
    assert moe.activation_ratio == pytest.approx(float((g > 0).float().mean()))
    assert moe.l1_coef == pytest.approx(0.05)
    # padded rows change neither
    noisy = x.clone()
    noisy[~mask] = 100.0
    moe(noisy, mask)
    torch.testing.assert_close(moe.penalty, 0.05 * g.sum((-2, -1)).mean())
    moe.eval()
    moe(x, mask)
    assert float(moe.penalty) == 0.0
    moe(x, torch.zeros(4, 3, dtype=torch.bool))  # nothing counted: no ratio
    assert math.isnan(moe.activation_ratio)


@pytest.mark.parametrize("dtsi", [False, True])
def test_gradients_reach_experts_and_routers(dtsi):
    torch.manual_seed(0)
    moe = ReLURouterMoE(T, D, E, H, dtsi=dtsi, target_activation=0.5)
    x = torch.randn(64, T, D, requires_grad=True)
    (moe(x).pow(2).mean() + moe.penalty).backward()
    assert x.grad.abs().sum() > 0
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (moe.train_router is not None) == dtsi


@pytest.mark.parametrize("mix", ["sample", "average"])
def test_dtsi_uses_only_the_inference_router_at_inference(mix):
    torch.manual_seed(0)
    moe = ReLURouterMoE(T, D, E, H, dtsi=True, dtsi_mix=mix).eval()
    x = torch.randn(16, T, D)
    base = moe(x)
    torch.testing.assert_close(base, reference(moe, x, moe.router))
    with torch.no_grad():
        moe.train_router.weight.add_(torch.randn_like(moe.train_router.weight))
        moe.train_router.bias.fill_(5.0)
    torch.testing.assert_close(moe(x), base, rtol=0, atol=0)  # the training router plays no part
    with torch.no_grad():
        moe.router.bias.add_(0.5)
    assert not torch.allclose(moe(x), base)  # the inference router does
    # in training the training router does take part
    moe.train()
    torch.manual_seed(1)
    before = moe(x)
    with torch.no_grad():
        moe.train_router.bias.fill_(-5.0)
    torch.manual_seed(1)
    assert not torch.allclose(moe(x), before)


def test_dtsi_penalty_is_on_the_inference_router_only():
    torch.manual_seed(0)
    moe = ReLURouterMoE(T, D, E, H, dtsi=True, l1_coef=1.0)
    x = torch.randn(32, T, D)
    moe(x)
    moe.penalty.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.train_router.weight.grad is None and moe.first.weight.grad is None


def test_controller_moves_lambda_in_the_right_direction():
    c = SparsityController(coef=0.01, target=0.25)
    c.update(0.6)  # too dense
    assert c.value > 0.01
    up = c.value
    c.update(0.25)  # on target: the proportional part vanishes, the integral stays up
    assert 0.01 < c.value < up
    for _ in range(20):
        c.update(0.05)  # too sparse
    assert c.value < 0.01
    before = c.value
    c.update(float("nan"))  # an empty batch: skipped
    assert c.value == before
    fixed = SparsityController(coef=0.02, target=None)
    fixed.update(0.9)
    assert fixed.value == pytest.approx(0.02)
    low = SparsityController(coef=0.01, target=0.5, min_coef=1e-3, max_coef=0.1)
    for _ in range(200):
        low.update(1.0)
    assert low.value == pytest.approx(0.1)
    assert set(dict(low.named_buffers())) == {"coef", "integral"}  # both saved with the model
    moe = ReLURouterMoE(T, D, E, H, target_activation=0.5)
    assert set(moe.state_dict()) >= {"controller.coef", "controller.integral"}
    assert "last_ratio" not in moe.state_dict()


def train_toy(target: float, dtsi: bool, steps: int = 200, seed: int = 0):
    """Regress a random tanh map with the MoE (a controller faster than the default, fit for 200 steps); returns the
    last 30 training ratios' mean, the eval ratio, the task losses and the module."""
    torch.manual_seed(seed)
    teacher = nn.Linear(D, D)
    moe = ReLURouterMoE(T, D, E, 8, dtsi=dtsi, target_activation=target, l1_coef=1e-3, adapt_rate=0.5)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    ratios, losses = [], []
    for _ in range(steps):
        x = torch.randn(64, T, D)
        task = (moe(x) - torch.tanh(teacher(x))).pow(2).mean()
        opt.zero_grad()
        (task + moe.penalty).backward()
        opt.step()
        ratios.append(moe.activation_ratio)
        losses.append(float(task.detach()))
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(1024, T, D))
    return sum(ratios[-30:]) / 30, moe.activation_ratio, losses, moe


@pytest.mark.parametrize("dtsi", [False, True])
def test_activation_ratio_lands_near_the_target_after_a_short_training(dtsi):
    target = 0.25
    train_ratio, eval_ratio, losses, moe = train_toy(target, dtsi)
    assert abs(train_ratio - target) < 0.05, train_ratio
    assert abs(eval_ratio - target) < 0.07, eval_ratio
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20])  # and it still learns the task
    assert moe.l1_coef > 1e-3  # the controller had to raise λ to get there (the task alone keeps ~35% open)


def test_toy_training_is_deterministic_for_a_seed():
    a, b = train_toy(0.25, True, steps=30), train_toy(0.25, True, steps=30)
    assert a[2] == b[2] and a[1] == b[1]


def test_bad_arguments_are_named():
    for kw, field in (({"num_experts": 0}, "num_experts"), ({"hidden": 0}, "hidden"),
                      ({"dtsi_mix": "mean"}, "dtsi_mix"), ({"target_activation": 1.5}, "target"),
                      ({"l1_coef": -1.0}, "coef"), ({"adapt_rate": -1.0}, "rate")):
        with pytest.raises(ConfigError, match=field):
            ReLURouterMoE(T, D, **{"num_experts": E, "hidden": H, **kw})
    with pytest.raises(ConfigError, match=r"\[\.\.\., 3, 8\]"):
        ReLURouterMoE(T, D, E, H)(torch.randn(2, 4, D))


def test_docstring_examples_run():
    result = doctest.testmod(routers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
