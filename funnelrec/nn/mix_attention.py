"""Learnable multi-head token mixing, the "multi-mix attention" of MTmixAtt (Qi et al., arXiv 2510.15286).

Tokens x [..., T, D] are split along D into H heads of width D/H; head h has its own learnable T × T matrix
``M_h`` applied along the token axis, and the heads are concatenated back:

    y[..., i, h-th slice] = Σ_j M_h[i, j] · x[..., j, h-th slice]          (shape kept: [..., T, D])

It generalises RankMixer's parameter-free mixing (``funnelrec.nn.token_mixing``): a fixed permutation per head is a
fixed shuffle of the tokens, a learned matrix is a learned one.

What is the paper's and what is ours:

* **Paper** ([SRC]): the per-head split along the feature dimension, a learnable n_g × n_g matrix per head along
  the token axis, the residual around it, orthogonal initialisation (approximating RankMixer's fixed
  transpose/shuffle at the start) and the zero-initialisation ablation.
* **Ours**: the residual is the block's "Add & Norm" (``funnelrec.ranking.mtmixatt.MTmixAttBlock``), not part of
  this module, so ``forward`` is the mixing alone; H defaults to T (RankMixer's choice); the orthogonal
  matrices are ``nn.init.orthogonal_`` per head (global RNG); the extra ``init="shift"``: head h starts as the cyclic
  shift ``M_h[i, (i + h) mod T] = 1`` (a permutation, so orthogonal), under which, with H = T, output token i
  holds one slice of every input token, the information pattern of RankMixer's fixed mixing (the slices keep their
  head position instead of being transposed).

Example:
    >>> import torch
    >>> mix = LearnableTokenMixing(num_tokens=3, dim=6, heads=3, init="shift")
    >>> x = torch.arange(18.0).view(1, 3, 6)
    >>> mix(x).detach()                        # head h of token i = head h of token (i + h) mod 3
    tensor([[[ 0.,  1.,  8.,  9., 16., 17.],
             [ 6.,  7., 14., 15.,  4.,  5.],
             [12., 13.,  2.,  3., 10., 11.]]])
    >>> m = LearnableTokenMixing(4, 8).weight.detach()        # orthogonal by default: M_h M_hᵀ = I
    >>> m.shape, torch.allclose(m @ m.transpose(-1, -2), torch.eye(4).expand(4, 4, 4), atol=1e-5)
    (torch.Size([4, 4, 4]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError

MIXING_INITS = ("orthogonal", "zero", "shift")


class LearnableTokenMixing(nn.Module):
    """Per-head learnable T × T token mixing (see the module docstring).

    Args:
        num_tokens: T.
        dim: D (divisible by H).
        heads: H; None means H = T.
        init: ``"orthogonal"`` (the paper's), ``"zero"`` (the ablation) or ``"shift"`` (cyclic shift per head).

    ``forward(x)``: x [..., T, D] → [..., T, D]. ``weight`` is [H, T, T] (``weight[h]`` is M_h).

    Example:
        >>> import torch
        >>> mix = LearnableTokenMixing(num_tokens=4, dim=8, heads=2, init="zero")
        >>> mix(torch.randn(5, 4, 8)).abs().sum().item(), tuple(mix.weight.shape)
        (0.0, (2, 4, 4))
    """

    def __init__(self, num_tokens: int, dim: int, heads: int | None = None, init: str = "orthogonal"):
        super().__init__()
        h = num_tokens if heads is None else heads
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("heads", h)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"LearnableTokenMixing.{key} must be an int >= 1, got {value!r}")
        if dim % h:
            raise ConfigError(f"LearnableTokenMixing.dim ({dim}) must be divisible by the head count H={h}")
        if init not in MIXING_INITS:
            raise ConfigError(f"LearnableTokenMixing.init must be one of {MIXING_INITS}, got {init!r}")
        self.num_tokens, self.dim, self.heads, self.init = num_tokens, dim, h, init
        self.weight = nn.Parameter(torch.empty(h, num_tokens, num_tokens))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the mixing matrices by ``init``."""
        t = self.num_tokens
        with torch.no_grad():
            if self.init == "zero":
                self.weight.zero_()
            elif self.init == "shift":
                rows = torch.arange(t)
                self.weight.zero_()
                for h in range(self.heads):
                    self.weight[h, rows, (rows + h) % t] = 1.0
            else:
                for h in range(self.heads):
                    nn.init.orthogonal_(self.weight[h])

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] → [..., T, D] (head h of every output token mixes head h of the input tokens by M_h)."""
        if x.dim() < 2 or x.shape[-2:] != (self.num_tokens, self.dim):
            raise ConfigError(f"LearnableTokenMixing expects [..., {self.num_tokens}, {self.dim}] inputs, got "
                              f"{list(x.shape)}")
        heads = x.unflatten(-1, (self.heads, self.dim // self.heads))  # [..., T, H, D/H]
        return torch.einsum("hij,...jhc->...ihc", self.weight, heads).flatten(-2)
