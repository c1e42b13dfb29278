"""The DCNv2 cross network: explicit, bounded-degree feature crosses.

DCNv2 (Wang et al., *DCN V2: Improved Deep & Cross Network*, WWW'21), layer ``l``:

    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l                     (full rank, W_l [F, F])
    x_{l+1} = x_0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l             (low rank R, U_l, V_l [F, R])

so ``L`` layers build every feature cross up to degree ``L + 1``. The low-rank form is the paper's cost-saving
variant (its §3.3 without the mixture of experts); use it when F is a few hundred or more.

Example:
    >>> import torch
    >>> net = CrossNetwork(in_dim=10, layers=3, low_rank=4)
    >>> net(torch.randn(2, 5, 10)).shape      # [..., F] -> [..., F]
    torch.Size([2, 5, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

from funnelrec.errors import ConfigError


class CrossNetwork(nn.Module):
    """``layers`` DCNv2 cross layers over the input vector (see the module docstring).

    Args:
        in_dim: F, the input (and output) width.
        layers: L, the number of cross layers.
        low_rank: R for the low-rank layers ``U (V^T x)``; None for full-rank ``W x``.

    Example:
        >>> import torch
        >>> CrossNetwork(6, layers=2)(torch.randn(3, 6)).shape
        torch.Size([3, 6])
    """

    def __init__(self, in_dim: int, layers: int, low_rank: int | None = None):
        super().__init__()
        if in_dim < 1 or layers < 1:
            raise ConfigError(f"CrossNetwork needs in_dim >= 1 and layers >= 1, got {in_dim} and {layers}")
        if low_rank is not None and low_rank < 1:
            raise ConfigError(f"low_rank must be None or >= 1, got {low_rank}")
        self.in_dim, self.low_rank = in_dim, low_rank
        if low_rank is None:
            self.maps = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(layers))
        else:
            self.maps = nn.ModuleList(
                nn.Sequential(nn.Linear(in_dim, low_rank, bias=False), nn.Linear(low_rank, in_dim))  # V^T, then U, b
                for _ in range(layers))

    @property
    def num_layers(self) -> int:
        return len(self.maps)

    def forward(self, x0: Tensor) -> Tensor:
        """x0 [..., F] → [..., F]."""
        x = x0
        for layer in self.maps:
            x = x0 * layer(x) + x
        return x
