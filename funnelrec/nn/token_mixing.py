"""Token mixing and token-wise FFNs of RankMixer-style backbones (Zhu et al., *RankMixer*, CIKM'25, §3.3–3.4).

* ``token_mixing`` / ``TokenMixing`` — parameter-free multi-head token mixing. Each of the T tokens [D] is split
  into H heads of width D/H; output token h is the concatenation of head h of every token:
  ``s_h = concat(x_1^h, …, x_T^h)``. **Shape rule**: x [..., T, D] with ``D % H == 0`` → [..., H, T·D/H]. With
  H = T (the paper's choice and the default) the shape is unchanged, so a residual ``x + mix(x)`` works; then
  D % T == 0 is required and mixing is a pure permutation of the T·D entries that is its own inverse (a block
  transpose). ``token_unmixing`` undoes it for any H.
* ``PerTokenFFN`` — PFFN: every token has its own two-layer FFN, ``v_t = W2^t GELU(W1^t s_t + b1^t) + b2^t``
  (W1^t [D, kD], W2^t [kD, D]); all tokens run in one batched matmul per layer (``GroupedLinear``).
* ``SharedFFN`` — one FFN applied to every token (a Transformer FFN): the paper's "shared FFN" ablation.

Example:
    >>> import torch
    >>> x = torch.arange(8.0).view(1, 2, 4)       # T = 2 tokens [0 1 2 3], [4 5 6 7]; H = 2 heads of width 2
    >>> token_mixing(x)                            # token h = head h of token 0, then head h of token 1
    tensor([[[0., 1., 4., 5.],
             [2., 3., 6., 7.]]])
    >>> torch.equal(token_unmixing(token_mixing(x), tokens=2), x)
    True
    >>> token_mixing(torch.randn(3, 4, 12), heads=2).shape    # H != T: [..., H, T·D/H]
    torch.Size([3, 2, 24])
    >>> PerTokenFFN(num_tokens=4, dim=8, hidden=16)(torch.randn(3, 4, 8)).shape
    torch.Size([3, 4, 8])
"""

from __future__ import annotations

from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.experts import GroupedLinear


def token_mixing(x: Tensor, heads: int | None = None) -> Tensor:
    """Parameter-free multi-head token mixing: x [..., T, D] → [..., H, T·D/H] (H defaults to T, shape unchanged).

    Args:
        x: tokens [..., T, D].
        heads: H; D must be divisible by H. None means H = T.
    """
    t, d = x.shape[-2], x.shape[-1]
    h = t if heads is None else heads
    if not isinstance(h, int) or h < 1 or d % h:
        raise ConfigError(f"token mixing needs the token width D={d} divisible by the head count H={h}")
    # [..., T, D] → [..., T, H, D/H] → [..., H, T, D/H] → [..., H, T·D/H]
    return x.unflatten(-1, (h, d // h)).transpose(-3, -2).flatten(-2)


def token_unmixing(y: Tensor, tokens: int) -> Tensor:
    """The inverse of ``token_mixing``: y [..., H, T·D/H] → x [..., T, D].

    Args:
        y: mixed tokens [..., H, W] with W divisible by ``tokens``.
        tokens: T, the token count before mixing.
    """
    w = y.shape[-1]
    if not isinstance(tokens, int) or tokens < 1 or w % tokens:
        raise ConfigError(f"token unmixing needs the mixed width {w} divisible by the token count T={tokens}")
    return y.unflatten(-1, (tokens, w // tokens)).transpose(-3, -2).flatten(-2)


class TokenMixing(nn.Module):
    """``token_mixing`` as a module (no parameters).

    Args:
        heads: H; None means H = T (the shape is kept, as RankMixer's residual needs).

    Example:
        >>> import torch
        >>> mix = TokenMixing()
        >>> mix(torch.randn(5, 4, 8)).shape, sum(p.numel() for p in mix.parameters())
        (torch.Size([5, 4, 8]), 0)
    """

    def __init__(self, heads: int | None = None):
        super().__init__()
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise ConfigError(f"TokenMixing.heads must be None or an int >= 1, got {heads!r}")
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] → [..., H, T·D/H] ([..., T, D] when H = T)."""
        return token_mixing(x, self.heads)


class PerTokenFFN(nn.Module):
    """RankMixer's per-token FFN: T separate ``Linear(D, hidden) → GELU → Linear(hidden, D)`` maps, token t through
    FFN t, as one batched matmul per layer.

    Args:
        num_tokens: T.
        dim: D.
        hidden: the hidden width (k·D in the paper).
        dropout: dropout on the hidden activation.

    Example:
        >>> import torch
        >>> ffn = PerTokenFFN(num_tokens=3, dim=4, hidden=8)
        >>> ffn(torch.randn(2, 5, 3, 4)).shape, ffn.first.weight.shape     # weights [T, in, out]
        (torch.Size([2, 5, 3, 4]), torch.Size([3, 4, 8]))
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.first = GroupedLinear(num_tokens, dim, hidden)
        self.second = GroupedLinear(num_tokens, hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_tokens(self) -> int:
        return self.first.groups

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] → [..., T, D] (token t through FFN t)."""
        return self.second(self.drop(self.act(self.first(x, grouped=True))), grouped=True)


class SharedFFN(nn.Module):
    """One ``Linear(D, hidden) → GELU → Linear(hidden, D)`` applied to every token (the "shared FFN" ablation).

    Args:
        dim: D.
        hidden: the hidden width.
        dropout: dropout on the hidden activation.

    Example:
        >>> import torch
        >>> SharedFFN(dim=4, hidden=8)(torch.randn(2, 3, 4)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ConfigError(f"SharedFFN needs positive sizes, got dim={dim} hidden={hidden}")
        self.first = nn.Linear(dim, hidden)
        self.second = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] → [..., T, D] (every token through the same FFN)."""
        return self.second(self.drop(self.act(self.first(x))))
