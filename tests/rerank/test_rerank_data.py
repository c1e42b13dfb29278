"""Re-ranking data: pools and histories from the world, simulated outcomes against the oracle, checks."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import (VALUE_WEIGHTS, ItemFeatures, RerankDataConfig, check_lists, fused_score,
                                   gather_lists, split_request_users)
from funnelrec.sim import World
from funnelrec.sim.config import apply_overrides

SWITCH_OFF = ["lists.cascade_enabled=false", "lists.saturation_enabled=false",
              "lists.similarity_enabled=false"]


def _lists(req, k, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(req)
    out = []
    for row in range(b):  # test helper: random valid lists
        valid = torch.nonzero(req.pool.mask[row]).squeeze(1)
        picks = [valid[torch.randperm(valid.numel(), generator=g)[:length]] for _ in range(k)]
        out.append(torch.stack(picks))
    return torch.stack(out)


def test_fused_score_is_the_value_formula_on_predictions():
    pxtr = torch.zeros(1, 2, 7)
    pxtr[0, 0, 6] = 0.5  # squashed watch: 30 s
    pxtr[0, 1, 2] = 0.1  # p(like)
    pxtr[0, 1, 1] = 0.4  # p(long_view)
    s = fused_score(pxtr)
    assert s[0, 0] == pytest.approx(30.0)
    assert s[0, 1] == pytest.approx(VALUE_WEIGHTS["is_like"] * 0.1 + VALUE_WEIGHTS["long_view"] * 0.4)
    assert fused_score(pxtr[..., :6]).shape == (1, 2)
    with pytest.raises(DataError):
        fused_score(torch.zeros(2, 7))


def test_requests_pool_history_and_score(small_data):
    users = torch.tensor([0, 1, 2, 3, 3])
    req = small_data.requests(users, seed=1)
    b, m = 5, small_data.cfg.pool_size
    assert req.pool.items.shape == (b, m) and req.pool.pxtr.shape == (b, m, 7)
    assert torch.allclose(req.pool.score, fused_score(req.pool.pxtr))
    assert bool((req.pool.items[req.pool.mask] >= 1).all())
    assert req.batch.validate() is req.batch
    h = req.batch
    assert int(h.hist_len.max()) <= small_data.cfg.history_len
    assert h.history_length == max(1, int(h.hist_len.max()))
    valid = h.history_mask()
    assert bool((h.hist_gap_s[valid] > 0).all())  # strictly before the request
    assert bool((h.hist_items[~valid] == 0).all())
    # the same seed gives the same requests
    again = small_data.requests(users, seed=1)
    assert torch.equal(again.pool.items, req.pool.items) and torch.equal(again.pool.pxtr, req.pool.pxtr)
    sub = req.select(torch.tensor([4, 0]))
    assert torch.equal(sub.pool.items[1], req.pool.items[0]) and sub.user.tolist() == [3, 0]


@pytest.mark.parametrize("effects", ["on", "off"])
def test_mean_of_simulated_outcomes_equals_the_oracle_value(small_data, effects):
    data = small_data if effects == "on" else small_data.with_world(
        World(apply_overrides(small_data.world.cfg, SWITCH_OFF)))
    req = data.requests(torch.tensor([5, 6, 7]), seed=2)
    lists = _lists(req, 2, data.list_len)
    oracle = data.oracle_values(req, lists)
    g = torch.Generator().manual_seed(0)
    draws = 3000
    many = data.outcomes(req, lists, g, draws=draws)
    one = torch.stack([data.outcomes(req, lists, g) for _ in range(200)])
    se = one.std(0) / draws ** 0.5
    assert bool(((many - oracle).abs() <= 5 * se + 0.5).all()), (many, oracle)
    assert one.std(0).min() > 0  # single outcomes are draws, not the expectation


def test_list_effects_switch(small_data):
    req = small_data.requests(torch.arange(8), seed=3)
    lists = _lists(req, 1, small_data.list_len)
    flipped = lists.flip(-1)
    on = small_data.oracle_values(req, torch.cat([lists, flipped], 1))
    off_data = small_data.with_world(World(apply_overrides(small_data.world.cfg, SWITCH_OFF)))
    off = off_data.oracle_values(req, torch.cat([lists, flipped], 1))
    assert torch.allclose(off[:, 0], off[:, 1], rtol=1e-5)  # order-free without list effects
    assert not torch.allclose(on[:, 0], on[:, 1], rtol=1e-5)  # the order matters with them


def test_oracle_values_match_expected_list_value(small_data):
    req = small_data.requests(torch.tensor([9, 10]), seed=4)
    lists = _lists(req, 3, small_data.list_len)
    v = small_data.oracle_values(req, lists)
    items = gather_lists(req.pool.items, lists)[:, 1] - 1
    direct = small_data.world.oracle.expected_list_value(req.user, items, weights=VALUE_WEIGHTS, tab=req.tab,
                                                         day=req.day, short_term=req.short_term)
    assert torch.allclose(v[:, 1], direct)


def test_item_features_are_observable_columns(small_data):
    f = small_data.features
    cat = small_data.world.catalog
    assert f.table.shape == (cat.num_items + 1, 3) and bool((f.table[0] == 0).all())
    assert torch.equal(f.table[1:, 0], cat.primary_tag + 1)
    assert int(f.table[1:, 1].max()) <= f.creator_buckets and int(f.table[1:, 2].max()) <= f.duration_buckets
    with pytest.raises(DataError, match="out of range"):
        f.lookup(torch.tensor([cat.num_items + 1]))
    with pytest.raises(ConfigError):
        ItemFeatures.from_world(small_data.world, creator_buckets=0)


def test_check_lists_rejects_bad_lists(small_data):
    req = small_data.requests(torch.tensor([1, 2]), seed=5)
    good = _lists(req, 2, 3)
    check_lists(good, req.pool)
    dup = good.clone()
    dup[0, 0, 1] = dup[0, 0, 0]
    with pytest.raises(DataError, match="twice"):
        check_lists(dup, req.pool)
    with pytest.raises(DataError, match="must lie in"):
        check_lists(good + 1000, req.pool)
    with pytest.raises(DataError, match="int64"):
        check_lists(good.float(), req.pool)
    with pytest.raises(DataError, match="requests"):
        check_lists(good[:1], req.pool)
    pool = req.pool.select(torch.arange(2))
    pool.mask = pool.mask.clone()
    pool.mask[0, good[0, 0, 0]] = False
    with pytest.raises(DataError, match="padding or duplicate"):
        check_lists(good, pool)


def test_bad_config_and_users(small_data):
    with pytest.raises(ConfigError, match="pool_size"):
        RerankDataConfig(pool_size=3).validate(page_size=6)
    with pytest.raises(ConfigError, match="history_len"):
        RerankDataConfig(history_len=2000).validate(page_size=6)
    with pytest.raises(ConfigError, match="list_len"):
        RerankDataConfig(pool_size=10, list_len=11).validate(page_size=6)
    with pytest.raises(DataError, match="users"):
        small_data.requests(torch.zeros(0, dtype=torch.int64), seed=0)
    with pytest.raises(ConfigError, match="draws"):
        req = small_data.requests(torch.tensor([0]), seed=0)
        small_data.outcomes(req, _lists(req, 1, 6), torch.Generator(), draws=0)
    tr, va, te = split_request_users(100, 10, 20, seed=0)
    assert len(tr) == 70 and len(va) == 10 and len(te) == 20
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 100
    with pytest.raises(ConfigError):
        split_request_users(30, 10, 20, seed=0)
