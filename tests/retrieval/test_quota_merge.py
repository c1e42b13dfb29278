"""Quota merge of K ranked lists: quotas sum to M and follow q, de-duplication, exact quotas without duplicates,
top-up when lists overlap or run short, and bad input — against a plain-Python reference on random cases."""

from __future__ import annotations

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval.quota_merge import allocate_quotas, quota_merge, uniform_weights


def _reference(lists: list[list[int]], quotas: list[int], total: int) -> list[int]:
    """The merge rule written as a loop: in-quota candidates by (r + 0.5) / M_k, then the rest, first occurrence
    kept, the first ``total`` taken."""
    cands = []
    for k, lst in enumerate(lists):
        for r, item in enumerate(lst):
            if item < 0:
                continue
            key = (r + 0.5) / max(quotas[k], 0.5)
            tier = 0 if r < quotas[k] else 1
            cands.append((tier, key, k * len(lst) + r, item))
    out, seen = [], set()
    for _, _, _, item in sorted(cands):
        if item not in seen:
            seen.add(item)
            out.append(item)
    return (out + [-1] * total)[:total]


def test_quotas_sum_to_total_and_follow_q():
    torch.manual_seed(0)
    q = torch.rand(200, 4) ** 3
    for total in (0, 1, 7, 100, 200):
        m = allocate_quotas(q, total)
        assert m.dtype == torch.int64 and (m.sum(1) == total).all() and (m >= 0).all()
        share = q / q.sum(1, keepdim=True)
        assert ((m - share * total).abs() < 1.0).all()  # largest remainder: within one of q_k · M
    floor = allocate_quotas(q, 100, min_quota=5)
    assert (floor.sum(1) == 100).all() and (floor >= 5).all()
    assert ((floor - 5 - q / q.sum(1, keepdim=True) * 80).abs() < 1.0).all()
    assert allocate_quotas(torch.zeros(2, 4), 10).tolist() == [[3, 3, 2, 2]] * 2  # no weight: uniform
    assert allocate_quotas(uniform_weights(3, 4), 200).tolist() == [[50] * 4] * 3
    assert allocate_quotas(torch.tensor([[1.0, 0.0, 0.0]]), 5).tolist() == [[5, 0, 0]]


def test_merge_without_duplicates_takes_each_lists_top_quota():
    lists = torch.arange(1, 1 + 2 * 3 * 10).view(2, 3, 10)  # every item distinct
    quotas = torch.tensor([[5, 3, 2], [0, 10, 0]])
    merged, source = quota_merge(lists, quotas)
    assert merged.shape == source.shape == (2, 10)
    for b in range(2):
        for k in range(3):
            got = merged[b][source[b] == k].tolist()
            assert got == lists[b, k, : int(quotas[b, k])].tolist()  # its top M_k, in rank order


def test_merge_deduplicates_and_tops_up():
    lists = torch.tensor([[[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]]])
    merged, source = quota_merge(lists, torch.tensor([[2, 2]]))
    assert merged.tolist() == [[1, 2, 3, 6]] and len(set(merged[0].tolist())) == 4
    assert source.tolist() == [[0, 0, 0, 1]]  # the duplicates' freed slots go to the next candidates
    # too few distinct items: -1 padding; -1 entries of the lists are never returned
    short = torch.tensor([[[1, -1, -1], [1, 2, -1]]])
    merged, source = quota_merge(short, torch.tensor([[2, 2]]))
    assert merged.tolist() == [[1, 2, -1, -1]] and source.tolist() == [[0, 1, -1, -1]]


def test_merge_matches_reference_on_random_cases():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        b, k, length = 3, int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        lists = torch.randint(1, 15, (b, k, length), generator=g)
        lists[torch.rand(b, k, length, generator=g) < 0.1] = -1
        total = int(torch.randint(0, 2 * length + 1, (1,), generator=g))
        quotas = allocate_quotas(torch.rand(b, k, generator=g), total)
        merged, source = quota_merge(lists, quotas)
        for row in range(b):
            expect = _reference(lists[row].tolist(), quotas[row].tolist(), total)
            assert merged[row].tolist() == expect
            real = merged[row][merged[row] >= 0]
            assert len(set(real.tolist())) == len(real)  # no item twice
            for slot in range(total):  # the source list holds the item
                if merged[row, slot] >= 0:
                    assert bool((lists[row, source[row, slot]] == merged[row, slot]).any())


def test_merge_is_proportional_on_overlapping_lists():
    """Heavily overlapping lists still share the merged list roughly in proportion to the quotas."""
    g = torch.Generator().manual_seed(2)
    base = torch.randperm(400, generator=g) + 1
    lists = torch.stack([base[:200], base[100:300], base[200:400]]).unsqueeze(0)  # neighbours overlap by half
    quotas = allocate_quotas(torch.tensor([[0.6, 0.3, 0.1]]), 100)
    merged, source = quota_merge(lists, quotas)
    counts = torch.bincount(source[0], minlength=3)
    assert (merged[0] > 0).all() and counts.sum() == 100
    assert counts.tolist() == quotas[0].tolist()  # the lists' tops are disjoint here: exact quotas


def test_bad_input():
    with pytest.raises(DataError, match="weights"):
        allocate_quotas(torch.tensor([0.5, 0.5]), 10)
    with pytest.raises(DataError, match="finite"):
        allocate_quotas(torch.tensor([[-0.1, 1.0]]), 10)
    with pytest.raises(DataError, match="finite"):
        allocate_quotas(torch.tensor([[float("nan"), 1.0]]), 10)
    with pytest.raises(ConfigError, match="total"):
        allocate_quotas(torch.tensor([[1.0, 1.0]]), -1)
    with pytest.raises(ConfigError, match="min_quota"):
        allocate_quotas(torch.tensor([[1.0, 1.0]]), 10, min_quota=6)
    lists = torch.ones(2, 3, 4, dtype=torch.int64)
    with pytest.raises(DataError, match="lists"):
        quota_merge(lists.float(), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(DataError, match="quotas"):
        quota_merge(lists, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(DataError, match="quotas"):
        quota_merge(lists, -torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(DataError, match="different totals"):
        quota_merge(lists, torch.tensor([[1, 1, 1], [1, 1, 2]]))
    with pytest.raises(ConfigError, match="batch_size"):
        uniform_weights(2, 0)
