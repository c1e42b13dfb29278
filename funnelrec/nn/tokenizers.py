"""Feature tokenizers: turn one flat feature vector into T tokens of width D (RankMixer, HyFormer, MTmixAtt inputs).

The input is the concatenation of a model's feature embeddings and dense values, x [..., F]. Two ways to cut it:

* ``SemanticTokenizer`` — named groups of named fields (user id, user profile, item id, context, history, …): each
  group's fields are concatenated (in the listed order) and projected by the group's own linear map to D. Groups may
  have different widths; every field belongs to exactly one group. T = number of groups.
* ``AutoSplitTokenizer`` — no grouping knowledge: x is split into T contiguous chunks of (nearly) equal width, as
  ``torch.tensor_split`` does (the first ``F % T`` chunks are one wider), and each chunk is projected to D by its own
  linear map. RankMixer's formula ``x_i = Proj(e[d(i−1) : d·i])`` is this split over features laid out in semantic
  order (Zhu et al., *RankMixer*, CIKM'25, §3.2).

Both give tokens [..., T, D] with separate projection weights per token (F·D weights in all, plus T·D biases).

Example:
    >>> import torch
    >>> fields = {"user_id": 4, "age": 1, "item_id": 4, "hour": 4}
    >>> tok = SemanticTokenizer(fields, {"user": ["user_id", "age"], "item": ["item_id"], "ctx": ["hour"]}, dim=8)
    >>> tok(torch.randn(2, 5, 13)).shape                 # [..., T, D]
    torch.Size([2, 5, 3, 8])
    >>> tok.token_names, tok.group_widths
    (['user', 'item', 'ctx'], [5, 4, 4])
    >>> AutoSplitTokenizer(13, num_tokens=3, dim=8)(torch.randn(2, 5, 13)).shape
    torch.Size([2, 5, 3, 8])
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.experts import GroupedLinear


def check_groups(fields: Mapping[str, int], groups: Mapping[str, Sequence[str]], name: str = "groups") -> None:
    """``ConfigError`` (naming ``name``) unless ``groups`` partitions the names of ``fields`` into non-empty groups.

    Args:
        fields: field name → width (> 0).
        groups: token name → field names.
        name: what to call ``groups`` in the message (e.g. ``"RankMixerConfig.token_groups"``).
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"{name} must be a non-empty mapping of token name -> field names, got {groups!r}")
    seen: dict[str, str] = {}
    for token, members in groups.items():
        if not isinstance(token, str) or isinstance(members, str) or not isinstance(members, Sequence) \
                or not members:
            raise ConfigError(f"{name}: token {token!r} needs a non-empty list of field names, got {members!r}")
        for f in members:
            if f not in fields:
                raise ConfigError(f"{name}: token {token!r} names unknown field {f!r}; fields: {', '.join(fields)}")
            if f in seen:
                raise ConfigError(f"{name}: field {f!r} is in both token {seen[f]!r} and token {token!r}")
            seen[f] = token
    missing = [f for f in fields if f not in seen]
    if missing:
        raise ConfigError(f"{name}: every field must be in one token; not placed: {', '.join(missing)}")


class SemanticTokenizer(nn.Module):
    """One token per named group of fields: concatenate the group's fields, project to D.

    Args:
        fields: ordered mapping field name → width: the layout of the flat input x [..., F], F = Σ widths.
        groups: ordered mapping token name → field names (a partition of ``fields``; order inside a group is the
            concatenation order). T = ``len(groups)``.
        dim: D, the width of every token.
        device: where to allocate the weights.

    ``forward(x)``: x [..., F] → [..., T, D], token t = ``W_t · concat(x[fields of group t]) + b_t``.

    Example:
        >>> import torch
        >>> tok = SemanticTokenizer({"a": 2, "b": 3, "c": 1}, {"ab": ["a", "b"], "c": ["c"]}, dim=4)
        >>> tok(torch.randn(7, 6)).shape
        torch.Size([7, 2, 4])
    """

    def __init__(self, fields: Mapping[str, int], groups: Mapping[str, Sequence[str]], dim: int,
                 device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"SemanticTokenizer.dim must be an int >= 1, got {dim!r}")
        bad = [f"{k}={w!r}" for k, w in fields.items() if not isinstance(w, int) or w < 1]
        if not fields or bad:
            raise ConfigError(f"SemanticTokenizer.fields must map names to widths >= 1, got {bad or fields!r}")
        check_groups(fields, groups, "SemanticTokenizer.groups")
        starts, offset = {}, 0
        for f, w in fields.items():
            starts[f] = offset
            offset += w
        self.in_dim, self.dim = offset, dim
        self.token_names = list(groups)
        self.group_widths: list[int] = []
        self.proj = nn.ModuleList()
        for i, members in enumerate(groups.values()):
            cols = torch.cat([torch.arange(starts[f], starts[f] + fields[f]) for f in members])
            self.register_buffer(f"cols_{i}", cols.to(device), persistent=False)
            self.group_widths.append(int(cols.numel()))
            self.proj.append(nn.Linear(int(cols.numel()), dim, device=device))

    @property
    def num_tokens(self) -> int:
        """T."""
        return len(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., F] → tokens [..., T, D]."""
        if x.shape[-1] != self.in_dim:
            raise ConfigError(f"SemanticTokenizer expects [..., {self.in_dim}] inputs, got {list(x.shape)}")
        return torch.stack([proj(x.index_select(-1, getattr(self, f"cols_{i}")))
                            for i, proj in enumerate(self.proj)], -2)


class AutoSplitTokenizer(nn.Module):
    """Split x [..., F] into T contiguous chunks of nearly equal width and project each to D with its own weights.

    Chunk widths follow ``torch.tensor_split``: the first ``F % T`` chunks have ``ceil(F / T)`` columns, the rest
    ``floor(F / T)``; a narrower chunk is zero-padded to ``ceil(F / T)`` before its projection (its padding weights
    never see a non-zero input).

    Args:
        in_dim: F.
        num_tokens: T (1 ≤ T ≤ F).
        dim: D.
        device: where to allocate the weights.

    ``forward(x)``: x [..., F] → [..., T, D].

    Example:
        >>> import torch
        >>> tok = AutoSplitTokenizer(10, num_tokens=4, dim=6)
        >>> tok(torch.randn(3, 10)).shape, tok.chunk_widths
        (torch.Size([3, 4, 6]), [3, 3, 2, 2])
    """

    def __init__(self, in_dim: int, num_tokens: int, dim: int, device: torch.device | str | None = None):
        super().__init__()
        for key, value in (("in_dim", in_dim), ("num_tokens", num_tokens), ("dim", dim)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"AutoSplitTokenizer.{key} must be an int >= 1, got {value!r}")
        if num_tokens > in_dim:
            raise ConfigError(f"AutoSplitTokenizer.num_tokens ({num_tokens}) must not exceed in_dim ({in_dim})")
        self.in_dim, self.dim = in_dim, dim
        chunks = torch.tensor_split(torch.arange(in_dim), num_tokens)
        self.chunk_widths = [int(c.numel()) for c in chunks]
        width = self.chunk_widths[0]
        # column of every chunk slot; in_dim (one past the end) reads the appended zero column
        index = torch.full((num_tokens, width), in_dim, dtype=torch.int64)
        for t, c in enumerate(chunks):
            index[t, : c.numel()] = c
        self.register_buffer("index", index.flatten().to(device), persistent=False)
        self.proj = GroupedLinear(num_tokens, width, dim)
        if device is not None:
            self.proj.to(device)

    @property
    def num_tokens(self) -> int:
        """T."""
        return len(self.chunk_widths)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., F] → tokens [..., T, D]."""
        if x.shape[-1] != self.in_dim:
            raise ConfigError(f"AutoSplitTokenizer expects [..., {self.in_dim}] inputs, got {list(x.shape)}")
        padded = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], -1)
        chunks = padded.index_select(-1, self.index).unflatten(-1, (self.num_tokens, self.chunk_widths[0]))
        return self.proj(chunks, grouped=True)
