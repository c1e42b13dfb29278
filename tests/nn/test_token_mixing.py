"""Token mixing is a parameter-free, invertible permutation; the per-token FFN is T separate FFNs."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import funnelrec.nn.token_mixing as token_mixing_module
from funnelrec.errors import ConfigError
from funnelrec.nn.token_mixing import PerTokenFFN, SharedFFN, TokenMixing, token_mixing, token_unmixing


def test_a_hand_checked_case():
    # T = 3 tokens a, b, c of width D = 6, H = 3 heads of width 2
    x = torch.tensor([[0, 1, 2, 3, 4, 5],         # a0 … a5
                      [10, 11, 12, 13, 14, 15],   # b0 … b5
                      [20, 21, 22, 23, 24, 25]])  # c0 … c5
    expected = torch.tensor([[0, 1, 10, 11, 20, 21],   # head 0 of a, b, c
                             [2, 3, 12, 13, 22, 23],   # head 1
                             [4, 5, 14, 15, 24, 25]])  # head 2
    assert torch.equal(token_mixing(x), expected)
    # H = 2 != T: 2 tokens of width T·D/H = 9
    assert torch.equal(token_mixing(x, heads=2), torch.tensor([[0, 1, 2, 10, 11, 12, 20, 21, 22],
                                                               [3, 4, 5, 13, 14, 15, 23, 24, 25]]))


@pytest.mark.parametrize("t,d,h", [(4, 8, None), (3, 12, 3), (4, 12, 2), (2, 6, 6), (5, 10, 1)])
def test_mixing_is_a_pure_invertible_permutation(t, d, h):
    torch.manual_seed(0)
    x = torch.randn(2, 3, t, d)
    y = token_mixing(x, h)
    heads = t if h is None else h
    assert y.shape == (2, 3, heads, t * d // heads)
    # the same fixed permutation of the T·D entries of every row, whatever the values
    perm = token_mixing(torch.arange(t * d).view(t, d), h).flatten()
    assert torch.equal(torch.sort(perm).values, torch.arange(t * d))
    torch.testing.assert_close(y.flatten(-2), x.flatten(-2)[..., perm], rtol=0, atol=0)
    torch.testing.assert_close(token_unmixing(y, tokens=t), x, rtol=0, atol=0)
    if heads == t:  # H = T: shape kept, and mixing twice is the identity (a block transpose)
        torch.testing.assert_close(token_mixing(y), x, rtol=0, atol=0)


def test_the_module_has_no_parameters_and_gradients_flow_through():
    mix = TokenMixing()
    assert sum(p.numel() for p in mix.parameters()) == 0 and len(list(mix.buffers())) == 0
    x = torch.randn(5, 4, 8, requires_grad=True)
    w = torch.randn(5, 4, 8)
    (mix(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, token_mixing(w))  # the adjoint of a block transpose is itself


def test_shape_rule_errors():
    with pytest.raises(ConfigError, match="D=6 divisible by the head count H=4"):
        token_mixing(torch.randn(2, 4, 6))
    with pytest.raises(ConfigError, match="H=5"):
        token_mixing(torch.randn(2, 3, 12), heads=5)
    with pytest.raises(ConfigError, match="T=5"):
        token_unmixing(torch.randn(2, 3, 12), tokens=5)
    with pytest.raises(ConfigError, match="heads"):
        TokenMixing(heads=0)


def reference_ffn(ffn: PerTokenFFN, x: torch.Tensor) -> torch.Tensor:
    """A loop over tokens: token t through its own Linear → GELU → Linear."""
    outs = []
    for t in range(ffn.num_tokens):
        h = nn.functional.gelu(x[..., t, :] @ ffn.first.weight[t] + ffn.first.bias[t])
        outs.append(h @ ffn.second.weight[t] + ffn.second.bias[t])
    return torch.stack(outs, -2)


def test_per_token_ffn_equals_a_loop_over_tokens():
    torch.manual_seed(0)
    ffn = PerTokenFFN(num_tokens=3, dim=4, hidden=8)
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(ffn(x), reference_ffn(ffn, x))


def test_per_token_weights_are_separate_and_shared_ffn_is_one_ffn():
    torch.manual_seed(0)
    t, d, k = 3, 4, 8
    per, shared = PerTokenFFN(t, d, k), SharedFFN(d, k)
    assert sum(p.numel() for p in per.parameters()) == t * sum(p.numel() for p in shared.parameters())
    x = torch.randn(6, t, d)
    x[:, 1] = x[:, 0]  # two tokens with the same input
    out = per(x)
    assert not torch.allclose(out[:, 0], out[:, 1])  # separate weights: different outputs
    shared_out = shared(x)
    torch.testing.assert_close(shared_out[:, 0], shared_out[:, 1])  # one FFN: the same output
    # a per-token FFN whose T weight sets are copies of the shared one is the shared FFN
    with torch.no_grad():
        per.first.weight.copy_(shared.first.weight.T.expand(t, d, k))
        per.first.bias.copy_(shared.first.bias.expand(t, k))
        per.second.weight.copy_(shared.second.weight.T.expand(t, k, d))
        per.second.bias.copy_(shared.second.bias.expand(t, d))
    torch.testing.assert_close(per(x), shared_out)
    # changing token 2's weights changes token 2's output only
    before = per(x)
    with torch.no_grad():
        per.second.weight[2] += 0.5
    diff = (per(x) - before).abs().sum((0, 2))
    assert diff[2] > 0 and diff[:2].sum() == 0


@pytest.mark.parametrize("make", [lambda: PerTokenFFN(3, 4, 6), lambda: SharedFFN(4, 6)])
def test_ffn_gradients_reach_every_weight(make):
    torch.manual_seed(0)
    ffn = make()
    x = torch.randn(5, 3, 4, requires_grad=True)
    ffn(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_docstring_examples_run():
    result = doctest.testmod(token_mixing_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
