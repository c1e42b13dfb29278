"""The two MoE layers of an MTmixAtt block (Qi et al., *MTmixAtt*, arXiv 2510.15286): a shared dense MoE with
sigmoid gates, fine-grained and shared experts, and a scenario-aware sparse MoE.

Both work on tokens x [..., T, D] and, as RankMixer's per-token FFN, every token has its own expert weights.

* ``SharedDenseMoE`` (DeepSeekMoE-style): ``num_experts`` FFN experts, each split into ``split`` fine-grained
  sub-experts, plus ``shared_experts`` always-on sub-experts; every sub-expert has width
  ``hidden // (num_experts·split + shared_experts)``, so the layer costs one FFN of hidden width ``hidden`` whatever
  the split. Dense activation: every sub-expert runs, routed ones weighted by a sigmoid gate ``σ(r_t(x_t))``, shared
  ones by 1. Output ``y_t = Σ_shared e(x_t) + Σ_routed σ(r_t(x_t))_j e_j(x_t)``.
* ``ScenarioSparseMoE``: ``shared_experts`` always-on experts gated by Router-1 (``σ``), plus one expert per
  scenario; Router-2 gives scenario logits per token, the request's scenario gets a bonus γ, and each sample uses
  the top ``1 + auto_experts`` scenario experts of its token-averaged biased logits (the assigned one, once γ
  dominates, and ``auto_experts`` auto-selected ones), each gated per token by ``σ(biased logit)``. Only the selected
  scenario experts run (a loop over the C scenario experts on the rows that chose them, no loop over samples), so
  the compute is that of ``shared_experts + 1 + auto_experts`` experts whatever C.

What is the paper's and what is ours:

* **Paper** ([SRC]): fine-grained experts at equal compute, always-on shared experts, sigmoid gating with dense
  activation (better than RankMixer's ReLU sparse MoE in their ablation); shared + scenario experts, the +γ bonus
  on the current scenario's router logit, top-k other scenario experts with sigmoid gates, two routers (Router-1
  for the shared experts, Router-2 for the scenario experts); the best "2 shared + 1 assigned + 1 auto-selected"
  configuration (our defaults).
* **Ours**: per-token experts and per-token routers (as RankMixer's PFFN and router); the sizing rule (the dense
  MoE's total hidden width is fixed and divided among the sub-experts); the routed sub-experts' output biases are
  merged into one ungated bias per token (one fused matmul per layer); the scenario experts are selected **per
  sample** (the scenario is a request property) on the token-mean of the biased logits and gated per token; the
  gate of a selected scenario expert includes γ (the bonus is on the logits, so γ → ∞ makes the assigned expert
  always selected and fully open); a scenario id outside [0, C) gets no bonus; no load-balancing loss; rows
  masked out (padded candidates) skip the scenario experts.

Example:
    >>> import torch
    >>> dense = SharedDenseMoE(num_tokens=3, dim=8, hidden=32, num_experts=3, split=2, shared_experts=2)
    >>> dense(torch.randn(4, 5, 3, 8)).shape, dense.sub_hidden                 # 32 // (3·2 + 2) = 4
    (torch.Size([4, 5, 3, 8]), 4)
    >>> scene = ScenarioSparseMoE(num_tokens=3, dim=8, num_scenarios=4, hidden=6, bonus=100.0)
    >>> x, tab = torch.randn(4, 5, 3, 8), torch.tensor([0, 1, 2, 3])
    >>> scene(x, tab).shape                                                    # tab [B] broadcasts over [B, M]
    torch.Size([4, 5, 3, 8])
    >>> idx, gates = scene.route(x, tab)                                       # [B, M, 1 + auto], [B, M, T, 1 + auto]
    >>> bool((idx == tab.view(4, 1, 1)).any(-1).all()), tuple(gates.shape)    # γ = 100: the assigned one is in
    (True, (4, 5, 3, 2))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.experts import GroupedLinear


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


class TokenExperts(nn.Module):
    """E gated two-layer GELU FFN experts (D → h → D) per token, run densely as two batched matmuls.

    ``forward(x, gates)``: x [..., T, D], gates [..., T, E] → ``Σ_e gates_e · W2_e GELU(W1_e x + b1_e) + b2``
    [..., T, D] (one ungated output bias per token).

    Args:
        num_tokens: T.
        dim: D.
        num_experts: E.
        hidden: h, the width of each expert.

    Example:
        >>> import torch
        >>> ex = TokenExperts(num_tokens=2, dim=4, num_experts=3, hidden=5)
        >>> ex(torch.randn(6, 2, 4), torch.ones(6, 2, 3)).shape, tuple(ex.first.weight.shape)
        (torch.Size([6, 2, 4]), (2, 4, 15))
    """

    def __init__(self, num_tokens: int, dim: int, num_experts: int, hidden: int):
        super().__init__()
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("num_experts", num_experts),
                           ("hidden", hidden)):
            _check_int(f"TokenExperts.{key}", value, 1)
        self.num_tokens, self.dim, self.num_experts, self.hidden = num_tokens, dim, num_experts, hidden
        self.first = GroupedLinear(num_tokens, dim, num_experts * hidden)
        self.second = GroupedLinear(num_tokens, num_experts * hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor, gates: Tensor) -> Tensor:
        """x [..., T, D], gates [..., T, E] → [..., T, D]."""
        a = self.act(self.first(x, grouped=True)).unflatten(-1, (self.num_experts, self.hidden))
        return self.second((a * gates.unsqueeze(-1)).flatten(-2), grouped=True)


class SharedDenseMoE(nn.Module):
    """Dense MoE with sigmoid gates, fine-grained routed sub-experts and always-on shared sub-experts, per token
    (see the module docstring).

    Args:
        num_tokens: T.
        dim: D.
        hidden: the total hidden width (the compute of one FFN of this width per token).
        num_experts: E coarse experts.
        split: m, fine-grained sub-experts per coarse expert (E·m routed sub-experts).
        shared_experts: always-on sub-experts (0 for none).

    ``forward(x)``: x [..., T, D] → [..., T, D]. ``gates(x)``: the routed gates [..., T, E·m].

    Example:
        >>> import torch
        >>> moe = SharedDenseMoE(num_tokens=2, dim=4, hidden=12, num_experts=2, split=2, shared_experts=1)
        >>> moe.gates(torch.randn(3, 2, 4)).shape, moe.sub_hidden
        (torch.Size([3, 2, 4]), 2)
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, num_experts: int = 3, split: int = 2,
                 shared_experts: int = 2):
        super().__init__()
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("hidden", hidden),
                           ("num_experts", num_experts), ("split", split)):
            _check_int(f"SharedDenseMoE.{key}", value, 1)
        _check_int("SharedDenseMoE.shared_experts", shared_experts, 0)
        routed = num_experts * split
        subs = routed + shared_experts
        if hidden < subs:
            raise ConfigError(f"SharedDenseMoE.hidden ({hidden}) must be >= the {subs} sub-experts "
                              f"(num_experts·split + shared_experts)")
        self.num_tokens, self.dim, self.routed, self.shared_experts = num_tokens, dim, routed, shared_experts
        self.sub_hidden = hidden // subs
        self.experts = TokenExperts(num_tokens, dim, subs, self.sub_hidden)  # shared sub-experts first
        self.router = GroupedLinear(num_tokens, dim, routed)

    def gates(self, x: Tensor) -> Tensor:
        """The routed sub-experts' sigmoid gates [..., T, E·m]."""
        return torch.sigmoid(self.router(x, grouped=True))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] → [..., T, D]."""
        if x.dim() < 2 or x.shape[-2:] != (self.num_tokens, self.dim):
            raise ConfigError(f"SharedDenseMoE expects [..., {self.num_tokens}, {self.dim}] inputs, got "
                              f"{list(x.shape)}")
        g = self.gates(x)
        if self.shared_experts:
            g = torch.cat([g.new_ones(*g.shape[:-1], self.shared_experts), g], -1)
        return self.experts(x, g)


class ScenarioSparseMoE(nn.Module):
    """Shared experts + one expert per scenario with a γ bonus for the request's scenario (see the module
    docstring).

    Args:
        num_tokens: T.
        dim: D.
        num_scenarios: C, one expert per scenario (ids 0 … C − 1).
        hidden: the width of every expert (shared and scenario).
        shared_experts: always-on experts gated by Router-1 (0 for none).
        auto_experts: scenario experts selected besides the assigned one (k; 1 + k are used per sample).
        bonus: γ ≥ 0, added to the router logit of the request's own scenario.

    ``forward(x, scenario, mask=None)``: x [..., T, D], ``scenario`` (int64 ids, a prefix of x's leading dims, e.g.
    [B] for x [B, M, T, D]) and ``mask`` (bool over the leading dims, e.g. ``cand_mask``: rows with False skip the
    scenario experts, so padded candidates cost nothing and never change how real rows are grouped) → [..., T, D].
    ``route(x, scenario)`` gives the selected scenario experts [..., 1 + k] and their per-token gates
    [..., T, 1 + k].

    Example:
        >>> import torch
        >>> moe = ScenarioSparseMoE(num_tokens=2, dim=4, num_scenarios=3, hidden=5, shared_experts=0,
        ...                         auto_experts=0, bonus=1e4)
        >>> moe.route(torch.randn(6, 2, 4), torch.tensor([2, 0, 1, 2, 0, 1]))[0].squeeze(-1)
        tensor([2, 0, 1, 2, 0, 1])
    """

    def __init__(self, num_tokens: int, dim: int, num_scenarios: int, hidden: int, shared_experts: int = 2,
                 auto_experts: int = 1, bonus: float = 2.0):
        super().__init__()
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("num_scenarios", num_scenarios),
                           ("hidden", hidden)):
            _check_int(f"ScenarioSparseMoE.{key}", value, 1)
        _check_int("ScenarioSparseMoE.shared_experts", shared_experts, 0)
        _check_int("ScenarioSparseMoE.auto_experts", auto_experts, 0)
        if auto_experts >= num_scenarios:
            raise ConfigError(f"ScenarioSparseMoE.auto_experts ({auto_experts}) must be < num_scenarios "
                              f"({num_scenarios})")
        if not bonus >= 0:
            raise ConfigError(f"ScenarioSparseMoE.bonus must be >= 0, got {bonus!r}")
        t, c = num_tokens, num_scenarios
        self.num_tokens, self.dim, self.num_scenarios, self.hidden = t, dim, c, hidden
        self.shared_experts, self.auto_experts, self.bonus = shared_experts, auto_experts, float(bonus)
        self.shared = TokenExperts(t, dim, shared_experts, hidden) if shared_experts else None
        self.shared_router = GroupedLinear(t, dim, shared_experts) if shared_experts else None  # Router-1
        self.scene_router = GroupedLinear(t, dim, c)  # Router-2
        self.first = GroupedLinear(c * t, dim, hidden)  # scenario expert (c, t) is group c·T + t
        self.second = GroupedLinear(c * t, hidden, dim)
        self.act = nn.GELU()

    @property
    def active_experts(self) -> int:
        """Experts each token uses: shared + 1 assigned + auto-selected."""
        return self.shared_experts + 1 + self.auto_experts

    def _scenario(self, scenario: Tensor, lead: torch.Size) -> Tensor:
        if scenario.dim() > len(lead) or tuple(scenario.shape) != tuple(lead[: scenario.dim()]):
            raise ConfigError(f"ScenarioSparseMoE: scenario {list(scenario.shape)} must be a prefix of the leading "
                              f"dims {list(lead)} of the tokens")
        return scenario.reshape(*scenario.shape, *([1] * (len(lead) - scenario.dim()))).expand(lead)

    def route(self, x: Tensor, scenario: Tensor) -> tuple[Tensor, Tensor]:
        """Selected scenario experts [..., 1 + k] (int64) and their per-token sigmoid gates [..., T, 1 + k]."""
        scen = self._scenario(scenario, x.shape[:-2])
        own = torch.arange(self.num_scenarios, device=x.device) == scen.unsqueeze(-1)  # [..., C]
        biased = self.scene_router(x, grouped=True) + self.bonus * own.unsqueeze(-2).to(x.dtype)  # [..., T, C]
        idx = torch.topk(biased.detach().mean(-2), 1 + self.auto_experts, dim=-1).indices  # [..., K]
        chosen = biased.gather(-1, idx.unsqueeze(-2).expand(*biased.shape[:-1], idx.shape[-1]))
        return idx, torch.sigmoid(chosen)

    def forward(self, x: Tensor, scenario: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [..., T, D], ``scenario`` (a prefix of the leading dims), ``mask`` (bool, the leading dims, or None)
        → [..., T, D]. Rows with ``mask`` False (padded candidates) skip the scenario experts."""
        t, d, c, h = self.num_tokens, self.dim, self.num_scenarios, self.hidden
        if x.dim() < 3 or x.shape[-2:] != (t, d):
            raise ConfigError(f"ScenarioSparseMoE expects [..., {t}, {d}] inputs, got {list(x.shape)}")
        idx, gates = self.route(x, scenario)
        k = idx.shape[-1]
        out = x.new_zeros(x.shape)
        if self.shared is not None:
            out = self.shared(x, torch.sigmoid(self.shared_router(x, grouped=True)))
        xs = x.reshape(-1, t, d)
        flat = idx.reshape(-1)  # [R·K], slot r·K + j = row r's j-th choice
        if flat.numel() == 0:
            return out
        if mask is not None:  # masked rows go to a dummy bucket c that computes nothing
            keep = mask.expand(x.shape[:-2]).reshape(-1, 1).expand(-1, k).reshape(-1)
            flat = torch.where(keep, flat, c)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=c + 1).tolist()  # one device sync per layer
        w1, b1 = self.first.weight.view(c, t, d, h), self.first.bias.view(c, t, h)
        w2, b2 = self.second.weight.view(c, t, h, d), self.second.bias.view(c, t, d)
        ys = []
        for e, slots in enumerate(order.split(counts)):  # a loop over the C scenario experts, not over rows
            if e == c or slots.numel() == 0:
                ys.append(x.new_zeros(slots.numel(), t, d))
                continue
            xe = xs.index_select(0, torch.div(slots, k, rounding_mode="floor"))  # [n, T, D]
            he = self.act(torch.einsum("ntd,tdh->nth", xe, w1[e]) + b1[e])
            ys.append(torch.einsum("nth,thd->ntd", he, w2[e]) + b2[e])
        y = torch.cat(ys).index_select(0, torch.argsort(order)).view(-1, k, t, d)  # back to slot order
        g = gates.reshape(-1, t, k).transpose(1, 2).unsqueeze(-1)  # [R, K, T, 1]
        return out + (g * y).sum(1).view(x.shape)
