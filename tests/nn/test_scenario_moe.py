"""The MTmixAtt MoE layers (shared dense MoE, scenario-aware sparse MoE) and the per-scenario LoRA adapters: loop
references, the γ bonus, per-sample routing, the shared experts, gradients and errors."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

import funnelrec.nn.mlora as mlora_module
import funnelrec.nn.scenario_moe as moe_module
from funnelrec.errors import ConfigError
from funnelrec.nn.mlora import ScenarioLoRA
from funnelrec.nn.scenario_moe import ScenarioSparseMoE, SharedDenseMoE, TokenExperts


def expert_ref(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1) @ w2 + b2


def test_token_experts_match_a_loop_over_experts():
    torch.manual_seed(0)
    t, d, e, h = 3, 4, 2, 5
    ex = TokenExperts(t, d, e, h)
    x, g = torch.randn(6, t, d), torch.rand(6, t, e)
    out = ex(x, g)
    w1, b1 = ex.first.weight.view(t, d, e, h), ex.first.bias.view(t, e, h)
    for ti in range(t):
        want = ex.second.bias[ti].expand(6, d).clone()
        for j in range(e):
            hid = F.gelu(x[:, ti] @ w1[ti, :, j] + b1[ti, j])
            want = want + g[:, ti, j:j + 1] * (hid @ ex.second.weight[ti, j * h:(j + 1) * h])
        torch.testing.assert_close(out[:, ti], want)


def test_dense_moe_sizes_gates_and_shared_experts():
    torch.manual_seed(0)
    moe = SharedDenseMoE(num_tokens=3, dim=8, hidden=40, num_experts=3, split=2, shared_experts=2)
    assert moe.sub_hidden == 5 and moe.routed == 6 and moe.experts.num_experts == 8
    x = torch.randn(4, 2, 3, 8)
    assert moe(x).shape == x.shape
    g = moe.gates(x)
    assert g.shape == (4, 2, 3, 6) and ((g > 0) & (g < 1)).all()  # sigmoid, dense: no gate is exactly 0
    # close every routed gate: what is left is the always-on shared experts
    with torch.no_grad():
        moe.router.bias.fill_(-1e4)
    shared_only = moe.experts(x, torch.cat([torch.ones(4, 2, 3, 2), torch.zeros(4, 2, 3, 6)], -1))
    torch.testing.assert_close(moe(x), shared_only)
    assert not torch.allclose(shared_only, moe.experts.second.bias.expand_as(shared_only))
    none = SharedDenseMoE(3, 8, 40, 3, 2, shared_experts=0)
    with torch.no_grad():
        none.router.bias.fill_(-1e4)
    torch.testing.assert_close(none(x), none.experts.second.bias.expand_as(x))  # no shared expert: bias only


def test_fine_grained_split_keeps_the_compute():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(10, 3, 8)
    flops = []
    for split, shared in ((1, 0), (2, 2), (4, 0)):
        with FlopCounterMode(display=False) as fc:
            SharedDenseMoE(3, 8, hidden=48, num_experts=2, split=split, shared_experts=shared).experts(
                x, torch.ones(10, 3, 2 * split + shared))
        flops.append(fc.get_total_flops())
    assert flops[0] == flops[1] == flops[2]


def scene_reference(moe: ScenarioSparseMoE, x, scenario):
    """Per sample: run every selected scenario expert of every token, gate it; add the gated shared experts."""
    t, d, c, h = moe.num_tokens, moe.dim, moe.num_scenarios, moe.hidden
    idx, gates = moe.route(x, scenario)
    out = moe.shared(x, torch.sigmoid(moe.shared_router(x, grouped=True))) if moe.shared is not None \
        else torch.zeros_like(x)
    w1, b1 = moe.first.weight.view(c, t, d, h), moe.first.bias.view(c, t, h)
    w2, b2 = moe.second.weight.view(c, t, h, d), moe.second.bias.view(c, t, d)
    rows = []
    for r in range(x.shape[0]):
        tokens = []
        for ti in range(t):
            y = out[r, ti]
            for j, e in enumerate(idx[r].tolist()):
                y = y + gates[r, ti, j] * expert_ref(x[r, ti], w1[e, ti], b1[e, ti], w2[e, ti], b2[e, ti])
            tokens.append(y)
        rows.append(torch.stack(tokens))
    return torch.stack(rows)


@pytest.mark.parametrize("shared,auto", [(2, 1), (0, 2), (1, 0)])
def test_scenario_moe_matches_the_per_sample_reference(shared, auto):
    torch.manual_seed(0)
    moe = ScenarioSparseMoE(num_tokens=3, dim=4, num_scenarios=5, hidden=6, shared_experts=shared,
                            auto_experts=auto, bonus=1.0)
    x, scenario = torch.randn(9, 3, 4), torch.randint(0, 5, (9,))
    torch.testing.assert_close(moe(x, scenario), scene_reference(moe, x, scenario))
    assert moe.active_experts == shared + 1 + auto


def test_a_large_bonus_always_selects_the_current_scenario_and_outputs_depend_on_it():
    torch.manual_seed(0)
    moe = ScenarioSparseMoE(num_tokens=3, dim=4, num_scenarios=6, hidden=5, bonus=1e4)
    x = torch.randn(5, 7, 3, 4)  # [B, M, T, D]
    for s in range(6):
        scenario = torch.full((5,), s)
        idx, gates = moe.route(x, scenario)
        assert idx.shape == (5, 7, 2) and (idx == s).any(-1).all()
        own = (idx == s).unsqueeze(-2).expand(5, 7, 3, 2)
        assert gates.shape == (5, 7, 3, 2) and (gates[own] > 0.999).all()  # the bonus is in the gate
    scenario = torch.tensor([0, 1, 2, 3, 4])
    base = moe(x, scenario)
    changed = moe(x, torch.tensor([0, 1, 5, 3, 4]))  # request 2's scenario only
    diff = (changed - base).abs().amax((1, 2, 3))
    assert diff[2] > 1e-2 and (diff[[0, 1, 3, 4]] < 1e-5).all()  # others: float rounding of regrouped matmuls only
    # the same tokens in every scenario: the output depends on the scenario
    same = x[:1].expand(6, 7, 3, 4)
    out = moe(same, torch.arange(6))
    assert all(not torch.allclose(out[0], out[s]) for s in range(1, 6))


def test_without_the_bonus_routing_ignores_the_scenario():
    torch.manual_seed(0)
    moe = ScenarioSparseMoE(num_tokens=3, dim=4, num_scenarios=6, hidden=5, bonus=0.0)
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(moe(x, torch.zeros(5, dtype=torch.long)), moe(x, torch.full((5,), 3)))
    with_bonus = ScenarioSparseMoE(3, 4, 6, 5, bonus=1e4)
    with_bonus.load_state_dict(moe.state_dict())
    assert not torch.allclose(with_bonus(x, torch.zeros(5, dtype=torch.long)), with_bonus(x, torch.full((5,), 3)))


def test_scenario_shapes_and_the_empty_batch():
    moe = ScenarioSparseMoE(num_tokens=2, dim=4, num_scenarios=3, hidden=5)
    x = torch.randn(4, 3, 2, 4)
    by_request = moe(x, torch.tensor([0, 1, 2, 1]))
    by_candidate = moe(x, torch.tensor([0, 1, 2, 1]).view(4, 1).expand(4, 3))
    torch.testing.assert_close(by_request, by_candidate)
    assert moe(torch.randn(0, 3, 2, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 3, 2, 4)
    with pytest.raises(ConfigError, match="prefix of the leading dims"):
        moe(x, torch.zeros(3, dtype=torch.long))


def test_masked_rows_skip_the_scenario_experts_and_never_regroup_the_others():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    moe = ScenarioSparseMoE(num_tokens=3, dim=4, num_scenarios=4, hidden=5, shared_experts=1, auto_experts=1)
    x, scenario = torch.randn(3, 6, 3, 4), torch.tensor([0, 2, 3])
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    base = moe(x, scenario, mask)
    torch.testing.assert_close(base[mask], moe(x, scenario)[mask], rtol=1e-5, atol=1e-6)
    shared_only = moe.shared(x, torch.sigmoid(moe.shared_router(x, grouped=True)))
    torch.testing.assert_close(base[1, 4:], shared_only[1, 4:])
    changed = x.clone()
    changed[1, 4:] = 5.0 * torch.randn(2, 3, 4)  # masked rows: their routing changes, the real rows' must not
    out = moe(changed, scenario, mask)
    assert torch.equal(out[mask], base[mask])
    with FlopCounterMode(display=False) as full:
        moe(x, scenario)
    with FlopCounterMode(display=False) as masked:
        moe(x, scenario, mask)
    assert masked.get_total_flops() < full.get_total_flops()


def test_gradients_reach_the_routers_and_the_selected_experts_only():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 4)
    scenario = torch.tensor([0, 0, 2, 2, 2, 0])
    moe = ScenarioSparseMoE(num_tokens=2, dim=4, num_scenarios=5, hidden=3, shared_experts=2, auto_experts=1)
    moe(x, scenario).pow(2).sum().backward()
    for p in (moe.shared_router.weight, moe.scene_router.weight, moe.shared.first.weight, moe.first.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # assigned experts only (γ huge, no auto-selected one): only scenarios 0 and 2 run and get gradients, and the
    # saturated gates σ(logit + γ) ≈ 1 pass no gradient to Router-2
    moe = ScenarioSparseMoE(num_tokens=2, dim=4, num_scenarios=5, hidden=3, shared_experts=2, auto_experts=0,
                            bonus=1e4)
    moe(x, scenario).pow(2).sum().backward()
    used = moe.first.weight.grad.view(5, 2, 4, 3).abs().sum((1, 2, 3)) > 0
    assert used.tolist() == [True, False, True, False, False]  # sparse: only the selected experts ran
    assert moe.scene_router.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"num_scenarios": 0}, "ScenarioSparseMoE.num_scenarios"),
    ({"auto_experts": 4}, "ScenarioSparseMoE.auto_experts"),
    ({"shared_experts": -1}, "ScenarioSparseMoE.shared_experts"),
    ({"bonus": -1.0}, "ScenarioSparseMoE.bonus"),
    ({"hidden": 0}, "ScenarioSparseMoE.hidden"),
])
def test_scenario_moe_errors_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ScenarioSparseMoE(**{"num_tokens": 2, "dim": 4, "num_scenarios": 4, "hidden": 3, **kwargs})


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden": 7}, "SharedDenseMoE.hidden"),  # < 3·2 + 2 sub-experts
    ({"split": 0}, "SharedDenseMoE.split"),
    ({"shared_experts": -1}, "SharedDenseMoE.shared_experts"),
])
def test_dense_moe_errors_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SharedDenseMoE(**{"num_tokens": 2, "dim": 4, "hidden": 16, **kwargs})


def test_lora_delta_is_zero_on_the_main_scenario_and_low_rank_elsewhere():
    torch.manual_seed(0)
    lora = ScenarioLoRA(groups=3, in_dim=5, out_dim=4, num_scenarios=4, rank=2, main=2)
    x = torch.randn(4, 6, 5)
    scenario = torch.tensor([0, 1, 2, 3])
    assert lora(x, scenario).abs().sum() == 0  # B starts at 0
    with torch.no_grad():
        lora.b.normal_()
    delta = lora(x, scenario)
    assert delta.shape == (4, 6, 3, 4)
    assert delta[2].abs().sum() == 0 and all(delta[r].abs().sum() > 0 for r in (0, 1, 3))
    for r, slot in ((0, 0), (1, 1), (3, 2)):  # adapters of scenarios 0, 1, 3 (main 2 has none)
        want = torch.einsum("ni,gir,gro->ngo", x[r], lora.a[slot], lora.b[slot])
        torch.testing.assert_close(delta[r], want)
        assert torch.linalg.matrix_rank(lora.a[slot, 0] @ lora.b[slot, 0]) <= 2
    grouped = torch.randn(4, 6, 3, 5)
    want = torch.einsum("ngi,gir,gro->ngo", grouped[1], lora.a[1], lora.b[1])
    torch.testing.assert_close(lora(grouped, scenario, grouped=True)[1], want)
    # gradients: the adapters of the scenarios in the batch, never the main scenario's requests
    lora.zero_grad()
    lora(x, torch.tensor([2, 2, 3, 3])).sum().backward()
    assert lora.b.grad[2].abs().sum() > 0 and lora.b.grad[:2].abs().sum() == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"main": 4}, "ScenarioLoRA.main"),
    ({"rank": 0}, "ScenarioLoRA.rank"),
])
def test_lora_errors_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ScenarioLoRA(**{"groups": 2, "in_dim": 3, "out_dim": 2, "num_scenarios": 4, "rank": 2, **kwargs})


@pytest.mark.parametrize("module", [moe_module, mlora_module])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
