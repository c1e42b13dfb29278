"""Formula-based fusion: linear, log-sum and power-product scores, and CEM to tune their global weights.

The three formulas are the ones RL-based multi-task fusion has used before xMTF (the xMTF paper, §2):

* ``linear``: z = Σ_k w_k · o_k
* ``logsum``: z = Σ_k w_k · log(o_k + β)
* ``power``:  z = Π_k o_k^{w_k}, returned as its logarithm Σ_k w_k · log(o_k) (the same ranking, no overflow)

with o [.., M, T] the predicted probabilities and w_k ≥ 0, so every formula is monotone increasing in each
o_k.
What is ours: weights are parametrised by their logarithm θ (w = exp θ) around a reference θ₀ — for ``linear``
θ₀_k = −log(mean o_k), which puts every task on the same scale (click ≈ 0.3 and follow ≈ 0.001 otherwise
differ by 300×); for ``logsum``/``power`` θ₀ = 0 — and the cross-entropy method (CEM) that tunes one global θ
per formula evaluates all of an iteration's candidates in **one** vectorised rollout, every candidate on the
same users.

Example:
    >>> pxtr = torch.tensor([[[0.3, 0.01], [0.2, 0.05]]])          # [B=1, M=2, T=2]
    >>> fuse(pxtr, torch.tensor([1.0, 1.0]), "linear")
    tensor([[0.3100, 0.2500]])
    >>> FormulaFusion("linear", torch.zeros(2)).score(pxtr, torch.zeros(1, 3)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnelrec.config import check_positive_ints
from funnelrec.errors import ConfigError

__all__ = ["FORMULAS", "fuse", "reference_log_weights", "FormulaFusion", "FormulaRL", "CEMConfig", "cem_tune"]

FORMULAS = ("linear", "logsum", "power")
_EPS = 1e-6


def _check_kind(kind: str) -> None:
    if kind not in FORMULAS:
        raise ConfigError(f"formula kind={kind!r}; choose one of {', '.join(FORMULAS)}")


def fuse(pxtr: Tensor, weights: Tensor, kind: str = "linear", beta: float = 0.01) -> Tensor:
    """Fused scores [B, M] of predictions ``pxtr`` [B, M, T] with non-negative ``weights`` [T] or [B, T].

    Args:
        pxtr: predicted probabilities in (0, 1).
        weights: one weight vector for every request, or one per request (a personalised formula).
        kind: ``linear``, ``logsum`` or ``power``.
        beta: the offset β of ``logsum``.
    """
    _check_kind(kind)
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    if weights.shape[-1] != pxtr.shape[-1]:
        raise ConfigError(f"weights have {weights.shape[-1]} tasks, predictions {pxtr.shape[-1]}")
    w = weights.unsqueeze(1)  # [B|1, 1, T]
    if kind == "linear":
        return (w * pxtr).sum(-1)
    if kind == "logsum":
        return (w * torch.log(pxtr + beta)).sum(-1)
    return (w * torch.log(pxtr.clamp(min=_EPS))).sum(-1)


def reference_log_weights(kind: str, pxtr: Tensor, mask: Tensor | None = None) -> Tensor:
    """θ₀ [T], the centre of the weight search: −log(mean o_k) for ``linear``, 0 otherwise.

    Args:
        pxtr: [B, M, T] a sample of predictions.
        mask: [B, M] valid candidates (default all).
    """
    _check_kind(kind)
    t = pxtr.shape[-1]
    if kind != "linear":
        return torch.zeros(t)
    flat = pxtr.reshape(-1, t) if mask is None else pxtr[mask]
    return -torch.log(flat.mean(0).clamp(min=_EPS))


class FormulaFusion(nn.Module):
    """A fixed formula with global weights w = exp(θ); implements the ``Fusion`` protocol.

    Args:
        kind: ``linear``, ``logsum`` or ``power``.
        log_weights: θ [T].
        beta: the ``logsum`` offset.

    Example:
        >>> f = FormulaFusion("power", torch.zeros(3))
        >>> f.score(torch.full((2, 4, 3), 0.5), torch.zeros(2, 1)).shape
        torch.Size([2, 4])
    """

    def __init__(self, kind: str, log_weights: Tensor, beta: float = 0.01):
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.beta = beta
        self.register_buffer("log_weights", log_weights.detach().float().clone())

    def score(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        """[B, M] fused scores of ``pxtr`` [B, M, T]; ``user_state`` [B, S] is not read (global weights)."""
        return fuse(pxtr, self.log_weights.exp(), self.kind, self.beta)

    def forward(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        return self.score(pxtr, user_state)


class FormulaRL(nn.Module):
    """Formula-based RL fusion: an actor picks each request's log-weights, θ = θ_c + span · μ(s) (``Fusion``).

    Args:
        kind: the formula.
        center: θ_c [T], the centre (the CEM-tuned global weights).
        actor: s [B, S] → [B, T] in [−1, 1] (a TD3 actor).
        span: how far (in log-weight) the actor may move each weight from the centre.
        beta: the ``logsum`` offset.

    Example:
        >>> actor = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
        >>> f = FormulaRL("linear", torch.zeros(2), actor)
        >>> f.score(torch.rand(4, 5, 2), torch.randn(4, 3)).shape
        torch.Size([4, 5])
    """

    def __init__(self, kind: str, center: Tensor, actor: nn.Module, span: float = 1.0, beta: float = 0.01):
        super().__init__()
        _check_kind(kind)
        if span <= 0:
            raise ConfigError(f"FormulaRL: span={span!r} must be > 0")
        self.kind, self.span, self.beta = kind, span, beta
        self.actor = actor
        self.register_buffer("center", center.detach().float().clone())

    def weights(self, action: Tensor) -> Tensor:
        """[B, T] weights of actor outputs ``action`` [B, T]."""
        return (self.center + self.span * action).exp()

    def fused(self, pxtr: Tensor, action: Tensor) -> Tensor:
        """[B, M] scores for a given action."""
        return fuse(pxtr, self.weights(action), self.kind, self.beta)

    @torch.no_grad()
    def score(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        """[B, M] fused scores with the actor's weights for each request's user state [B, S]."""
        return self.fused(pxtr, self.actor(user_state))

    def forward(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        return self.score(pxtr, user_state)


@dataclass
class CEMConfig:
    """Cross-entropy method over θ (log-weights).

    Args:
        iterations: CEM iterations (one rollout each).
        population: candidate θ per iteration.
        sessions_per_candidate: sessions each candidate is judged on (every candidate sees the same users).
        elite_frac: share of candidates kept to refit the sampling distribution.
        init_std: initial std of θ around the centre.
        min_std: floor of the std (keeps the search alive).
        seed: seeds the sampler and the rollouts.
    """

    iterations: int = 10
    population: int = 16
    sessions_per_candidate: int = 128
    elite_frac: float = 0.25
    init_std: float = 1.0
    min_std: float = 0.05
    seed: int = 0

    def validate(self) -> "CEMConfig":
        check_positive_ints(self, ("iterations", "population", "sessions_per_candidate"), "CEM config")
        if not 0 < self.elite_frac <= 1:
            raise ConfigError(f"CEM config: elite_frac={self.elite_frac!r} must be in (0, 1]")
        if self.init_std <= 0 or self.min_std < 0:
            raise ConfigError(f"CEM config: init_std={self.init_std!r} and min_std={self.min_std!r} must be "
                              "positive / non-negative")
        return self


def cem_tune(env, kind: str, center: Tensor, config: CEMConfig | None = None,
             beta: float = 0.01) -> tuple[Tensor, list[dict[str, float]]]:
    """Tune a formula's global θ by CEM on mean session watch time.

    Args:
        env: a ``SessionEnv`` with ``autoreset=False`` and ``num_sessions = population ×
            sessions_per_candidate``.
        kind: the formula.
        center: θ₀ [T], the initial mean.
        config: CEM settings.
        beta: the ``logsum`` offset.

    Returns:
        The final mean θ [T] and per-iteration history (mean and best candidate watch seconds, std).
    """
    from funnelrec.fusion.env import evaluate  # noqa: PLC0415 (env imports nothing from here)

    cfg = (config or CEMConfig()).validate()
    _check_kind(kind)
    p, n = cfg.population, cfg.sessions_per_candidate
    if env.num_envs != p * n:
        raise ConfigError(f"CEM needs an env of population × sessions_per_candidate = {p * n} sessions, "
                          f"got {env.num_envs}")
    g = torch.Generator().manual_seed(cfg.seed)
    mean = center.float().clone()
    std = torch.full_like(mean, cfg.init_std)
    n_elite = max(1, int(math.ceil(cfg.elite_frac * p)))
    history = []
    for it in range(cfg.iterations):
        theta = mean + std * torch.randn(p, mean.numel(), generator=g)
        theta[0] = mean  # the current mean is always judged too
        weights = theta.exp().repeat_interleave(n, 0)  # [P·n, T]: candidate j owns rows j·n .. j·n + n − 1
        base = env.user_pool[torch.randint(0, env.user_pool.numel(), (n,), generator=g)]
        users = base.repeat(p)  # every candidate on the same users
        out = evaluate(env, lambda obs, info: fuse(obs["pxtr"], weights, kind, beta),
                       seed=cfg.seed * 100_003 + it, users=users)
        value = out["watch_s"].view(p, n).mean(1)
        elite = value.topk(n_elite).indices
        mean = theta[elite].mean(0)
        std = theta[elite].std(0, unbiased=False).clamp(min=cfg.min_std) if n_elite > 1 else std * 0.7
        history.append({"iteration": it, "mean_watch_s": float(value.mean()),
                        "best_watch_s": float(value.max()),
                        "std": float(std.mean())})
    return mean, history
