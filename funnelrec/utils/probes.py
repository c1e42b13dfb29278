"""Tensor probes: record what the ops run under them produce, to check memory and determinism claims without
timing anything.

``ShapeProbe`` records the shape of every tensor an op returns (forward and backward alike), e.g. to show that an
attention never materialises an [M, N] score matrix. ``AccumulatingIndexPutProbe`` records every ``index_put``
with accumulation over integer indices — the backward of ``table[ids]`` — whose sums over repeated ids run in a
thread-dependent order on CPU, so training with more than one thread would not repeat bit for bit.

Example:
    >>> import torch
    >>> with ShapeProbe() as probe:
    ...     _ = torch.ones(3, 5) @ torch.ones(5, 7)
    >>> (3, 7) in probe.shapes
    True
    >>> w = torch.ones(4, 2, requires_grad=True)
    >>> with AccumulatingIndexPutProbe() as probe:
    ...     w[torch.tensor([1, 1])].sum().backward()
    >>> len(probe.calls)
    1
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ShapeProbe(TorchDispatchMode):
    """Records the shape of every tensor an op returns (``shapes``, in call order)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


class AccumulatingIndexPutProbe(TorchDispatchMode):
    """Records every ``index_put`` with ``accumulate=True`` over integer (not boolean) indices: ``calls`` holds
    one ``(op name, [indices shapes])`` per call.

    That op is what the backward of integer advanced indexing (``x[ids]``) runs; on CPU with several threads it sums
    repeated ids in a run-dependent order (``torch.use_deterministic_algorithms`` would fix the order, globally).
    ``F.embedding`` and ``index_select`` have order-fixed backwards and are the drop-in replacements.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.startswith(("index_put", "_index_put_impl")):
            accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
            indices = [i for i in args[1] if i is not None]
            if accumulate and any(i.dtype not in (torch.bool, torch.uint8) for i in indices):
                self.calls.append((str(func), [tuple(i.shape) for i in indices]))
        return func(*args, **kwargs)


__all__ = ["AccumulatingIndexPutProbe", "ShapeProbe"]
