"""Attention masks built from per-token facts: which tokens are *global*, each sequence token's position, padding.

One rule covers LONGER's cross- and self-causal layers, its KV-cache serving path and a plain padded encoder
(``funnelrec.ranking.longer``, ``funnelrec.ranking.transformer``). A token set is described by a ``TokenLayout``:
``is_global`` [B, S], ``pos`` [B, S] (the order of sequence tokens; ignored for global tokens) and ``valid``
[B, S] (False at padding). ``attention_mask(query, key)`` gives a boolean mask [B, Q, K], True where query q may
attend to key k:

* a **global** query (candidate, CLS, user, cross tokens) attends to every valid key, global or sequence;
* a **sequence** query attends only to valid **sequence** keys at or before its own position — never to a global
  (candidate) token, so sequence-side states do not depend on the candidate and their K/V can be cached per user;
* ``causal=False`` drops the position rule (a sequence query sees every valid sequence key; still no global key);
  ``seq_sees_global=True`` lets sequence queries read global keys too (a plain full-attention encoder: use both);
* **padding is never attended**: an invalid key is masked for every query.

A query may end up with no key at all (a padded sequence query of a left-padded history: everything at or before it
is padding). ``scaled_dot_product_attention`` would turn such a row into NaN on some backends, so
``funnelrec.nn.seq_attention.masked_attention`` gives those rows a zero attention output (``has_key`` below).

Example:
    >>> import torch
    >>> seq_valid = torch.tensor([[False, True, True]])            # left-padded: one padding event, two real ones
    >>> layout = TokenLayout.of(num_global=1, seq_valid=seq_valid)   # [global; 3 sequence tokens]
    >>> attention_mask(layout, layout).int()[0]
    tensor([[1, 0, 1, 1],
            [0, 0, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    >>> has_key(attention_mask(layout, layout))[0].tolist()          # the padded query sees nothing
    [True, False, True, True]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from funnelrec.errors import DataError


@dataclass
class TokenLayout:
    """Per-token facts a mask is built from (see the module docstring).

    Args:
        is_global: [B, S] bool, True at global tokens.
        pos: [B, S] int64 position of each sequence token (larger = later; global tokens: any value).
        valid: [B, S] bool, False at padding.
    """

    is_global: Tensor
    pos: Tensor
    valid: Tensor

    def __post_init__(self) -> None:
        shape = self.is_global.shape
        if self.is_global.dim() != 2 or self.pos.shape != shape or self.valid.shape != shape:
            raise DataError(f"TokenLayout needs is_global, pos and valid of one shape [B, S], got "
                            f"{list(self.is_global.shape)}, {list(self.pos.shape)}, {list(self.valid.shape)}")

    @property
    def num_tokens(self) -> int:
        """S."""
        return int(self.is_global.shape[1])

    @classmethod
    def of(cls, num_global: int, seq_valid: Tensor, seq_pos: Tensor | None = None) -> "TokenLayout":
        """``num_global`` global tokens followed by the sequence tokens of ``seq_valid`` [B, S] (positions
        ``seq_pos`` [B, S], default 0..S-1). Global tokens are always valid."""
        b, s = seq_valid.shape
        dev = seq_valid.device
        if seq_pos is None:
            seq_pos = torch.arange(s, device=dev).expand(b, s)
        glob = cls.globals(b, num_global, dev)
        seq = cls(torch.zeros(b, s, dtype=torch.bool, device=dev), seq_pos.long(), seq_valid.bool())
        return cls.cat(glob, seq)

    @classmethod
    def globals(cls, batch: int, num_global: int, device: torch.device | str | None = None) -> "TokenLayout":
        """``num_global`` valid global tokens per row."""
        return cls(torch.ones(batch, num_global, dtype=torch.bool, device=device),
                   torch.full((batch, num_global), -1, dtype=torch.int64, device=device),
                   torch.ones(batch, num_global, dtype=torch.bool, device=device))

    @classmethod
    def sequence(cls, valid: Tensor, pos: Tensor | None = None) -> "TokenLayout":
        """Sequence tokens only (``valid`` [B, S], positions ``pos`` or 0..S-1)."""
        b, s = valid.shape
        if pos is None:
            pos = torch.arange(s, device=valid.device).expand(b, s)
        return cls(torch.zeros(b, s, dtype=torch.bool, device=valid.device), pos.long(), valid.bool())

    @staticmethod
    def cat(*layouts: "TokenLayout") -> "TokenLayout":
        """Token sets side by side (same B)."""
        return TokenLayout(torch.cat([x.is_global for x in layouts], 1), torch.cat([x.pos for x in layouts], 1),
                           torch.cat([x.valid for x in layouts], 1))

    def expand(self, batch: int) -> "TokenLayout":
        """The layout of a batch of one row broadcast to ``batch`` rows (or checked to already have them)."""
        if self.is_global.shape[0] == batch:
            return self
        return TokenLayout(*(t.expand(batch, -1) for t in (self.is_global, self.pos, self.valid)))

    def repeat_interleave(self, repeats: int) -> "TokenLayout":
        """Every row repeated ``repeats`` times (row b becomes rows b·r … b·r + r − 1)."""
        return TokenLayout(*(t.repeat_interleave(repeats, 0) for t in (self.is_global, self.pos, self.valid)))


def attention_mask(query: TokenLayout, key: TokenLayout, causal: bool = True,
                   seq_sees_global: bool = False) -> Tensor:
    """[B, Q, K] bool, True where a query may attend to a key (the rule of the module docstring).

    Args:
        query: the queries' layout [B, Q].
        key: the keys' layout [B, K] (same B, or one of the two with B = 1, broadcast).
        causal: sequence queries see only sequence keys at or before their position.
        seq_sees_global: sequence queries may also attend to global keys (off for LONGER).
    """
    qg, qp = query.is_global.unsqueeze(2), query.pos.unsqueeze(2)  # [B, Q, 1]
    kg, kp, kv = key.is_global.unsqueeze(1), key.pos.unsqueeze(1), key.valid.unsqueeze(1)  # [B, 1, K]
    seq_key_ok = ~kg & (kp <= qp) if causal else ~kg
    if seq_sees_global:
        seq_key_ok = seq_key_ok | kg
    return kv & (qg | seq_key_ok)


def causal_mask(n: int, device: torch.device | str | None = None) -> Tensor:
    """[n, n] bool lower-triangular mask: query i sees keys 0..i.

    Example:
        >>> causal_mask(3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def key_padding_mask(valid: Tensor, num_queries: int | None = None) -> Tensor:
    """[B, Q, K] (or [B, 1, K] without ``num_queries``) bool from key validity ``valid`` [B, K]: full attention
    over the valid keys."""
    m = valid.bool().unsqueeze(1)
    return m if num_queries is None else m.expand(-1, num_queries, -1)


def has_key(mask: Tensor) -> Tensor:
    """[..., Q] bool: True where a query row of ``mask`` [..., Q, K] may attend to at least one key."""
    return mask.any(-1)


def additive_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The boolean mask as an additive one: 0 where allowed, −inf where masked.

    Example:
        >>> additive_mask(torch.tensor([True, False])).tolist()
        [0.0, -inf]
    """
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, float("-inf"))


__all__ = ["TokenLayout", "attention_mask", "causal_mask", "key_padding_mask", "has_key", "additive_mask"]
