"""xMTF: formula-free multi-task fusion with Monotonic Fusion Cells and Two-Stage Hybrid learning.

The paper's (Cao et al., WWW 2025, arXiv 2504.05669):

* the fused score is a sum of per-task monotone functions personalised by the user state,
  z_i = Σ_k h̃_k(o_ki, s_t) (Sprecher: any fusion monotone in every o_k ranks as one of these);
* monotonicity comes from a pairwise hinge inside each request, not from the architecture,
  L_k^mono = Σ_{i,j} 1[o_ki < o_kj] · max(0, h̃_k(o_ki) − h̃_k(o_kj));
* Two-Stage Hybrid learning: an **inner** stage q = h̃^I_k(o_k, s) (an MLP, supervised) and an **outer** stage
  q·(1 + a_k·q) with one scalar a_k per task, the action a_t = μ(s_t) of an actor-critic agent trained on
  long-term reward; knowledge flows outer → inner by a BPR-style loss on the outer ranking,
  L_transfer = −Σ_{i,j} 1[z̃_i < z̃_j] · log σ(z̃^I_j − z̃^I_i), and
  L_I = λ·Σ_k L_k^mono + (1 − λ)·L_transfer, λ = 0.4;
* ablations: no inner stage (z = Σ_k o_k·(1 + a_k·o_k)), no outer stage, λ = 0.

Ours:

* q ∈ [0, q_max] by a scaled sigmoid, and a_k squashed into (−1/(2·q_max), a_max] so that the outer map's
  slope 1 + 2·a_k·q stays positive on the whole range of q (the notes' caveat; the paper does not bound a);
* the cell's input features φ(o) = [logit(o)/4, o, √o] (tasks differ 300× in scale), the T cells as one
  grouped MLP (einsum over a task axis, no Python loop over tasks), the state entering the first layer once
  per request;
* losses are *means* over the valid pairs of a request (masked candidates excluded), so λ weighs comparable
  terms;
* a temperature τ = 0.05 in the transfer loss, −τ·log σ((z̃^I_j − z̃^I_i)/τ): with bounded q, the paper's
  τ = 1 keeps pushing pairs that are already in order apart, which drives the cells into saturated steps (many
  ties at q_max); measured on ``sim:bench-v1``, the warm-started inner stage then loses ~6 % watch time
  against τ = 0.05;
* and for the same reason the transfer loss counts only the pairs the inner sum still orders differently from
  the outer stage (``only_misordered``): at a ≈ 0 the outer ranking *is* the inner one, and the paper's loss
  then distils the inner stage into itself, steepening every cell at each step until rankings decay (measured:
  the warm-started stage fell from ~760 to ~650 s per session over 500 RL steps). With it, the inner stage
  moves only where the actor's outer map reorders candidates — the knowledge transfer the paper intends;
* a much lower inner learning rate while the actor learns (``rl_lr``): an outer coefficient a_k ≠ 0 reorders
  candidates *whatever* the inner stage has already absorbed, so unless the actor moves a back towards 0 as
  fast as the inner stage absorbs it, the inner stage compounds the same transform step after step. With our
  TD3 budget the actor does not (measured on ``sim:bench-v1``, seed 0, 500 steps: inner rate 3e-4 → −25 %,
  3e-5 → −7 %, 1e-5 → −0.5 % watch time against the warm-started stage);
* a warm start: before RL, the inner stage is fitted (the same L_I, with the transfer target replaced by a
  teacher's ranking — the CEM-tuned formula), since any target ranking can be absorbed into the inner stage;
* the "no outer stage" ablation has no RL: its inner stage is fitted to the realised per-item watch time of
  the served pages (BPR on the served items) plus the monotonicity loss.

Example:
    >>> cfg = XMTFConfig(num_tasks=3, state_dim=4, hidden=8)
    >>> model = XMTF(cfg)
    >>> pxtr, state = torch.rand(2, 5, 3), torch.randn(2, 4)
    >>> model.fused(pxtr, state, torch.zeros(2, 3)).shape       # [B, M]
    torch.Size([2, 5])
    >>> q = model.inner(pxtr, state)
    >>> bool((q >= 0).all() and (q <= cfg.q_max).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.config import check_positive_ints
from funnelrec.errors import ConfigError

__all__ = ["XMTFConfig", "MonotonicFusionCells", "XMTF", "outer_map", "action_to_a", "monotonicity_loss",
           "pairwise_bpr_loss", "violation_rate"]

_EPS = 1e-6


@dataclass
class XMTFConfig:
    """xMTF settings.

    Args:
        num_tasks: T, inputs per candidate.
        state_dim: S, width of the user state.
        hidden: width of each cell's two hidden layers.
        q_max: the inner output range [0, q_max].
        a_max: the largest outer coefficient; the smallest is just above −1/(2·q_max).
        lam: λ, weight of the monotonicity loss in L_I (the paper's best: 0.4).
        use_inner: False = the "no inner stage" ablation (q = o).
        use_outer: False = the "no outer stage" ablation (z = Σ q, no RL).
        lr: Adam learning rate of the inner stage (warm start).
        rl_lr: its learning rate while the actor learns (``start_rl``): much lower, so that the inner stage
            absorbs the outer map more slowly than the actor can follow (ours; the two-stage loop is otherwise
            unstable, see the module docstring).
        tau: temperature of the transfer loss (``pairwise_bpr_loss``).
        only_misordered: the transfer loss counts only the pairs the inner sum orders differently from the
            target.
        seed: initialises the cells.
    """

    num_tasks: int
    state_dim: int
    hidden: int = 32
    q_max: float = 1.0
    a_max: float = 2.0
    lam: float = 0.4
    use_inner: bool = True
    use_outer: bool = True
    lr: float = 3e-3
    rl_lr: float = 1e-5
    tau: float = 0.05
    only_misordered: bool = True
    seed: int = 0

    def validate(self) -> "XMTFConfig":
        check_positive_ints(self, ("num_tasks", "state_dim", "hidden"), "xMTF config")
        if self.q_max <= 0:
            raise ConfigError(f"xMTF config: q_max={self.q_max!r} must be > 0")
        if self.a_max <= -1 / (2 * self.q_max):
            raise ConfigError(f"xMTF config: a_max={self.a_max!r} must exceed "
                              f"-1/(2·q_max)={-1 / (2 * self.q_max)}")
        if self.tau <= 0:
            raise ConfigError(f"xMTF config: tau={self.tau!r} must be > 0")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"xMTF config: lam={self.lam!r} must be in [0, 1]")
        if not (self.use_inner or self.use_outer):
            raise ConfigError("xMTF config: use_inner and use_outer cannot both be False")
        return self


def action_to_a(action: Tensor, q_max: float, a_max: float) -> Tensor:
    """Map actor outputs x ∈ [−1, 1] to outer coefficients a ∈ (−1/(2·q_max), a_max]: piecewise linear with
    x = 0 ↦ a = 0 (the outer map starts as the identity), x = 1 ↦ a_max and x = −1 ↦ just inside the lower
    bound (0.1 %), so 1 + 2·a·q > 0 for every q ∈ [0, q_max].

    Example:
        >>> action_to_a(torch.tensor([-1.0, 0.0, 1.0]), q_max=1.0, a_max=2.0)
        tensor([-0.4995,  0.0000,  2.0000])
    """
    lo = (1 - 1e-3) / (2 * q_max)
    x = action.clamp(-1, 1)
    return torch.where(x >= 0, x * a_max, x * lo)


def outer_map(q: Tensor, a: Tensor) -> Tensor:
    """The outer stage q·(1 + a·q): ``q`` [B, M, T], ``a`` [B, T] (or [T])."""
    if a.dim() == 1:
        a = a.unsqueeze(0)
    return q * (1 + a.unsqueeze(1) * q)


def _pair_mask(key: Tensor, mask: Tensor) -> Tensor:
    """[B, M, M, ...] True where i, j are valid candidates and key_i < key_j (``key`` [B, M] or [B, M, T])."""
    valid = mask.unsqueeze(2) & mask.unsqueeze(1)
    if key.dim() == 3:
        valid = valid.unsqueeze(-1)
    return valid & (key.unsqueeze(2) < key.unsqueeze(1))


def monotonicity_loss(o: Tensor, h: Tensor, mask: Tensor) -> Tensor:
    """Mean pairwise hinge max(0, h_i − h_j) over pairs with o_i < o_j, per task, summed over tasks.

    Args:
        o: [B, M, T] inputs.  h: [B, M, T] cell outputs.  mask: [B, M] valid candidates.

    Example:
        >>> o = torch.tensor([[[0.1], [0.2]]]); m = torch.ones(1, 2, dtype=torch.bool)
        >>> round(float(monotonicity_loss(o, torch.tensor([[[0.5], [0.3]]]), m)), 4)   # 0.2 a pair
        0.2
    """
    pairs = _pair_mask(o, mask)  # [B, M, M, T]
    hinge = (h.unsqueeze(2) - h.unsqueeze(1)).clamp(min=0) * pairs
    per_task = hinge.sum((0, 1, 2)) / pairs.sum((0, 1, 2)).clamp(min=1)
    return per_task.sum()


def pairwise_bpr_loss(target: Tensor, z: Tensor, mask: Tensor, tau: float = 1.0,
                      only_misordered: bool = False) -> Tensor:
    """Mean τ·(−log σ((z_j − z_i)/τ)) over valid pairs with target_i < target_j (BPR toward ``target``'s
    ranking; the factor τ keeps its slope at a tie at ½ whatever τ, so λ weighs it against the hinge as at
    τ = 1).

    Args:
        target: [B, M] the ranking to follow (no gradient).  z: [B, M] scores.  mask: [B, M] valid.
        tau: temperature τ: a pair ordered by more than a few τ no longer pulls (1 = the paper's loss).
        only_misordered: count only the pairs ``z`` does not yet order as ``target`` does (z_i ≥ z_j); the
            mean is still over all target pairs, so the loss is 0 once the orders agree.

    Example:
        >>> m = torch.ones(1, 2, dtype=torch.bool)
        >>> round(float(pairwise_bpr_loss(torch.tensor([[0., 1.]]), torch.tensor([[0., 0.]]), m)), 4)
        0.6931
    """
    pairs = _pair_mask(target.detach(), mask)
    diff = z.unsqueeze(1) - z.unsqueeze(2)  # [B, i, j]: z_j − z_i
    loss = -tau * F.logsigmoid(diff / tau)
    count = pairs.sum().clamp(min=1)
    if only_misordered:
        pairs = pairs & (diff.detach() <= 0)
    return (loss * pairs).sum() / count


def violation_rate(o: Tensor, h: Tensor, mask: Tensor, tol: float = 1e-6) -> tuple[float, Tensor]:
    """Share of within-request pairs where o_k increases but h̃_k decreases (pooled, and per task [T]).

    Example:
        >>> o = torch.tensor([[[0.1], [0.2], [0.3]]]); m = torch.ones(1, 3, dtype=torch.bool)
        >>> round(violation_rate(o, torch.tensor([[[0.1], [0.3], [0.2]]]), m)[0], 4)
        0.3333
    """
    pairs = _pair_mask(o, mask)
    bad = ((h.unsqueeze(2) - h.unsqueeze(1)) > tol) & pairs
    per_task = bad.sum((0, 1, 2)).float() / pairs.sum((0, 1, 2)).clamp(min=1).float()
    return float(bad.sum().float() / pairs.sum().clamp(min=1).float()), per_task


class MonotonicFusionCells(nn.Module):
    """T Monotonic Fusion Cells as one grouped MLP: q_k = q_max · σ(MLP_k([φ(o_k), s])) ∈ [0, q_max].

    Monotonicity in o_k is *learned* (``monotonicity_loss``), not built in.

    Args:
        num_tasks: T.  state_dim: S.  hidden: H.  q_max: the output range.

    Example:
        >>> cells = MonotonicFusionCells(num_tasks=2, state_dim=3, hidden=4)
        >>> cells(torch.rand(5, 7, 2), torch.randn(5, 3)).shape       # [B, M, T]
        torch.Size([5, 7, 2])
    """

    FEATURES = 3

    def __init__(self, num_tasks: int, state_dim: int, hidden: int = 32, q_max: float = 1.0):
        super().__init__()
        t, s, h, f = num_tasks, state_dim, hidden, self.FEATURES
        self.q_max = q_max
        self.w_o = nn.Parameter(torch.randn(t, f, h) / f ** 0.5)
        self.w_s = nn.Parameter(torch.randn(t, s, h) / s ** 0.5 * 0.5)
        self.b1 = nn.Parameter(torch.zeros(t, h))
        self.w2 = nn.Parameter(torch.randn(t, h, h) / h ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(t, h))
        self.w3 = nn.Parameter(torch.randn(t, h) / h ** 0.5)
        self.b3 = nn.Parameter(torch.zeros(t))

    @staticmethod
    def features(o: Tensor) -> Tensor:
        """φ(o) [.., F] = [logit(o)/4, o, √o]."""
        o = o.clamp(_EPS, 1 - _EPS)
        return torch.stack([torch.logit(o) / 4, o, o.sqrt()], -1)

    def forward(self, pxtr: Tensor, state: Tensor) -> Tensor:
        """q [B, M, T] from predictions ``pxtr`` [B, M, T] and user state ``state`` [B, S]."""
        x = torch.einsum("bmtf,tfh->bmth", self.features(pxtr), self.w_o)
        x = x + (torch.einsum("bs,tsh->bth", state, self.w_s) + self.b1).unsqueeze(1)
        x = F.silu(x)
        x = F.silu(torch.einsum("bmth,thk->bmtk", x, self.w2) + self.b2)
        out = torch.einsum("bmth,th->bmt", x, self.w3) + self.b3
        return self.q_max * torch.sigmoid(out)


class XMTF(nn.Module):
    """xMTF fusion (inner cells + outer map); implements the ``Fusion`` protocol once an actor is attached.

    Args:
        config: the settings.
        actor: s [B, S] → action [B, T] in [−1, 1] (a TD3 actor); None = a neutral action (a = 0), as in the
            "no outer stage" ablation.

    Example:
        >>> m = XMTF(XMTFConfig(num_tasks=2, state_dim=3, hidden=4))
        >>> m.score(torch.rand(4, 6, 2), torch.randn(4, 3)).shape
        torch.Size([4, 6])
    """

    def __init__(self, config: XMTFConfig, actor: nn.Module | None = None):
        super().__init__()
        self.cfg = config.validate()
        torch.manual_seed(config.seed)
        self.cells = MonotonicFusionCells(config.num_tasks, config.state_dim, config.hidden, config.q_max) \
            if config.use_inner else None
        self.actor = actor
        self.opt = torch.optim.Adam(self.cells.parameters(), lr=config.lr) if self.cells is not None else None

    # ------------------------------------------------------------------------------------------ scoring
    def inner(self, pxtr: Tensor, state: Tensor) -> Tensor:
        """q [B, M, T]: the inner stage (or o itself without it)."""
        return self.cells(pxtr, state) if self.cells is not None else pxtr

    def a_of(self, action: Tensor) -> Tensor:
        """Outer coefficients a [B, T] of actor outputs ``action`` [B, T]."""
        return action_to_a(action, self.cfg.q_max, self.cfg.a_max)

    def cell_outputs(self, pxtr: Tensor, state: Tensor, action: Tensor | None) -> Tensor:
        """h̃ [B, M, T]: each task's contribution to the score (outer ∘ inner)."""
        q = self.inner(pxtr, state)
        if not self.cfg.use_outer or action is None:
            return q
        return outer_map(q, self.a_of(action))

    def fused(self, pxtr: Tensor, state: Tensor, action: Tensor | None) -> Tensor:
        """z [B, M] = Σ_k h̃_k for a given action [B, T] in [−1, 1]."""
        return self.cell_outputs(pxtr, state, action).sum(-1)

    def policy_action(self, state: Tensor) -> Tensor | None:
        """The actor's deterministic action [B, T] (None without an outer stage or an actor)."""
        if not self.cfg.use_outer or self.actor is None:
            return None
        return self.actor(state)

    @torch.no_grad()
    def score(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        """[B, M] fused scores (the ``Fusion`` protocol): the actor picks the outer coefficients."""
        return self.fused(pxtr, user_state, self.policy_action(user_state))

    def forward(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        return self.score(pxtr, user_state)

    # ----------------------------------------------------------------------------------------- learning
    def inner_loss(self, pxtr: Tensor, mask: Tensor, state: Tensor, target: Tensor,
                   target_mask: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:
        """L_I = λ·Σ_k L_k^mono + (1 − λ)·L_transfer.

        Args:
            pxtr: [B, C, T].  mask: [B, C].  state: [B, S].
            target: the ranking the inner sum z̃^I follows: [B, C] (outer scores z̃, or a teacher's), or with
                ``index`` [B, M] scores of the candidates at those positions (served items' watch time).
            target_mask: [B, C] or [B, M] valid entries of ``target`` (default ``mask``).
            index: candidate positions [B, M] that ``target`` refers to.
        """
        if self.cells is None:
            raise ConfigError("xMTF without an inner stage has no inner loss")
        q = self.cells(pxtr, state)
        mono = monotonicity_loss(pxtr, q, mask)
        z_inner = q.sum(-1)
        if index is not None:
            z_inner = z_inner.gather(1, index.clamp(min=0))
        tm = target_mask if target_mask is not None else mask
        transfer = pairwise_bpr_loss(target, z_inner, tm, self.cfg.tau, self.cfg.only_misordered)
        lam = self.cfg.lam
        return {"loss": lam * mono + (1 - lam) * transfer, "mono": mono.detach(),
                "transfer": transfer.detach()}

    def start_rl(self) -> None:
        """Switch the inner stage's optimiser to ``rl_lr`` (call after the warm start, before RL)."""
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.rl_lr

    def inner_step(self, *args, **kwargs) -> dict[str, float]:
        """One Adam step on ``inner_loss(*args, **kwargs)``; returns the loss parts."""
        parts = self.inner_loss(*args, **kwargs)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.cells.parameters(), 5.0)
        self.opt.step()
        return {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def violations(self, pxtr: Tensor, mask: Tensor, state: Tensor) -> tuple[float, Tensor]:
        """Monotonicity violation rate of the learned cells h̃_k (outer ∘ inner at the actor's action)."""
        h = self.cell_outputs(pxtr, state, self.policy_action(state))
        return violation_rate(pxtr, h, mask)
