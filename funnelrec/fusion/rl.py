"""TD3, the actor-critic agent shared by formula-based RL fusion and xMTF, and its session training loop.

The MDP is the paper's (xMTF §3, after BatchRL-MTF / UNEX-RL): state s_t = the user state of a request, action
a_t = the fusion parameters of that request (formula coefficients, or xMTF's T outer-stage scalars), reward =
the request's feedback (here: the page's watch seconds / ``reward_scale``), discounted with γ = 0.9 until the
session ends. The paper says the RL algorithm is "orthogonal"; we use TD3 (Fujimoto et al., 2018: twin
critics, target policy smoothing, delayed actor updates) — our choice — with a TD3+BC-style pull of the actor
towards the reference action 0 (``action_reg``; ours). Actions live in [−1, 1]^A; each fusion maps them to its
own range. A session that ends (the user leaves, or the page cap: the page counter is in the state) is
terminal.

Example:
    >>> agent = TD3(TD3Config(state_dim=5, action_dim=3, hidden=16))
    >>> a = agent.act(torch.zeros(4, 5), noise_std=0.1)
    >>> a.shape, bool(a.abs().max() <= 1)
    (torch.Size([4, 3]), True)
    >>> buf = ReplayBuffer(100, 5, 3)
    >>> buf.add(torch.zeros(4, 5), a, torch.ones(4), torch.zeros(4, 5), torch.zeros(4, dtype=torch.bool))
    >>> len(buf), sorted(agent.update(buf.sample(4, torch.Generator().manual_seed(0))))[:2]
    (4, ['actor_loss', 'critic_loss'])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.config import check_positive_ints
from funnelrec.errors import ConfigError

__all__ = ["TD3Config", "TD3", "ReplayBuffer", "TrainConfig", "train_agent", "mlp"]


def mlp(sizes: list[int], out_act: nn.Module | None = None) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them (and ``out_act`` after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


@dataclass
class TD3Config:
    """TD3 settings.

    Args:
        state_dim: S.  action_dim: A.
        hidden: width of the two hidden layers of actor and critics.
        gamma: discount (the paper: 0.9).
        tau: Polyak rate of the target networks.
        actor_lr, critic_lr: Adam learning rates.
        policy_noise, noise_clip: target policy smoothing (in action units, actions in [−1, 1]).
        policy_delay: critic updates per actor update.
        action_reg: weight of the pull towards the reference action 0 in the actor loss (ours, as in TD3+BC:
            the actor maximises Q / mean|Q| − action_reg · mean(a²)). Each fusion puts its best known setting
            at a = 0 (the CEM optimum, the warm-started inner stage), so the actor leaves it only where the
            critic sees a gain; without it a noisy critic drives the actions to the bounds. 0 = plain TD3.
        seed: initialises the networks.
    """

    state_dim: int
    action_dim: int
    hidden: int = 64
    gamma: float = 0.9
    tau: float = 0.01
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2
    action_reg: float = 0.5
    seed: int = 0

    def validate(self) -> "TD3Config":
        check_positive_ints(self, ("state_dim", "action_dim", "hidden", "policy_delay"), "TD3 config")
        if not 0 <= self.gamma < 1:
            raise ConfigError(f"TD3 config: gamma={self.gamma!r} must be in [0, 1)")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"TD3 config: tau={self.tau!r} must be in (0, 1]")
        if self.action_reg < 0:
            raise ConfigError(f"TD3 config: action_reg={self.action_reg!r} must be >= 0")
        return self


class TD3(nn.Module):
    """Twin-delayed DDPG: a deterministic actor s → a ∈ [−1, 1]^A and two critics Q(s, a).

    Args:
        config: the settings.

    Example:
        >>> TD3(TD3Config(state_dim=3, action_dim=2, hidden=8)).actor(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
    """

    def __init__(self, config: TD3Config):
        super().__init__()
        self.cfg = config.validate()
        torch.manual_seed(config.seed)
        s, a, h = config.state_dim, config.action_dim, config.hidden
        self.actor = mlp([s, h, h, a], nn.Tanh())
        self.q1 = mlp([s + a, h, h, 1])
        self.q2 = mlp([s + a, h, h, 1])
        # a small last layer: the actor starts near the middle of its range
        with torch.no_grad():
            self.actor[-2].weight.mul_(0.1)
            self.actor[-2].bias.zero_()
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        critic_params = [*self.q1.parameters(), *self.q2.parameters()]
        self.critic_opt = torch.optim.Adam(critic_params, lr=config.critic_lr)
        self.updates = 0

    @torch.no_grad()
    def act(self, state: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """[B, A] actions for states [B, S], with Gaussian exploration noise of std ``noise_std``, clipped."""
        a = self.actor(state)
        if noise_std > 0:
            a = a + noise_std * torch.randn(a.shape, generator=generator)
        return a.clamp(-1.0, 1.0)

    def _q(self, net: nn.Module, s: Tensor, a: Tensor) -> Tensor:
        return net(torch.cat([s, a], -1)).squeeze(-1)

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One TD3 step on a replay batch (``state, action, reward, next_state, done``); returns losses."""
        c = self.cfg
        s, a, r = batch["state"], batch["action"], batch["reward"]
        s2, done = batch["next_state"], batch["done"]
        with torch.no_grad():
            noise = (c.policy_noise * torch.randn_like(a)).clamp(-c.noise_clip, c.noise_clip)
            a2 = (self.actor_target(s2) + noise).clamp(-1.0, 1.0)
            q_next = torch.minimum(self._q(self.q1_target, s2, a2), self._q(self.q2_target, s2, a2))
            target = r + c.gamma * (1.0 - done.float()) * q_next
        critic_loss = F.mse_loss(self._q(self.q1, s, a), target) + F.mse_loss(self._q(self.q2, s, a), target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        out = {"critic_loss": float(critic_loss.detach()), "actor_loss": float("nan")}
        if self.updates % c.policy_delay == 0:
            pi = self.actor(s)
            q = self._q(self.q1, s, pi)
            if c.action_reg > 0:
                scale = q.abs().mean().detach().clamp(min=1e-6)
                actor_loss = -q.mean() / scale + c.action_reg * pi.pow(2).mean()
            else:
                actor_loss = -q.mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            out["actor_loss"] = float(actor_loss.detach())
            with torch.no_grad():
                for net, tgt in ((self.actor, self.actor_target), (self.q1, self.q1_target),
                                 (self.q2, self.q2_target)):
                    for p, tp in zip(net.parameters(), tgt.parameters()):
                        tp.lerp_(p, c.tau)
        return out


class ReplayBuffer:
    """A ring buffer of transitions held as torch tensors.

    Args:
        capacity: transitions kept.
        state_dim: S.  action_dim: A.
    """

    def __init__(self, capacity: int, state_dim: int, action_dim: int):
        if capacity < 1:
            raise ConfigError(f"replay capacity={capacity!r} must be >= 1")
        self.capacity = capacity
        self.state = torch.zeros(capacity, state_dim)
        self.action = torch.zeros(capacity, action_dim)
        self.reward = torch.zeros(capacity)
        self.next_state = torch.zeros(capacity, state_dim)
        self.done = torch.zeros(capacity, dtype=torch.bool)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, state: Tensor, action: Tensor, reward: Tensor, next_state: Tensor, done: Tensor) -> None:
        """Append a batch of N transitions (overwriting the oldest when full)."""
        n = state.shape[0]
        idx = (self.pos + torch.arange(n)) % self.capacity
        self.state[idx], self.action[idx], self.reward[idx] = state, action, reward
        self.next_state[idx], self.done[idx] = next_state, done
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """A uniform batch of ``n`` transitions."""
        if self.size == 0:
            raise ConfigError("cannot sample from an empty replay buffer")
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {"state": self.state[idx], "action": self.action[idx], "reward": self.reward[idx],
                "next_state": self.next_state[idx], "done": self.done[idx]}


@dataclass
class TrainConfig:
    """The session loop that trains an agent.

    Args:
        steps: env steps (requests of all B parallel sessions).
        warmup_steps: steps before the first update (pure exploration around the actor's start).
        updates_per_step: TD3 updates per env step.
        batch_size: replay batch.
        replay: replay capacity.
        noise_start, noise_end: exploration std, decayed linearly over ``steps``.
        reward_scale: reward = page watch seconds / reward_scale.
        seed: env and sampling seed.
    """

    steps: int = 400
    warmup_steps: int = 20
    updates_per_step: int = 2
    batch_size: int = 256
    replay: int = 200_000
    noise_start: float = 0.4
    noise_end: float = 0.05
    reward_scale: float = 100.0
    seed: int = 0

    def validate(self) -> "TrainConfig":
        check_positive_ints(self, ("steps", "updates_per_step", "batch_size", "replay"), "train config")
        if self.warmup_steps < 0 or self.reward_scale <= 0:
            raise ConfigError(f"train config: warmup_steps={self.warmup_steps!r} must be >= 0 and "
                              f"reward_scale={self.reward_scale!r} > 0")
        return self


def train_agent(env, agent: TD3 | None, scorer: Callable[[dict[str, Tensor], Tensor], Tensor],
                config: TrainConfig,
                hook: Callable[[dict[str, Tensor], Tensor, dict], None] | None = None,
                progress: bool = False) -> list[dict[str, float]]:
    """Train ``agent`` on the sessions of ``env`` (an autoreset ``SessionEnv``).

    Args:
        env: the env; every row is always a live session.
        agent: the TD3 agent (actions in [−1, 1]^A); None runs the sessions with an empty action [B, 0] and no
            RL (a fusion that learns only in ``hook``).
        scorer: ``scorer(obs, action) -> [B, C]`` scores: how the fusion turns an action into a ranking.
        config: the loop settings.
        hook: called as ``hook(obs, action, info)`` after each env step with the observation the action was
            taken on (xMTF updates its inner stage there).
        progress: show a tqdm bar.

    Returns:
        A learning curve: per tenth of the run, the mean watch seconds and pages of the sessions that ended
        in it.
    """
    from tqdm.auto import tqdm

    cfg = config.validate()
    if not env.cfg.autoreset:
        raise ConfigError("train_agent needs an env with autoreset=True")
    g = torch.Generator().manual_seed(cfg.seed + 7)
    buf = ReplayBuffer(cfg.replay, env.state_dim, agent.cfg.action_dim) if agent is not None else None
    obs, info = env.reset(seed=cfg.seed)
    curve: list[dict[str, float]] = []
    ended_w, ended_p = [], []
    chunk = max(1, cfg.steps // 10)
    for step in tqdm(range(cfg.steps), desc="rl", disable=not progress):
        frac = step / max(1, cfg.steps - 1)
        noise = cfg.noise_start + (cfg.noise_end - cfg.noise_start) * frac
        state = obs["user_state"]
        action = agent.act(state, noise_std=noise, generator=g) if agent is not None else \
            torch.zeros(state.shape[0], 0)
        with torch.no_grad():
            scores = scorer(obs, action)
        next_obs, reward, term, trunc, info_next = env.step(scores)
        done = term | trunc
        if buf is not None:
            buf.add(state, action, reward / cfg.reward_scale, next_obs["user_state"], done)
        if hook is not None:
            hook(obs, action, info_next)
        ended = info_next["episode_mask"]
        if ended.any():
            ended_w.append(info_next["episode_watch_s"][ended])
            ended_p.append(info_next["episode_pages"][ended].float())
        if buf is not None and step >= cfg.warmup_steps:
            for _ in range(cfg.updates_per_step):
                agent.update(buf.sample(cfg.batch_size, g))
        if (step + 1) % chunk == 0 and ended_w:
            w, p = torch.cat(ended_w), torch.cat(ended_p)
            curve.append({"step": step + 1, "watch_s": float(w.mean()), "pages": float(p.mean()),
                          "sessions": int(w.numel())})
            ended_w, ended_p = [], []
        obs = next_obs
    return curve
