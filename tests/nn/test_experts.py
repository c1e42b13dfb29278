"""Mixture-of-experts layers against plain per-expert / per-gate loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from funnelrec.errors import ConfigError
from funnelrec.nn import ExtractionLayer, GroupedLinear, GroupedMLP, MMoELayer


def expert(mlp: GroupedMLP, g: int, x: torch.Tensor) -> torch.Tensor:
    """Expert g of a GroupedMLP as a plain MLP on x [..., in]."""
    h = x
    for layer in mlp.layers:
        h = nn.functional.silu(h @ layer.weight[g] + layer.bias[g])
    return h


def test_grouped_linear_is_g_independent_linears():
    torch.manual_seed(0)
    lin = GroupedLinear(3, 4, 2)
    x = torch.randn(5, 6, 4)
    ref = torch.stack([x @ lin.weight[g] + lin.bias[g] for g in range(3)], -2)
    torch.testing.assert_close(lin(x), ref)
    xg = torch.randn(5, 3, 4)
    ref = torch.stack([xg[:, g] @ lin.weight[g] + lin.bias[g] for g in range(3)], -2)
    torch.testing.assert_close(lin(xg, grouped=True), ref)
    with pytest.raises(ConfigError, match="grouped input"):
        lin(torch.randn(5, 2, 4), grouped=True)


def test_mmoe_matches_a_loop_over_gates_and_experts():
    torch.manual_seed(0)
    layer = MMoELayer(6, num_experts=3, expert_dims=[5, 4], num_gates=2)
    x = torch.randn(7, 6)
    outs = torch.stack([expert(layer.experts, e, x) for e in range(3)], 1)  # [R, E, H]
    logits = layer.gates(x).view(7, 2, 3)
    for g in range(2):
        w = torch.softmax(logits[:, g], -1)  # [R, E]
        torch.testing.assert_close(layer(x)[:, g], (w.unsqueeze(-1) * outs).sum(1))
    torch.testing.assert_close(layer.gate_weights(x).sum(-1), torch.ones(7, 2))


@pytest.mark.parametrize("et,es", [(1, 2), (2, 0), (0, 3)])
def test_extraction_layer_matches_the_cgc_formula(et, es):
    torch.manual_seed(0)
    t, h = 3, 4
    first = ExtractionLayer(5, t, et, es, [h], shared_out=True)
    last = ExtractionLayer(h, t, et, es, [h], shared_out=False)
    x = torch.randn(6, 5)
    out1 = first(x)
    assert out1.shape == (6, t + 1, h)

    def reference(layer, inputs):  # inputs[k]: what task k's experts and gate read; inputs[t]: the shared ones
        shared = [expert(layer.experts, t * et + s, inputs[t]) for s in range(es)]
        outs = []
        for k in range(t):
            mine = [expert(layer.experts, k * et + i, inputs[k]) for i in range(et)]
            w = torch.softmax(inputs[k] @ layer.task_gates.weight[k] + layer.task_gates.bias[k], -1)
            outs.append(sum(w[:, i: i + 1] * e for i, e in enumerate(mine + shared)))
        if layer.shared_gate is not None:
            every = [expert(layer.experts, e, inputs[layer.owner[e]]) for e in range(layer.num_experts)]
            w = torch.softmax(layer.shared_gate(inputs[t]), -1)
            outs.append(sum(w[:, i: i + 1] * e for i, e in enumerate(every)))
        return torch.stack(outs, 1)

    torch.testing.assert_close(out1, reference(first, [x] * (t + 1)))
    out2 = last(out1, grouped=True)
    assert out2.shape == (6, t, h)
    torch.testing.assert_close(out2, reference(last, [out1[:, k] for k in range(t + 1)]))


def test_bad_sizes():
    with pytest.raises(ConfigError):
        ExtractionLayer(4, num_tasks=2, task_experts=0, shared_experts=0, expert_dims=[4], shared_out=False)
    with pytest.raises(ConfigError):
        GroupedLinear(0, 3, 3)
    with pytest.raises(ConfigError):
        GroupedMLP(2, 3, [])
