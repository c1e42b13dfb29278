"""Tensor probes: record what the ops run under them produce, to check memory claims without timing anything.

``ShapeProbe`` records the shape of every tensor an op returns (forward and backward alike), e.g. to show that an
attention never materialises an [M, N] score matrix.

Example:
    >>> import torch
    >>> with ShapeProbe() as probe:
    ...     _ = torch.ones(3, 5) @ torch.ones(5, 7)
    >>> (3, 7) in probe.shapes
    True
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


__all__ = ["ShapeProbe"]
