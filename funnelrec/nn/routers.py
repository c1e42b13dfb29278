"""ReLU-routed sparse mixtures of experts per token, with an L1 sparsity controller and dense-train/sparse-infer
(DTSI) routing (Zhu et al., *RankMixer*, CIKM'25, §3.5).

``ReLURouterMoE``: token t has its own E experts ``e_{t,j}`` (two-layer GELU FFNs D → h → D) and its own router
``r_t`` (a linear map D → E). The gates are ``G_{t,j} = ReLU(r_t(s_t))`` and the output is
``v_t = Σ_j G_{t,j} e_{t,j}(s_t)``: how many experts a token uses adapts per token and per sample (a gate at exactly
0 skips its expert). Sparsity comes from an L1 penalty ``λ · Σ_t Σ_j G_{t,j}`` (mean over samples) that the model
adds to its loss (``penalty``), with λ steered each training step toward a target activation ratio by a
``SparsityController``. The paper tunes λ "adaptively" without giving the rule; the controller's rule is ours: a PI
controller in log space on the error ``r − r*`` (r the share of open gates of the step's batch, r* the target), so
λ stays positive and moves by factors. The L1 term can only close gates, and a closed ReLU gate gets no gradient,
so an undershoot below the target is sticky (it recovers slowly, faster with DTSI, whose training router keeps
every expert trained), and a target above the share the task keeps open by itself is not reached (λ sinks to its
floor). Hence the defaults start λ tiny (1e-5) and steer slowly (integral gain 0.1 per step, proportional gain 5),
approaching the target from above: on the test kit's tiny world (lr 2e-3, ~150 steps) a target of 0.25 settled at
0.27–0.31 without DTSI and 0.21–0.24 with it, where an integral gain of 0.5 with λ₀ = 1e-3 fell to 0.03–0.05.

**DTSI** (``dtsi=True``): two routers per token, a *training* router and an *inference* router, both learned;
the L1 penalty (and the measured activation ratio) is on the inference router only, and in eval mode **only the
inference router is used**. How the two combine in the training forward is not stated in the paper; ours
(``dtsi_mix``):

* ``"sample"`` (default): every (sample, token) is routed by the training router or by the inference router with
  probability ½ each. Experts get dense-gate gradients from half the samples, and the inference router is trained
  on the task with exactly the gates it will use at inference, so train and eval outputs stay on one scale.
* ``"average"``: the gates are ``½ (G_train + G_infer)``, a soft mix kept for the ablation. The inference output
  lacks the training router's half (a train/eval mismatch), and the training router can take over the task while
  the L1 term closes the inference gates: on a toy regression the inference router fell far below the target
  ratio and the eval error rose, where ``"sample"`` held the target.

Routing with the training router only and the inference router only in the L1 term (one public implementation)
is not offered: the inference router then gets no task gradient and collapses.

Compute: ``forward`` evaluates every expert and weights it by its gate (exact: a zero gate contributes nothing), so
it runs as two batched matmuls. With ``sparse_dispatch=True`` the eval forward instead runs each expert on the rows
whose gate is open only (a loop over the T·E experts, never over rows): the same output, FLOPs ∝ activation ratio.

Example:
    >>> import torch
    >>> moe = ReLURouterMoE(num_tokens=3, dim=8, num_experts=4, hidden=6, dtsi=True, target_activation=0.25)
    >>> y = moe(torch.randn(5, 3, 8))                  # training mode: the penalty of this batch is kept
    >>> y.shape, moe.penalty.shape, 0.0 <= moe.activation_ratio <= 1.0
    (torch.Size([5, 3, 8]), torch.Size([]), True)
    >>> moe.gates(torch.randn(5, 3, 8)).shape          # the inference router's gates [..., T, E]
    torch.Size([5, 3, 4])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.experts import GroupedLinear

DTSI_MIXES = ("sample", "average")


class SparsityController(nn.Module):
    """Keeps the L1 coefficient λ and steers it toward a target activation ratio (a PI controller in log space).

    ``update(r)`` after a training step's measured ratio r, with the error ``e = r − target``:
    ``I ← I + rate · e`` and ``λ = exp(I + gain · e)``, both clamped to ``[min_coef, max_coef]``. λ grows while too
    many gates are open and shrinks while too few are; the integral ``I`` holds the λ that balances the task's pull
    at the target, and the proportional ``gain`` reacts at once, which damps the overshoot an integral-only rule
    shows (the ratio answers λ only through the optimiser, with a lag). With ``target=None`` λ stays at ``coef``.
    λ and I are persistent buffers (saved and resumed with the model).

    Args:
        coef: the initial (or fixed) λ ≥ 0.
        target: the target activation ratio r* in (0, 1], or None for a fixed λ.
        rate: the integral gain per step (≥ 0).
        gain: the proportional gain (≥ 0).
        min_coef: lower clamp of a steered λ (> 0, so a steered λ can grow again).
        max_coef: upper clamp of a steered λ.

    Example:
        >>> c = SparsityController(coef=0.01, target=0.5)
        >>> c.update(0.9); c.value > 0.01                     # too many gates open: λ goes up
        True
        >>> before = c.value; c.update(0.1); c.value < before  # too few: λ goes down
        True
    """

    def __init__(self, coef: float = 1e-5, target: float | None = None, rate: float = 0.1, gain: float = 5.0,
                 min_coef: float = 1e-6, max_coef: float = 10.0):
        super().__init__()
        if not coef >= 0:
            raise ConfigError(f"SparsityController.coef must be >= 0, got {coef!r}")
        if target is not None and not 0 < target <= 1:
            raise ConfigError(f"SparsityController.target must be None or in (0, 1], got {target!r}")
        if not rate >= 0 or not gain >= 0:
            raise ConfigError(f"SparsityController.rate and gain must be >= 0, got {rate!r}, {gain!r}")
        if not 0 < min_coef <= max_coef:
            raise ConfigError(f"SparsityController needs 0 < min_coef <= max_coef, got {min_coef}, {max_coef}")
        self.target, self.rate, self.gain, self.min_coef, self.max_coef = target, rate, gain, min_coef, max_coef
        start = min(max(coef, min_coef), max_coef) if target is not None else coef
        self.register_buffer("coef", torch.tensor(float(start)))
        self.register_buffer("integral", torch.tensor(math.log(start) if start > 0 else 0.0))

    @property
    def value(self) -> float:
        """The current λ."""
        return float(self.coef)

    @torch.no_grad()
    def update(self, ratio: Tensor | float) -> None:
        """One controller step on a measured activation ratio (a non-finite ratio, e.g. of an empty batch, is
        skipped). Works on tensors, so it never waits for the device."""
        if self.target is None:
            return
        r = torch.as_tensor(ratio, dtype=self.coef.dtype, device=self.coef.device)
        e = r - self.target
        lo, hi = math.log(self.min_coef), math.log(self.max_coef)
        integral = (self.integral + self.rate * e).clamp(lo, hi)
        coef = torch.exp((integral + self.gain * e).clamp(lo, hi))
        keep = ~torch.isfinite(r)
        self.integral.copy_(torch.where(keep, self.integral, integral))
        self.coef.copy_(torch.where(keep, self.coef, coef))


class ReLURouterMoE(nn.Module):
    """Per-token ReLU-routed mixture of experts with an L1 sparsity controller and optional DTSI routing (see the
    module docstring).

    Args:
        num_tokens: T (each token has its own experts and router; T = 1 is a plain ReLU-routed MoE).
        dim: D, the token width (input and output).
        num_experts: E experts per token.
        hidden: hidden width of every expert.
        dtsi: two routers (training / inference); only the inference router is used in eval mode.
        dtsi_mix: how the two routers combine in the training forward: ``"sample"`` or ``"average"``.
        l1_coef: the initial (or, without a target, fixed) L1 coefficient λ.
        target_activation: the target share of open gates r* in (0, 1], or None for a fixed λ.
        adapt_rate: the controller's integral gain (``SparsityController.rate``).
        dropout: dropout on the experts' hidden activations (training only).
        sparse_dispatch: in eval mode, run each expert on its open rows only (same output, fewer FLOPs).

    ``forward(x, mask=None)``: x [..., T, D] → [..., T, D]. ``mask`` (bool, the leading dims of x, e.g. [B, M]
    ``cand_mask``) says which rows count in the penalty and the measured ratio; None counts all. In training mode
    the call sets ``penalty`` (λ · mean per-row L1 of the inference gates, a scalar with gradient; add it to the
    loss), then steps the controller; in eval mode ``penalty`` is 0. ``activation_ratio`` is the share of open
    inference gates among counted rows in the last call.

    Example:
        >>> import torch
        >>> moe = ReLURouterMoE(num_tokens=2, dim=4, num_experts=3, hidden=5).eval()
        >>> moe(torch.randn(6, 2, 4)).shape, float(moe.penalty)
        (torch.Size([6, 2, 4]), 0.0)
    """

    def __init__(self, num_tokens: int, dim: int, num_experts: int, hidden: int, dtsi: bool = False,
                 dtsi_mix: str = "sample", l1_coef: float = 1e-5, target_activation: float | None = None,
                 adapt_rate: float = 0.1, dropout: float = 0.0, sparse_dispatch: bool = False):
        super().__init__()
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("num_experts", num_experts),
                           ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ReLURouterMoE.{key} must be an int >= 1, got {value!r}")
        if dtsi_mix not in DTSI_MIXES:
            raise ConfigError(f"ReLURouterMoE.dtsi_mix must be one of {DTSI_MIXES}, got {dtsi_mix!r}")
        t, e = num_tokens, num_experts
        self.num_tokens, self.dim, self.num_experts, self.hidden = t, dim, e, hidden
        self.dtsi, self.dtsi_mix, self.sparse_dispatch = bool(dtsi), dtsi_mix, bool(sparse_dispatch)
        self.first = GroupedLinear(t * e, dim, hidden)  # expert (t, j) is group t·E + j
        self.second = GroupedLinear(t * e, hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = GroupedLinear(t, dim, e)  # the inference router (the only one without DTSI)
        self.train_router = GroupedLinear(t, dim, e) if dtsi else None
        self.controller = SparsityController(l1_coef, target_activation, adapt_rate)
        self.register_buffer("last_ratio", torch.tensor(float("nan")), persistent=False)
        self.penalty: Tensor = torch.zeros(())

    @property
    def activation_ratio(self) -> float:
        """Share of open inference-router gates among the counted rows of the last forward (nan before any)."""
        return float(self.last_ratio)

    @property
    def l1_coef(self) -> float:
        """The current L1 coefficient λ."""
        return self.controller.value

    def gates(self, x: Tensor) -> Tensor:
        """The inference router's gates ``ReLU(r_t(x_t))`` [..., T, E] of x [..., T, D]."""
        return torch.relu(self.router(x, grouped=True))

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert of every token: x [..., T, D] → [..., T, E, D]."""
        t, e, d, h = self.num_tokens, self.num_experts, self.dim, self.hidden
        w1 = self.first.weight.view(t, e, d, h)
        hid = torch.einsum("...td,tedh->...teh", x, w1) + self.first.bias.view(t, e, h)
        out = self.second(self.drop(self.act(hid)).flatten(-3, -2), grouped=True)  # [..., T·E, D]
        return out.unflatten(-2, (t, e))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [..., T, D] (``mask``: bool over the leading dims) → [..., T, D]."""
        if x.dim() < 2 or x.shape[-2:] != (self.num_tokens, self.dim):
            raise ConfigError(f"ReLURouterMoE expects [..., {self.num_tokens}, {self.dim}] inputs, got "
                              f"{list(x.shape)}")
        g_infer = self.gates(x)  # [..., T, E]
        weight = (x.new_ones(x.shape[:-2]) if mask is None else mask.expand(x.shape[:-2]).to(x.dtype))
        rows = weight.sum()
        with torch.no_grad():  # share of open gates among counted rows; nan when no row counts
            opened = ((g_infer > 0).to(x.dtype).mean((-2, -1)) * weight).sum()
            self.last_ratio.copy_(torch.where(rows > 0, opened / rows.clamp(min=1), float("nan")))
        if not self.training:
            self.penalty = x.new_zeros(())
            if self.sparse_dispatch:
                return self._dispatch(x, g_infer)
            return (g_infer.unsqueeze(-1) * self.expert_outputs(x)).sum(-2)
        g = g_infer
        if self.train_router is not None:
            g_train = torch.relu(self.train_router(x, grouped=True))
            if self.dtsi_mix == "average":
                g = 0.5 * (g_train + g_infer)
            else:
                pick = torch.rand(x.shape[:-1], device=x.device) < 0.5  # [..., T]: route by the training router
                g = torch.where(pick.unsqueeze(-1), g_train, g_infer)
        l1 = (g_infer.sum((-2, -1)) * weight).sum() / rows.clamp(min=1)  # mean over rows of Σ_t Σ_j G_{t,j}
        self.penalty = self.controller.coef.clone().to(x.dtype) * l1  # λ before this step's update
        self.controller.update(self.last_ratio)
        return (g.unsqueeze(-1) * self.expert_outputs(x)).sum(-2)

    def _dispatch(self, x: Tensor, g: Tensor) -> Tensor:
        """Eval-time sparse compute: expert (t, j) runs on the rows whose gate G_{t,j} is open only."""
        t, e, d, h = self.num_tokens, self.num_experts, self.dim, self.hidden
        xs, gs = x.reshape(-1, t, d), g.reshape(-1, t, e)
        out = xs.new_zeros(xs.shape)
        w1, b1 = self.first.weight.view(t, e, d, h), self.first.bias.view(t, e, h)
        w2, b2 = self.second.weight.view(t, e, h, d), self.second.bias.view(t, e, d)
        for ti in range(t):
            for ej in range(e):
                rows = torch.nonzero(gs[:, ti, ej] > 0).squeeze(1)
                if rows.numel() == 0:
                    continue
                y = self.act(xs[rows, ti] @ w1[ti, ej] + b1[ti, ej]) @ w2[ti, ej] + b2[ti, ej]
                out[:, ti].index_add_(0, rows, gs[rows, ti, ej].unsqueeze(-1) * y)
        return out.view(x.shape)
