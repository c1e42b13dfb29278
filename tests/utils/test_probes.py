"""The tensor probes of ``funnelrec.utils.probes``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funnelrec.utils.probes import AccumulatingIndexPutProbe, ShapeProbe


def test_shape_probe_sees_forward_and_backward_outputs():
    x = torch.ones(3, 5, requires_grad=True)
    with ShapeProbe() as probe:
        (x @ torch.ones(5, 7)).sum().backward()
    assert (3, 7) in probe.shapes and (3, 5) in probe.shapes


def test_accumulating_index_put_probe_flags_integer_gathers_only():
    table = torch.randn(6, 2, requires_grad=True)
    ids = torch.tensor([[1, 1], [4, 0]])
    with AccumulatingIndexPutProbe() as probe:
        table[ids].sum().backward()  # backward: index_put_(accumulate=True) over [2, 2] integer ids
    assert probe.calls == [("aten.index_put.default", [(2, 2)])]
    with AccumulatingIndexPutProbe() as probe:
        table[torch.tensor([True, False, True, False, False, True])].sum().backward()  # a mask: each row once
        F.embedding(ids, table).sum().backward()
        table.index_select(0, ids.flatten()).sum().backward()
        torch.zeros(6).index_put_((torch.tensor([2, 2]),), torch.ones(2))  # no accumulation: not a sum
    assert probe.calls == []


def test_the_flagged_op_is_the_one_that_differs_from_its_replacements_only_in_order():
    torch.manual_seed(0)
    table = torch.randn(50, 4, requires_grad=True)
    ids = torch.randint(0, 50, (64, 20))
    grad_out = torch.randn(64, 20, 4)
    (table[ids] * grad_out).sum().backward()
    by_index = table.grad.clone()
    table.grad = None
    (F.embedding(ids, table) * grad_out).sum().backward()
    torch.testing.assert_close(table.grad, by_index)  # the same sums, up to summation order
