"""The mask builder: the global/sequence/padding rule checked pair by pair against its definition, on random
layouts, and the small helpers."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from funnelrec.errors import DataError
from funnelrec.nn.masks import (
    TokenLayout,
    additive_mask,
    attention_mask,
    causal_mask,
    has_key,
    key_padding_mask,
)


def random_layout(g: torch.Generator, b: int = 3, num_global: int = 2, s: int = 7) -> TokenLayout:
    """Global tokens, then a left-padded sequence with random lengths."""
    lengths = torch.randint(0, s + 1, (b, 1), generator=g)
    valid = torch.arange(s).expand(b, s) >= s - lengths
    return TokenLayout.of(num_global, valid)


def allowed(q: TokenLayout, k: TokenLayout, b: int, i: int, j: int, causal: bool = True) -> bool:
    """The rule, written out for one (query, key) pair."""
    if not bool(k.valid[b, j]):
        return False
    if bool(q.is_global[b, i]):
        return True
    if bool(k.is_global[b, j]):
        return False
    return (not causal) or int(k.pos[b, j]) <= int(q.pos[b, i])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_the_rule_pair_by_pair(seed, causal):
    g = torch.Generator().manual_seed(seed)
    layout = random_layout(g)
    mask = attention_mask(layout, layout, causal=causal)
    b, s = layout.valid.shape
    assert mask.shape == (b, s, s) and mask.dtype == torch.bool
    for r in range(b):
        for i in range(s):
            for j in range(s):
                assert bool(mask[r, i, j]) == allowed(layout, layout, r, i, j, causal), (r, i, j)


def test_the_rule_in_words():
    valid = torch.tensor([[False, False, True, True, True]])
    layout = TokenLayout.of(2, valid)  # tokens: g0 g1 | pad pad s2 s3 s4
    mask = attention_mask(layout, layout)[0]
    glob, seq = slice(0, 2), slice(2, 7)
    assert not mask[seq, glob].any()  # sequence tokens never see a global (candidate) token
    assert mask[glob][:, [0, 1, 4, 5, 6]].all()  # global tokens see every valid token
    assert not mask[:, 2:4].any()  # padding is never attended
    seq_block = mask[4:, 4:]
    assert torch.equal(seq_block, causal_mask(3))  # sequence tokens: at or before their own position
    assert has_key(mask).tolist() == [True, True, False, False, True, True, True]  # padded queries see nothing


def test_sampled_queries_against_all_keys():
    """Cross-attention layout: queries = globals + sequence tokens at positions 1 and 3 of a 4-token sequence."""
    valid = torch.tensor([[True, True, True, True]])
    keys = TokenLayout.of(1, valid)
    queries = TokenLayout.cat(TokenLayout.globals(1, 1), TokenLayout.sequence(valid[:, [1, 3]], torch.tensor([[1, 3]])))
    mask = attention_mask(queries, keys)[0].int().tolist()
    assert mask == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]


def test_switches_for_a_plain_encoder():
    valid = torch.tensor([[False, True, True]])
    layout = TokenLayout.of(1, valid)
    full = attention_mask(layout, layout, causal=False, seq_sees_global=True)
    assert torch.equal(full, key_padding_mask(layout.valid, 4))


def test_layout_helpers_and_errors():
    layout = TokenLayout.of(2, torch.tensor([[True, False, True]]))
    assert layout.num_tokens == 5 and layout.is_global[0].tolist() == [True, True, False, False, False]
    assert layout.pos[0, 2:].tolist() == [0, 1, 2]
    rep = layout.repeat_interleave(3)
    assert rep.valid.shape == (3, 5) and torch.equal(rep.valid[2], layout.valid[0])
    assert layout.expand(4).valid.shape == (4, 5)
    with pytest.raises(DataError):
        TokenLayout(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long),
                    torch.zeros(2, 3, dtype=torch.bool))


def test_small_helpers():
    assert causal_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    add = additive_mask(torch.tensor([[True, False]]), torch.float64)
    assert add.dtype == torch.float64 and add.tolist() == [[0.0, float("-inf")]]
    assert key_padding_mask(torch.tensor([[True, False]])).shape == (1, 1, 2)
    assert has_key(torch.tensor([[[False, False], [True, False]]])).tolist() == [[False, True]]


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.nn.masks"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
