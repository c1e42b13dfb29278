"""Target attention (DIN): the vectorised activation unit against a plain per-candidate loop, masks, normalisation."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.nn import ActivationUnit, TargetAttention, target_attention


def naive(query, keys, mask, unit, values=None, normalize=None):
    """Reference: for each request and candidate, the MLP over the explicit concatenation [q, k, q - k, q * k]."""
    values = keys if values is None else values
    b, m, _ = query.shape
    out = torch.zeros(b, m, values.shape[-1])
    for i in range(b):
        for j in range(m):
            q = query[i, j].expand_as(keys[i])
            x = torch.cat([q, keys[i], q - keys[i], q * keys[i]], -1)  # [N, 4D]
            s = unit.rest(unit.act(unit.first(x))).squeeze(-1)  # [N]
            valid = mask[i] if mask.dim() == 2 else mask[i, j]
            if normalize == "softmax":
                w = torch.zeros_like(s)
                if valid.any():
                    w[valid] = torch.softmax(s[valid], 0)
            else:
                w = torch.where(valid, s, torch.zeros_like(s))
            out[i, j] = w @ values[i]
    return out


@pytest.mark.parametrize("normalize", [None, "softmax"])
@pytest.mark.parametrize("b,m,n,d,hidden", [(3, 4, 7, 5, (9,)), (2, 1, 1, 3, (4, 6)), (1, 6, 12, 8, (16, 8, 4))])
def test_parity_with_a_per_candidate_loop(normalize, b, m, n, d, hidden):
    g = torch.Generator().manual_seed(b * 100 + n)
    torch.manual_seed(n)
    unit = ActivationUnit(d, hidden)
    q, k = torch.randn(b, m, d, generator=g), torch.randn(b, n, d, generator=g)
    mask = torch.rand(b, n, generator=g) < 0.7
    mask[0] = False  # a request without history
    values = torch.randn(b, n, 2, generator=g)
    for v in (None, values):
        got = target_attention(q, k, mask, unit, values=v, normalize=normalize)
        torch.testing.assert_close(got, naive(q, k, mask, unit, v, normalize), rtol=1e-5, atol=1e-5)
    assert torch.equal(target_attention(q, k, mask, unit, normalize=normalize)[0], torch.zeros(m, d))
    per_candidate = torch.rand(b, m, n, generator=g) < 0.5
    torch.testing.assert_close(target_attention(q, k, per_candidate, unit, normalize=normalize),
                               naive(q, k, per_candidate, unit, None, normalize), rtol=1e-5, atol=1e-5)


def test_masked_events_are_not_read_and_get_no_gradient():
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=(8,))
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [False, False, False, True, True]])
    out = att(q, k, mask)
    k2 = torch.where(mask.unsqueeze(-1), k, torch.full_like(k, 1e3)).detach()
    torch.testing.assert_close(att(q, k2, mask), out, rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(k.grad[~mask], torch.zeros_like(k.grad[~mask])) and (k.grad[mask] != 0).all()


def test_unnormalised_weights_keep_the_intensity_of_interest():
    """DIN's point: without softmax, repeating a relevant event increases the pooled vector; softmax would not."""
    torch.manual_seed(0)
    att, soft = TargetAttention(4, hidden=(8,)), TargetAttention(4, hidden=(8,), normalize="softmax")
    soft.load_state_dict(att.state_dict())
    q = torch.randn(1, 1, 4)
    k = q.expand(1, 6, 4).clone()
    one = torch.tensor([[True] + [False] * 5])
    six = torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(att(q, k, six), 6 * att(q, k, one))
    torch.testing.assert_close(soft(q, k, six), soft(q, k, one))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="normalize"):
        TargetAttention(4, normalize="sparsemax")
    with pytest.raises(ConfigError, match="normalize"):
        target_attention(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool),
                         ActivationUnit(2), normalize="l1")
    with pytest.raises(ConfigError, match="hidden"):
        ActivationUnit(4, hidden=())
