"""Embedding optimisers: row-wise Adagrad and lazy SparseAdam move only rows with a gradient; parameter split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from funnelrec.errors import ConfigError
from funnelrec.train.optim import (
    LazySparseAdam,
    RowWiseAdagrad,
    build_optimizers,
    clip_grad_norm,
    split_parameters,
)
from train_tiny import tiny_model


def _touched(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return torch.nonzero((after != before).any(1)).squeeze(1).tolist()


@pytest.mark.parametrize("sparse", [False, True])
def test_rowwise_adagrad_updates_only_rows_with_gradient(sparse):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=sparse)
    opt = RowWiseAdagrad([emb.weight], lr=0.1, weight_decay=0.01)
    w0 = emb.weight.detach().clone()
    ids = torch.tensor([1, 3, 3, 7])
    (emb(ids) * torch.arange(1.0, 5.0)).sum().backward()
    g = emb.weight.grad.to_dense() if sparse else emb.weight.grad.clone()
    opt.step()
    assert _touched(w0, emb.weight.detach()) == [1, 3, 7]
    acc = opt.state[emb.weight]["sum"]
    assert torch.nonzero(acc).squeeze(1).tolist() == [1, 3, 7]
    # the exact row-wise update of row 3 (two lookups: the gradients add up)
    g3 = g[3] + 0.01 * w0[3]
    expect = w0[3] - 0.1 * g3 / (g3.pow(2).mean().sqrt() + 1e-8)
    torch.testing.assert_close(emb.weight.detach()[3], expect)
    # a second step touching other rows leaves rows 1, 3, 7 and their accumulators alone
    w1, acc1 = emb.weight.detach().clone(), acc.clone()
    opt.zero_grad()
    emb(torch.tensor([0, 5])).sum().backward()
    opt.step()
    assert _touched(w1, emb.weight.detach()) == [0, 5]
    assert torch.equal(acc[[1, 3, 7]], acc1[[1, 3, 7]])


def test_lazy_sparse_adam_takes_dense_gradients_and_skips_untouched_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3)
    opt = LazySparseAdam([emb.weight], lr=0.1)
    w0 = emb.weight.detach().clone()
    emb(torch.tensor([2, 4])).sum().backward()
    opt.step()
    assert _touched(w0, emb.weight.detach()) == [2, 4]


def test_rowwise_adagrad_rejects_1d_parameters():
    with pytest.raises(ConfigError, match="rows"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3))])


def test_split_and_build():
    model = tiny_model()
    tables, dense = split_parameters(model)
    table_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert tables and {id(p) for p in tables} == table_ids
    assert len(tables) + len(dense) == len(list(model.parameters()))
    assert not ({id(p) for p in dense} & table_ids)
    opts = build_optimizers(model, lr=1e-3, weight_decay=0.1, sparse_lr=0.05, embedding_optimizer="adamw")
    assert len(opts) == 1 and [g["lr"] for g in opts[0].param_groups] == [1e-3, 0.05]
    opts = build_optimizers(model, lr=1e-3, sparse_lr=0.05, embedding_optimizer="rowwise_adagrad")
    assert [type(o).__name__ for o in opts] == ["AdamW", "RowWiseAdagrad"] and opts[1].defaults["lr"] == 0.05
    opts = build_optimizers(model, lr=1e-3, embedding_optimizer="sparse_adam")
    assert [type(o).__name__ for o in opts] == ["AdamW", "LazySparseAdam"]


def test_clip_grad_norm_handles_sparse_gradients():
    emb = nn.Embedding(5, 2, sparse=True)
    lin = nn.Linear(2, 1)
    lin(emb(torch.tensor([1, 2]))).sum().mul(100).backward()
    params = [emb.weight, lin.weight, lin.bias]
    before = clip_grad_norm(params, 1.0)
    assert before > 1.0
    after = torch.cat([emb.weight.grad.coalesce().values().reshape(-1), lin.weight.grad.reshape(-1),
                       lin.bias.grad]).norm()
    assert float(after) == pytest.approx(1.0, rel=1e-4)
