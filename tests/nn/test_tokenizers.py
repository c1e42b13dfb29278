"""Feature tokenizers against plain per-group / per-chunk references."""

from __future__ import annotations

import doctest

import pytest
import torch

import funnelrec.nn.tokenizers as tokenizers
from funnelrec.errors import ConfigError
from funnelrec.nn.tokenizers import AutoSplitTokenizer, SemanticTokenizer, check_groups

FIELDS = {"uid": 4, "age": 1, "iid": 4, "tag": 4, "hour": 4, "dur": 1}  # F = 18
GROUPS = {"user": ["age", "uid"], "item": ["iid", "tag", "dur"], "ctx": ["hour"]}


def columns(name: str) -> slice:
    start = 0
    for f, w in FIELDS.items():
        if f == name:
            return slice(start, start + w)
        start += w
    raise KeyError(name)


def test_semantic_tokens_are_per_group_projections_of_the_concatenated_fields():
    torch.manual_seed(0)
    tok = SemanticTokenizer(FIELDS, GROUPS, dim=6)
    x = torch.randn(3, 5, 18)
    out = tok(x)
    assert out.shape == (3, 5, 3, 6) and tok.num_tokens == 3
    assert tok.token_names == ["user", "item", "ctx"] and tok.group_widths == [5, 9, 4]
    for t, members in enumerate(GROUPS.values()):  # the listed order is the concatenation order
        cat = torch.cat([x[..., columns(f)] for f in members], -1)
        torch.testing.assert_close(out[..., t, :], tok.proj[t](cat))
    # token t reads only its own fields
    changed = x.clone()
    changed[..., columns("hour")] += 1.0
    diff = (tok(changed) - out).abs().sum((0, 1, 3))
    assert diff[2] > 0 and diff[:2].sum() == 0


def test_auto_split_is_a_projection_of_each_tensor_split_chunk():
    torch.manual_seed(0)
    tok = AutoSplitTokenizer(18, num_tokens=4, dim=6)
    assert tok.chunk_widths == [5, 5, 4, 4] and tok.num_tokens == 4
    x = torch.randn(2, 3, 18)
    out = tok(x)
    assert out.shape == (2, 3, 4, 6)
    for t, chunk in enumerate(torch.tensor_split(x, 4, dim=-1)):
        w = chunk.shape[-1]
        ref = chunk @ tok.proj.weight[t, :w] + tok.proj.bias[t]
        torch.testing.assert_close(out[..., t, :], ref)
    even = AutoSplitTokenizer(18, num_tokens=3, dim=2)
    assert even.chunk_widths == [6, 6, 6]


@pytest.mark.parametrize("make", [lambda: SemanticTokenizer(FIELDS, GROUPS, 4), lambda: AutoSplitTokenizer(18, 5, 4)])
def test_gradients_reach_every_weight_and_the_input(make):
    torch.manual_seed(0)
    tok = make()
    x = torch.randn(4, 18, requires_grad=True)
    tok(x).pow(2).sum().backward()
    assert x.grad is not None and (x.grad != 0).all()
    for name, p in tok.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_groups_and_sizes_are_named():
    with pytest.raises(ConfigError, match="'uid' is in both token 'a' and token 'b'"):
        check_groups(FIELDS, {"a": ["uid"], "b": ["uid", "age", "iid", "tag", "hour", "dur"]})
    with pytest.raises(ConfigError, match="unknown field 'video'"):
        check_groups(FIELDS, {**GROUPS, "x": ["video"]})
    with pytest.raises(ConfigError, match="not placed: hour"):
        check_groups(FIELDS, {"user": ["uid", "age"], "item": ["iid", "tag", "dur"]})
    with pytest.raises(ConfigError, match="MyConfig.token_groups: token 'ctx' needs a non-empty list"):
        check_groups(FIELDS, {**GROUPS, "ctx": []}, "MyConfig.token_groups")
    with pytest.raises(ConfigError, match="SemanticTokenizer.dim"):
        SemanticTokenizer(FIELDS, GROUPS, 0)
    with pytest.raises(ConfigError, match="num_tokens"):
        AutoSplitTokenizer(3, num_tokens=4, dim=2)
    with pytest.raises(ConfigError, match="in_dim"):
        AutoSplitTokenizer(0, num_tokens=1, dim=2)
    with pytest.raises(ConfigError, match=r"\[\.\.\., 18\]"):
        SemanticTokenizer(FIELDS, GROUPS, 4)(torch.randn(2, 17))
    with pytest.raises(ConfigError, match=r"\[\.\.\., 18\]"):
        AutoSplitTokenizer(18, 2, 4)(torch.randn(2, 17))


def test_docstring_examples_run():
    result = doctest.testmod(tokenizers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
