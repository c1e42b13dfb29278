"""Learnable token mixing: a per-head reference, the three initialisations, gradients and errors."""

from __future__ import annotations

import doctest

import pytest
import torch

import funnelrec.nn.mix_attention as mix_module
from funnelrec.errors import ConfigError
from funnelrec.nn.mix_attention import LearnableTokenMixing


def reference(mix: LearnableTokenMixing, x: torch.Tensor) -> torch.Tensor:
    """Head by head: y[:, :, h-slice] = M_h @ x[:, :, h-slice]."""
    w = mix.dim // mix.heads
    return torch.cat([mix.weight[h] @ x[..., h * w:(h + 1) * w] for h in range(mix.heads)], -1)


@pytest.mark.parametrize("tokens,dim,heads", [(4, 8, None), (4, 8, 2), (3, 12, 6), (5, 10, 1)])
def test_matches_the_per_head_reference(tokens, dim, heads):
    torch.manual_seed(0)
    mix = LearnableTokenMixing(tokens, dim, heads)
    with torch.no_grad():
        mix.weight.normal_()
    x = torch.randn(2, 3, tokens, dim)
    y = mix(x)
    assert y.shape == x.shape and mix.heads == (tokens if heads is None else heads)
    torch.testing.assert_close(y, reference(mix, x))


def test_orthogonal_init_is_orthogonal_per_head_and_not_the_identity():
    torch.manual_seed(0)
    mix = LearnableTokenMixing(6, 12, heads=3)
    m = mix.weight.detach()
    eye = torch.eye(6).expand(3, 6, 6)
    torch.testing.assert_close(m @ m.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.transpose(1, 2) @ m, eye, atol=1e-5, rtol=0)
    assert not torch.allclose(m, eye) and not torch.allclose(m[0], m[1])
    x = torch.randn(4, 6, 12)
    torch.testing.assert_close(mix(x).norm(dim=-2), x.norm(dim=-2), atol=1e-4, rtol=1e-4)  # norm-preserving per column


def test_zero_init_is_zero():
    mix = LearnableTokenMixing(4, 8, init="zero")
    assert mix.weight.abs().sum() == 0
    assert mix(torch.randn(3, 4, 8)).abs().sum() == 0


def test_shift_init_gives_every_output_token_a_slice_of_every_input_token():
    t, d = 4, 8
    mix = LearnableTokenMixing(t, d, init="shift")
    m = mix.weight.detach()
    assert ((m == 0) | (m == 1)).all() and (m.sum(-1) == 1).all() and (m.sum(-2) == 1).all()  # permutations
    for i in range(t):  # output token i reads input token (i + h) mod T in head h: all T tokens
        assert sorted(int(m[h, i].argmax()) for h in range(t)) == list(range(t))
    x = torch.randn(2, t, d)
    y = mix(x)
    torch.testing.assert_close(y[:, 0, 2:4], x[:, 1, 2:4])  # head 1 of token 0 = head 1 of token 1


def test_gradients_reach_the_mixing_matrices():
    mix = LearnableTokenMixing(4, 8, heads=2, init="zero")
    mix(torch.randn(3, 4, 8)).pow(2).sum().backward()  # zero init still gets a gradient (d out / d M = x)
    mix.zero_grad()
    x = torch.randn(3, 4, 8)
    (mix(x) * torch.randn(3, 4, 8)).sum().backward()
    assert mix.weight.grad is not None and (mix.weight.grad != 0).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 9}, "LearnableTokenMixing.dim"),
    ({"heads": 3}, "LearnableTokenMixing.dim"),
    ({"heads": 0}, "LearnableTokenMixing.heads"),
    ({"num_tokens": 0}, "LearnableTokenMixing.num_tokens"),
    ({"init": "identity"}, "LearnableTokenMixing.init"),
])
def test_errors_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LearnableTokenMixing(**{"num_tokens": 4, "dim": 8, **kwargs})


def test_wrong_input_shape_is_named():
    with pytest.raises(ConfigError, match=r"expects \[..., 4, 8\]"):
        LearnableTokenMixing(4, 8)(torch.randn(2, 5, 8))


def test_docstring_examples_run():
    result = doctest.testmod(mix_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
