"""Per-scenario low-rank adapters (MLoRA: Yang et al., *MLoRA: Multi-Domain Low-Rank Adaptive Network for CTR
Prediction*, RecSys'24) for ``GroupedLinear`` layers, as MTmixAtt's non-main-scenario heads use them.

``ScenarioLoRA`` gives the delta ``ΔW_s x = (x A_s) B_s`` of a G-group linear layer for the request's scenario s
(A_s [G, in, r], B_s [G, r, out]); the main scenario has no adapter (its delta is exactly 0), so a layer
``base(x) + lora(x, s)`` is the plain layer on the main scenario. Every request picks its own adapter by a gather
(vectorised; no loop over requests or scenarios).

What is the paper's and what is ours:

* **Paper** ([SRC], MTmixAtt): the main scenario uses the plain DNN head, the other scenarios the same head plus an
  MLoRA low-rank adapter of rank r.
* **Ours**: one adapter per non-main scenario and per group (task head), LoRA's initialisation (A like
  ``nn.Linear``'s weight, B = 0, so training starts from the shared head), no α/r scaling; the adapter is chosen
  per request (leading dim 0 of x).

Example:
    >>> import torch
    >>> lora = ScenarioLoRA(groups=3, in_dim=4, out_dim=2, num_scenarios=5, rank=2, main=1)
    >>> tuple(lora.a.shape), tuple(lora.b.shape)           # C − 1 adapters: the main scenario has none
    ((4, 3, 4, 2), (4, 3, 2, 2))
    >>> with torch.no_grad():
    ...     _ = lora.b.fill_(0.5)
    >>> delta = lora(torch.randn(2, 7, 4), torch.tensor([1, 3]))   # x [B, M, in], scenario [B]
    >>> delta.shape, bool(delta[0].eq(0).all()), bool(delta[1].ne(0).any())
    (torch.Size([2, 7, 3, 2]), True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError


class ScenarioLoRA(nn.Module):
    """Rank-r per-scenario delta of a G-group linear layer (see the module docstring).

    Args:
        groups: G (e.g. task heads).
        in_dim: input width.
        out_dim: output width.
        num_scenarios: C; ids 0 … C − 1.
        rank: r.
        main: the scenario without an adapter.

    ``forward(x, scenario, grouped=False)``: x [B, ..., in] (every group reads it) or, with ``grouped``,
    [B, ..., G, in]; ``scenario`` [B] int64 → the delta [B, ..., G, out] (0 for the main scenario's requests).
    """

    def __init__(self, groups: int, in_dim: int, out_dim: int, num_scenarios: int, rank: int, main: int = 0):
        super().__init__()
        for key, value in (("groups", groups), ("in_dim", in_dim), ("out_dim", out_dim),
                           ("num_scenarios", num_scenarios), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ScenarioLoRA.{key} must be an int >= 1, got {value!r}")
        if not isinstance(main, int) or not 0 <= main < num_scenarios:
            raise ConfigError(f"ScenarioLoRA.main must be a scenario id in [0, {num_scenarios}), got {main!r}")
        self.groups, self.num_scenarios, self.rank, self.main = groups, num_scenarios, rank, main
        n = max(num_scenarios - 1, 1)  # adapters of the non-main scenarios (a dummy one when there are none)
        bound = 1.0 / math.sqrt(in_dim)
        self.a = nn.Parameter(torch.empty(n, groups, in_dim, rank).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(n, groups, rank, out_dim))

    def forward(self, x: Tensor, scenario: Tensor, grouped: bool = False) -> Tensor:
        """x [B, ..., in] (or [B, ..., G, in] with ``grouped``), scenario [B] → [B, ..., G, out]."""
        if scenario.dim() != 1 or x.dim() < 2 or scenario.shape[0] != x.shape[0]:
            raise ConfigError(f"ScenarioLoRA needs scenario [B] and x [B, ...], got {list(scenario.shape)} and "
                              f"{list(x.shape)}")
        if grouped and (x.dim() < 3 or x.shape[-2] != self.groups):
            raise ConfigError(f"grouped input must be [B, ..., {self.groups}, in], got {list(x.shape)}")
        lead = x.shape[:-2] if grouped else x.shape[:-1]
        other = scenario != self.main
        slot = (scenario - (scenario > self.main).long()).clamp(0, self.a.shape[0] - 1)  # main → any slot, masked
        # index_select, not self.a[slot]: its backward (index_add_) sums repeated slots in a fixed order on CPU
        a, b = self.a.index_select(0, slot), self.b.index_select(0, slot)  # [B, G, in, r], [B, G, r, out]
        if grouped:
            u = torch.einsum("bngi,bgir->bngr", x.reshape(x.shape[0], -1, self.groups, x.shape[-1]), a)
        else:
            u = torch.einsum("bni,bgir->bngr", x.reshape(x.shape[0], -1, x.shape[-1]), a)
        delta = torch.where(other.view(-1, 1, 1, 1), torch.einsum("bngr,bgro->bngo", u, b), 0.0)
        return delta.view(*lead, self.groups, -1)
