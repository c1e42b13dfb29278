"""The DCNv2 cross network against its explicit formula."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.nn import CrossNetwork


@pytest.mark.parametrize("low_rank", [None, 3])
def test_parity_with_the_explicit_formula(low_rank):
    torch.manual_seed(0)
    net = CrossNetwork(in_dim=7, layers=3, low_rank=low_rank)
    x0 = torch.randn(4, 2, 7)
    x = x0
    for layer in net.maps:
        if low_rank is None:
            w, b = layer.weight, layer.bias  # x_{l+1} = x0 * (W x_l + b) + x_l
        else:
            v, u = layer[0].weight, layer[1].weight  # V^T [R, F], U [F, R]
            w, b = u @ v, layer[1].bias  # x_{l+1} = x0 * (U V^T x_l + b) + x_l
        x = x0 * (x @ w.T + b) + x
    torch.testing.assert_close(net(x0), x)
    assert net.num_layers == 3


def test_cross_degree_is_bounded_by_layers_plus_one():
    """With zero biases, L layers give a polynomial of degree L + 1 in x0 (no constant term): f(t x) = Σ_k c_k t^k
    for k = 1..L+1, so the (L + 2)-th finite difference in t vanishes."""
    torch.manual_seed(1)
    net = CrossNetwork(5, layers=2).double()
    for layer in net.maps:
        torch.nn.init.zeros_(layer.bias)
    x = torch.randn(3, 5, dtype=torch.float64)
    f = torch.stack([net(t * x) for t in range(5)])  # t = 0..4
    diff = f
    for _ in range(4):  # 4th finite difference: zero for a cubic
        diff = diff[1:] - diff[:-1]
    torch.testing.assert_close(diff, torch.zeros_like(diff), atol=1e-8, rtol=0)
    assert diff.shape[0] == 1
    third = f[3] - 3 * f[2] + 3 * f[1] - f[0]
    assert third.abs().max() > 1e-3  # ... and it is a true cubic


def test_bad_sizes():
    for kw in ({"in_dim": 0, "layers": 1}, {"in_dim": 4, "layers": 0}, {"in_dim": 4, "layers": 1, "low_rank": 0}):
        with pytest.raises(ConfigError):
            CrossNetwork(**kw)
