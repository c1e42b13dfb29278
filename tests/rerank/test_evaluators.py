"""FlashEvaluator, the independent evaluator and the item-sum control: parity, independence, masking."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import SeqAttentionLayer
from funnelrec.rerank.flash_evaluator import FlashEvaluator
from funnelrec.rerank.independent import IndependentEvaluator
from funnelrec.rerank.item_sum import ItemSumEvaluator
from funnelrec.rerank.layers import EvaluatorConfig, attend

from rerank_testkit import synthetic


def _cfg(**kw):
    return EvaluatorConfig(num_tags=5, creator_buckets=5, duration_buckets=5, dim=16, heads=2, **kw)


def test_encode_once_then_gather_equals_encoding_every_occurrence():
    """Without item self-attention an item's encoding is list-independent: Flash (encode the pool once,
    gather) equals the independent evaluator (encode each list's items) with the same weights."""
    table, batch, pool, lists = synthetic(masked=2)
    flash = FlashEvaluator(_cfg(item_attention=False, cross_list=False), table).eval()
    indep = IndependentEvaluator(_cfg(item_attention=False, cross_list=False, seed=9), table).eval()
    indep.load_state_dict(flash.state_dict())  # the same block names
    with torch.no_grad():
        a, b = flash(batch, pool, lists), indep(batch, pool, lists)
    assert torch.allclose(a, b, atol=1e-5)
    # and the gathered list embeddings equal a per-list reference that encodes each list's own items
    with torch.no_grad():
        p = flash.encode_pool(batch, pool)
        for k in range(lists.shape[1]):
            items = pool.items.gather(1, lists[:, k])
            dense = flash.items.dense_features(pool).gather(1, lists[:, k].unsqueeze(-1).expand(-1, -1, 9))
            own = flash._attend_history(flash.items(items, dense), batch)
            gathered = p.gather(1, lists[:, k].unsqueeze(-1).expand(-1, -1, p.shape[-1]))
            assert torch.allclose(own, gathered, atol=1e-5)


@pytest.mark.parametrize("cross_list", [False, True])
def test_cross_list_attention_is_the_only_coupling_of_lists(cross_list):
    table, batch, pool, lists = synthetic(k=6)
    model = FlashEvaluator(_cfg(cross_list=cross_list), table).eval()
    other = lists.clone()
    other[:, 1:] = lists[:, 1:].roll(1, dims=-1).flip(1)  # change every list but list 0
    with torch.no_grad():
        s, s2 = model(batch, pool, lists), model(batch, pool, other)
        alone = torch.cat([model(batch, pool, lists[:, k: k + 1]) for k in range(lists.shape[1])], 1)
    if cross_list:
        assert not torch.allclose(s[:, 0], s2[:, 0], atol=1e-6)
    else:
        assert torch.allclose(s[:, 0], s2[:, 0], atol=1e-6)
        assert torch.allclose(s, alone, atol=1e-5)  # scoring lists one by one gives the same numbers


def test_independent_scores_each_list_on_its_own():
    table, batch, pool, lists = synthetic(k=6)
    model = IndependentEvaluator(_cfg(), table).eval()
    with torch.no_grad():
        s = model(batch, pool, lists)
        alone = torch.cat([model(batch, pool, lists[:, k: k + 1]) for k in range(6)], 1)
    assert torch.allclose(s, alone, atol=1e-5)


def test_flash_is_permutation_equivariant_over_lists_and_ignores_padded_lists_and_candidates():
    table, batch, pool, lists = synthetic(k=5, masked=3)
    model = FlashEvaluator(_cfg(), table).eval()
    perm = torch.tensor([3, 0, 4, 1, 2])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 4] = False
    changed = lists.clone()
    changed[:, 4] = changed[:, 4].flip(-1)
    pool2 = pool.select(torch.arange(3))
    pool2.pxtr = pool.pxtr.clone()
    pool2.pxtr[:, -3:] = 0.99  # padding slots' features
    with torch.no_grad():
        s = model(batch, pool, lists)
        assert torch.allclose(model(batch, pool, lists[:, perm]), s[:, perm], atol=1e-5)
        m1 = model(batch, pool, lists, list_mask=mask)
        m2 = model(batch, pool, changed, list_mask=mask)
        assert torch.allclose(m1[:, :4], m2[:, :4], atol=1e-6)  # a padded list is not attended to
        assert torch.allclose(model(batch, pool2, lists), s, atol=1e-6)  # nor a padding candidate


def test_item_sum_is_order_free_and_additive():
    table, batch, pool, lists = synthetic()
    model = ItemSumEvaluator(_cfg(), table).eval()
    with torch.no_grad():
        s = model(batch, pool, lists)
        v = model.item_values(batch, pool)
        assert torch.allclose(s, v.gather(1, lists.flatten(1)).view_as(lists).sum(-1), atol=1e-5)
        assert torch.allclose(model(batch, pool, lists.flip(-1)), s, atol=1e-5)


def test_empty_history_and_no_history_block_give_finite_scores():
    table, batch, pool, lists = synthetic()
    batch.hist_len = torch.zeros(3, dtype=torch.int64)
    for cls in (FlashEvaluator, IndependentEvaluator, ItemSumEvaluator):
        for history in (True, False):
            model = cls(_cfg(history=history), table).eval()
            with torch.no_grad():
                assert bool(torch.isfinite(model(batch, pool, lists)).all())


def test_attend_equals_the_dense_mask_block():
    layer = SeqAttentionLayer(8, heads=2).eval()
    x, ctx = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True], [False] * 6])
    dense = layer(x, valid.unsqueeze(1).expand(3, 4, 6), context=ctx)
    assert torch.allclose(attend(layer, x, context=ctx, key_valid=valid), dense, atol=1e-5)
    assert torch.allclose(attend(layer, x), layer(x, torch.ones(3, 4, 4, dtype=torch.bool)), atol=1e-5)


def test_gradients_reach_every_block():
    table, batch, pool, lists = synthetic()
    model = FlashEvaluator(_cfg(), table)
    model(batch, pool, lists).sum().backward()
    for name in ("items.dense.weight", "item_block.q_proj.weight", "history_block.k_proj.weight",
                 "lists.block.v_proj.weight", "cross_block.q_proj.weight", "head.net.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_input():
    table, batch, pool, lists = synthetic()
    model = FlashEvaluator(_cfg(), table)
    bad = lists.clone()
    bad[0, 0, 1] = bad[0, 0, 0]
    with pytest.raises(DataError, match="twice"):
        model(batch, pool, bad)
    with pytest.raises(DataError, match="requests"):
        model(batch.select(torch.arange(2)), pool, lists)
    pool7 = pool.select(torch.arange(3))
    pool7.pxtr = pool.pxtr[..., :6]
    with pytest.raises(DataError, match="predicted tasks"):
        model(batch, pool7, lists)
    with pytest.raises(DataError, match="list_mask"):
        model(batch, pool, lists, list_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(DataError, match="max_list_len"):
        FlashEvaluator(_cfg(max_list_len=2), table)(batch, pool, lists)
    with pytest.raises(ConfigError, match="divisible"):
        FlashEvaluator(EvaluatorConfig(num_tags=5, dim=10, heads=3), table)
    with pytest.raises(ConfigError, match="loss"):
        IndependentEvaluator(_cfg(loss="pairwise"), table)
    with pytest.raises(ConfigError, match="dropout"):
        EvaluatorConfig(num_tags=5, dropout=1.0).validate()


def test_initial_weights_follow_the_seed_and_leave_the_global_rng_alone():
    table = torch.randint(1, 5, (31, 3))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = FlashEvaluator(_cfg(seed=4), table)
    assert torch.equal(torch.rand(1), before)
    b = FlashEvaluator(_cfg(seed=4), table)
    c = FlashEvaluator(_cfg(seed=5), table)
    for (name, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.head.net[0].weight, c.head.net[0].weight)
