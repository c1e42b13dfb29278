"""Field embeddings, the MLP and masked pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import MLP, FieldEmbedding, masked_mean, take
from funnelrec.utils.probes import AccumulatingIndexPutProbe


def test_field_embedding_shapes_and_offsets():
    torch.manual_seed(0)
    emb = FieldEmbedding([10, 5, 3], dim=4)
    assert emb.num_fields == 3 and emb.table.weight.shape == (18, 4)
    ids = torch.tensor([[[3, 0, 2], [9, 4, 1]]])  # [1, 2, F]
    out = emb(ids)
    assert out.shape == (1, 2, 3, 4)
    w = emb.table.weight
    torch.testing.assert_close(out[0, 0, 0], w[3])
    torch.testing.assert_close(out[0, 0, 1], w[10])  # index 0 of field 1 is its own row
    torch.testing.assert_close(out[0, 1, 1], w[14])
    torch.testing.assert_close(out[0, 1, 2], w[16])
    torch.testing.assert_close(emb.field_table(1), w[10:15])
    torch.testing.assert_close(emb.field_table(2), w[15:18])
    # the padding/unknown rows of different fields are different rows
    assert not torch.equal(emb(torch.tensor([0, 0, 0]))[0], emb(torch.tensor([0, 0, 0]))[1])


def test_field_embedding_gradients_reach_only_the_rows_used():
    emb = FieldEmbedding([10, 5], dim=3)
    ids = torch.tensor([[2, 1], [7, 1], [2, 4]])
    (emb(ids) * torch.randn(3, 2, 3)).sum().backward()
    touched = set(torch.nonzero(emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist())
    assert touched == {2, 7, 10 + 1, 10 + 4}
    # field_table shares storage with the table, so history lookups train the same rows
    emb.zero_grad()
    emb.field_table(1)[torch.tensor([3])].sum().backward()
    assert set(torch.nonzero(emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist()) == {13}


def test_lookup_reads_one_fields_rows_with_an_order_fixed_backward():
    emb = FieldEmbedding([10, 5], dim=3)
    ids = torch.tensor([[3, 3, 0], [4, 1, 3]])
    torch.testing.assert_close(emb.lookup(1, ids), emb.field_table(1)[ids], rtol=0, atol=0)
    with AccumulatingIndexPutProbe() as probe:
        (emb.lookup(1, ids) * torch.randn(2, 3, 3)).sum().backward()
    assert probe.calls == []
    assert set(torch.nonzero(emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist()) == {10, 11, 13, 14}
    assert emb.lookup(0, torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4, 3)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_take_equals_advanced_indexing_with_an_order_fixed_backward(dim):
    x = torch.randn(4, 5, 6, requires_grad=True)
    index = torch.tensor([[1, 1, 3], [0, 3, 3]])
    reference = x[(slice(None),) * (dim % 3) + (index,)]
    torch.testing.assert_close(take(x, dim, index), reference, rtol=0, atol=0)
    with AccumulatingIndexPutProbe() as probe:
        take(x, dim, index).sum().backward()
    assert probe.calls == []


@pytest.mark.parametrize("bad", [5, -1])
def test_lookup_names_the_field_and_column_of_an_out_of_range_id(bad):
    emb = FieldEmbedding([10, 5], dim=3)
    with pytest.raises(DataError, match=r"field 1: index out of range \[0, 5\)") as err:
        emb.lookup(1, torch.tensor([[1, bad]]), column="hist_items")
    assert "hist_items" in str(err.value)


@pytest.mark.parametrize("vocab", [[], [10, 0], [-1]])
def test_field_embedding_rejects_bad_vocab_sizes(vocab):
    with pytest.raises(ConfigError, match="vocab_sizes"):
        FieldEmbedding(vocab, dim=4)


def test_mlp_layers_and_shapes():
    mlp = MLP(8, [16, 4], dropout=0.5)
    kinds = [type(m) for m in mlp.net]
    assert kinds == [nn.Linear, nn.SiLU, nn.Dropout, nn.Linear]  # no activation after the last layer
    assert mlp(torch.zeros(3, 8)).shape == (3, 4)
    assert mlp(torch.zeros(2, 5, 8)).shape == (2, 5, 4)
    assert [type(m) for m in MLP(8, [16, 4]).net] == [nn.Linear, nn.SiLU, nn.Linear]
    single = MLP(4, [3])
    x = torch.randn(5, 4)
    # one layer is affine: f(2x) - f(0) == 2 (f(x) - f(0))
    torch.testing.assert_close(single(2 * x) - single(torch.zeros(5, 4)), 2 * (single(x) - single(torch.zeros(5, 4))))


def test_masked_mean_averages_valid_positions_only():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[5.0, 5.0], [7.0, 9.0], [-50.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [7.0, 9.0]]))
    weight = torch.tensor([[1.0, 3.0, 10.0], [2.0, 0.0, 1.0]])
    torch.testing.assert_close(masked_mean(x, mask, weight), torch.tensor([[2.5, 3.5], [0.0, 0.0]]))
    # nothing valid -> zeros; padded values never leak in
    empty = masked_mean(x, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, 2))
    x2 = x.clone()
    x2[~mask] = 1e6
    torch.testing.assert_close(masked_mean(x2, mask), masked_mean(x, mask))


def test_masked_mean_gradient_is_zero_at_padding():
    x = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    masked_mean(x, mask).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert (x.grad[mask] != 0).all()
