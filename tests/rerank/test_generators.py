"""List generators: shapes, validity (real pool items, no repeats), each family's defining property."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import RerankPool, check_lists
from funnelrec.rerank.generators import (GENERATORS, GeneratorConfig, allocate, beam_lists, generate_lists,
                                         greedy_lists, mmr_lists, sample_lists, standardized_scores,
                                         swap_lists)


def _pool(b=4, m=20, padded=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 50, (b, m), generator=g)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[:, :padded] = False  # padding/duplicates at the front, with the best scores: must never be chosen
    score = torch.rand(b, m, generator=g) * 10
    score[:, :padded] = 100.0
    tags = torch.randint(1, 4, (b, m), generator=g)
    creators = torch.randint(1, 6, (b, m), generator=g)
    return RerankPool(items, mask, torch.rand(b, m, 7, generator=g), score), tags, creators


@pytest.mark.parametrize("k", [1, 2, 5, 37, 100])
def test_shapes_and_validity(k):
    pool, tags, creators = _pool()
    g = torch.Generator().manual_seed(1)
    lists = generate_lists(pool, k, tags, creators, GeneratorConfig(list_len=5), g)
    assert lists.shape == (4, k, 5) and lists.dtype == torch.int64
    check_lists(lists, pool)  # real candidates only, no repeats within a list
    z = standardized_scores(pool.score, pool.mask)
    assert torch.equal(lists[:, 0], z.topk(5, dim=1).indices)  # list 0 is greedy, best first


def test_allocation_sums_to_k_and_follows_shares():
    for k in range(1, 60):
        c = allocate(k, GeneratorConfig())
        assert sum(c.values()) == k and c["greedy"] == 1
    c = allocate(101, GeneratorConfig())
    assert c == {"greedy": 1, "beam": 15, "mmr": 20, "sample": 35, "swap": 30}
    only = allocate(7, GeneratorConfig(include_greedy=False, shares={"sample": 1.0}))
    assert only == {"greedy": 0, "beam": 0, "mmr": 0, "sample": 7, "swap": 0}


def test_family_properties():
    pool, tags, creators = _pool(b=3, m=16, padded=2, seed=3)
    z = standardized_scores(pool.score, pool.mask)
    greedy = greedy_lists(z, 4)[:, 0]
    g = torch.Generator().manual_seed(0)
    # beam without repeat penalty: the best discounted sum is the sorted top-4
    assert torch.equal(beam_lists(z, tags, creators, 3, 4, 8, 0.9, 0.0)[:, 0], greedy)
    # MMR without diversity weight or jitter is greedy; with a large weight it avoids repeating tags early
    assert torch.equal(mmr_lists(z, tags, creators, 1, 4, (0.0, 0.0), 0.0, g)[:, 0], greedy)
    div = mmr_lists(z, tags, creators, 1, 3, (50.0, 50.0), 0.0, g)[:, 0]
    t = tags.gather(1, div)
    assert bool((t[:, 0] != t[:, 1]).all())
    # sampling at a tiny temperature is greedy; at a high one it varies
    assert torch.equal(sample_lists(z, 2, 4, 1e-4, g)[:, 1], greedy)
    hot = sample_lists(z, 20, 4, 10.0, g)
    assert len({tuple(x) for x in hot[0].tolist()}) > 1
    # swaps: at most 2 edits away from greedy, never identical positions twice
    sw = swap_lists(greedy, pool.mask, 30, 2, g)
    check_lists(sw, pool)
    changed = (sw != greedy.unsqueeze(1)).sum(-1)
    assert bool((changed <= 4).all()) and bool((changed >= 1).any())


def test_deterministic_given_the_generator():
    pool, tags, creators = _pool()
    a = generate_lists(pool, 20, tags, creators, None, torch.Generator().manual_seed(5))
    b = generate_lists(pool, 20, tags, creators, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_input():
    pool, tags, creators = _pool(m=8, padded=4)
    with pytest.raises(DataError, match="real candidates"):
        generate_lists(pool, 5, tags, creators, GeneratorConfig(list_len=6))
    with pytest.raises(ConfigError, match="K"):
        generate_lists(pool, 0, tags, creators, GeneratorConfig(list_len=3))
    with pytest.raises(DataError, match="tags"):
        generate_lists(pool, 3, tags[:, :2], creators, GeneratorConfig(list_len=3))
    with pytest.raises(ConfigError, match="unknown generator"):
        GeneratorConfig(shares={"nar": 1.0}).validate()
    with pytest.raises(ConfigError, match="shares"):
        GeneratorConfig(shares={"beam": 0.0}).validate()
    with pytest.raises(ConfigError, match="list_len"):
        GeneratorConfig(list_len=0).validate()
    with pytest.raises(ConfigError, match="sample_temperature"):
        GeneratorConfig(sample_temperature=0).validate()
    assert set(GENERATORS) == set(GeneratorConfig().shares)
