"""Field embeddings, an MLP and masked pooling: the pieces every funnelrec model is assembled from.

``FieldEmbedding`` keeps all fields of a group in one table with per-field row offsets, so a [..., F] tensor of
feature-spec indices becomes [..., F, D] in a single lookup (index 0 of each field is padding/unknown).

Example:
    >>> import torch
    >>> emb = FieldEmbedding([10, 5], dim=4)
    >>> emb(torch.tensor([[3, 0], [9, 4]])).shape
    torch.Size([2, 2, 4])
    >>> MLP(8, [16, 4])(torch.zeros(3, 8)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.errors import ConfigError, DataError


class FieldEmbedding(nn.Module):
    """One embedding table for several sparse fields.

    Args:
        vocab_sizes: rows of each field (index 0 included).
        dim: D.
        device: where to allocate the table.
    """

    def __init__(self, vocab_sizes: list[int], dim: int, device: torch.device | str | None = None):
        super().__init__()
        if not vocab_sizes or any(v < 1 for v in vocab_sizes):
            raise ConfigError(f"vocab_sizes must be a non-empty list of positive sizes, got {vocab_sizes}")
        self.vocab_sizes = list(vocab_sizes)
        offsets = torch.tensor([0, *vocab_sizes[:-1]], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("sizes", torch.tensor(vocab_sizes, dtype=torch.int64), persistent=False)
        self.table = nn.Embedding(int(sum(vocab_sizes)), dim, device=device)
        nn.init.normal_(self.table.weight, std=0.05)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [..., F] int64 → [..., F, D]. An id outside its field's vocabulary is an error (it would silently
        read the next field's rows)."""
        if ids.shape[-1] != self.num_fields:
            raise DataError(f"expected {self.num_fields} fields in the last dim, got {ids.shape[-1]}", column="ids")
        bad = (ids < 0) | (ids >= self.sizes)
        if bad.any():
            field = int(torch.nonzero(bad)[0, -1])
            raise DataError(f"field {field}: index out of range [0, {self.vocab_sizes[field]})", column="ids")
        return self.table(ids + self.offsets)

    def field_table(self, field: int) -> Tensor:
        """[V_field, D] the rows of one field (e.g. the item-id rows, shared with history lookups)."""
        start = int(self.offsets[field])
        return self.table.weight[start: start + self.vocab_sizes[field]]

    def lookup(self, field: int, ids: Tensor, column: str = "ids") -> Tensor:
        """ids [...] int64 of one field → [..., D] (e.g. history item ids through the item-id rows).

        Goes through ``F.embedding``, not ``table[ids]``: the backward of integer advanced indexing is an
        ``index_put_`` with accumulation, which on CPU with several threads sums repeated ids in a run-dependent
        order, so two trainings from one seed would drift apart. An id outside ``[0, V_field)`` is a ``DataError``
        naming ``column``.
        """
        size = self.vocab_sizes[field]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise DataError(f"field {field}: index out of range [0, {size})", column=column)
        return F.embedding(ids, self.field_table(field))


def take(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x`` indexed along ``dim`` by an integer ``index`` of any shape: [..., I..., ...] with ``index.shape`` in
    place of dim ``dim`` (what ``x[..., index, ...]`` returns).

    Runs ``index_select`` on the flattened index, whose backward (``index_add_``) sums repeated indices in a fixed
    order; the backward of advanced indexing (an accumulating ``index_put_``) does not on a multi-threaded CPU
    (``funnelrec.utils.probes.AccumulatingIndexPutProbe``).

    Example:
        >>> take(torch.arange(6.0).view(3, 2), 0, torch.tensor([[2, 2], [0, 1]])).shape
        torch.Size([2, 2, 2])
    """
    dim = dim % x.dim()
    return x.index_select(dim, index.flatten()).unflatten(dim, index.shape)


class MLP(nn.Module):
    """Linear → activation (→ dropout) stacks; no activation after the last layer.

    Args:
        in_dim: input width.
        dims: widths of every layer, the last one being the output width.
        dropout: dropout after each hidden activation.
        activation: module class of the activation.
    """

    def __init__(self, in_dim: int, dims: list[int], dropout: float = 0.0, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for i, d in enumerate(dims):
            layers.append(nn.Linear(prev, d))
            if i < len(dims) - 1:
                layers.append(activation())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            prev = d
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_dim] → [..., dims[-1]]."""
        return self.net(x)


def masked_mean(x: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of x [B, N, D] over positions where mask [B, N] is True (optionally weighted by weight [B, N]).

    Rows with no valid position give zeros.
    """
    w = mask.to(x.dtype)
    if weight is not None:
        w = w * weight
    total = w.sum(1, keepdim=True).clamp(min=1e-6)
    return (x * w.unsqueeze(-1)).sum(1) / total
