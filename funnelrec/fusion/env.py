"""The session environment of multi-task fusion: a gymnasium vector env over many users' sessions.

Each step is one **request** of every live session: the world draws candidates, a ranker predicts T task
probabilities for each (here: the world's oracle with calibrated noise, see below), the policy (a fusion)
scores them, the top ``page_size`` are served as one page, the world answers with feedback and watch time,
updates the user's satisfaction and the user leaves with the world's hazard. A session ends when the user
leaves (``terminated``) or at the world's documented page cap (``truncated``).

What is the paper's and what is ours. xMTF (WWW 2025) evaluates fusion in a KuaiRand session simulator where
the reward is watch time and satisfaction decides when a session ends; that protocol is the paper's. The
equations here are **the world's own** (``funnelrec.sim``): ``ResponseModel.page / marginals / sample`` for
the served page, ``World.reward`` and ``World.update_satisfaction`` for satisfaction and
``World.leave_hazard`` for leaving — this module only keeps the per-session bookkeeping (recent tags and
creators, short-term drift, counters) the way ``World.run_sessions`` does, one page at a time. Ours: the
candidate sampler (half popular, half from the user's interests, as ``OracleGreedyPolicy``), the prediction
model, the observed user state and the autoreset rule.

**Predictions** (``predictions=``):

* ``"oracle_noisy"`` (default): the world's true single-item marginals of the 6 tasks (top position, the
  user's current short-term intent and session window) with Gaussian noise of std ``noise_std`` on their
  logits. The noise of a (user, item, task) is a fixed function of the three ids and ``noise_seed`` (a hash,
  not a fresh draw), so a ranker's error on an item persists across requests as a trained model's does. Its
  size (default σ = 1.2) is calibrated on the best trained ranker of ``docs/results/ranking-baselines.md``
  (DCNv2): its test AUC is 0.074 (click) and 0.068 (long view) below the oracle's; σ = 1.2 gives the same
  drops on the env's candidates (measured on ``sim:bench-v1``: 0.074 and 0.068; the fusion benchmark reports
  the AUCs of every run).
* ``"oracle"``: the true marginals, no noise.
* ``"ranker"``: a trained ranker's predictions, through ``predictor=`` (an object with ``day``,
  ``predict(users, candidates, tab) -> ([B, C, 6] probabilities, [B, C] watch seconds)``, ``observe(page)`` and
  ``reset()``; :class:`funnelrec.fusion.ranker_predictions.CascadeRankerPredictions` wraps a trained cascade).
  The ranker reads the user's logged history and every page served in the env so far (each page's feedback is
  reported to ``observe``); ``reset`` forgets the env's pages. Set ``day`` to the predictor's day (the day after
  the ranker's training log).

With ``include_watch_time`` the last input is the predicted watch time squashed to (0, 1), ``s / (s + scale)``
(DESIGN §5: a ranker predicts T probabilities plus watch time). Task order: :data:`TASKS`.

**Observation** (torch tensors, not numpy; the gymnasium spaces describe their shapes and ranges):
``pxtr`` [B, C, T] predictions, ``mask`` [B, C] valid candidates (a duplicate in the candidate set is masked),
``user_state`` [B, S] what a real system knows of the user: activity degree (one-hot), social scalar, page
counter, moving averages of the session's observed feedback and watch time, and the mean and max prediction
per task over the candidate set (the xMTF repo's state idea, with feedback instead of a user-tower embedding).
The true satisfaction is never observed.

**Action**: either float scores [B, C] (the top ``page_size`` valid candidates by score are served, in score
order) or int64 candidate positions [B, page_size]. Rows of ended sessions are ignored.

**Infos**: ``watch_s``, ``pages``, ``alive``, ``served`` (candidate positions shown, −1 for rows not served)
and ``served_watch_s`` (their watch seconds), ``oracle`` (true ``pxtr``, expected ``play_s``,
``hate``, ``watch_ratio`` of the candidates — for the oracle references only, never for a learned fusion), and
on the steps where sessions end, ``episode_watch_s`` / ``episode_pages`` / ``episode_mask``.

**Autoreset.** ``autoreset=True`` (training) uses gymnasium's SAME_STEP mode: a session that ends is replaced
in the same step by a new session of a user drawn from ``user_pool``; its row of the returned observation is
the new session's first. ``autoreset=False`` (evaluation, DISABLED mode): ended sessions stay ended (``alive``
False, reward 0) until ``reset``; ``env.done`` says when every session has ended.

**Common random numbers.** Every row draws its random numbers at every step, live or not, so a session's draws
never depend on how many other sessions are still running: two policies run with the same seed see the same
users, candidates and uniform draws (paired comparisons; with leaving independent of satisfaction, every
policy gets the very same session lengths).

Example:
    >>> env = SessionEnv(SessionEnvConfig(num_sessions=4, candidates=8))
    >>> obs, info = env.reset(seed=0)
    >>> obs["pxtr"].shape, obs["user_state"].shape[0]
    (torch.Size([4, 8, 7]), 4)
    >>> obs, reward, terminated, truncated, info = env.step(obs["pxtr"][..., 0])  # greedy on predicted click
    >>> reward.shape, bool((reward >= 0).all())
    (torch.Size([4]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from torch import Tensor

from funnelrec.data.schema import ACTIVE_DEGREES, DAY_MS, KUAIRAND_START_MS, long_view_rule
from funnelrec.errors import ConfigError, DataError
from funnelrec.sim.diagnostics import OracleGreedyPolicy
from funnelrec.sim.oracle import TASKS as ORACLE_TASKS
from funnelrec.sim.responses import PageState
from funnelrec.sim.world import World

__all__ = ["SessionEnv", "SessionEnvConfig", "TASKS", "FEEDBACK", "OracleGreedy", "evaluate", "hash_normal",
           "split_users", "state_dim"]

#: Inputs of a fusion, in order: the 6 KuaiRand tasks and (``include_watch_time``) the squashed watch time.
TASKS = (*ORACLE_TASKS, "watch_time")
#: Observed feedback kinds tracked in the user state (moving averages of per-page rates).
FEEDBACK = ("click", "long_view", "like", "follow", "comment", "forward", "hate")
PREDICTIONS = ("oracle_noisy", "oracle", "ranker")
_MASK62 = (1 << 62) - 1
#: Hour of the day the env's sessions start at (event times of the pages reported to a predictor).
SESSION_START_HOUR = 19


@dataclass
class SessionEnvConfig:
    """Settings of a :class:`SessionEnv`.

    Args:
        world: world profile (``small``, ``bench-v1``, ``long``; a ``sim:`` prefix is accepted).
        overrides: world ``key=value`` overrides, e.g. ``["sessions.leave_slope=0"]``.
        num_sessions: B, the sessions run in parallel (``num_envs``).
        candidates: C, candidates per request (the page of ``sessions.page_size`` items is chosen from them).
        predictions: ``"oracle_noisy"``, ``"oracle"`` or ``"ranker"`` (see the module docstring).
        noise_std: std of the logit noise of ``oracle_noisy`` (also on log watch time).
        noise_seed: seed of the prediction noise (the "ranker"); fixed across env seeds.
        include_watch_time: add predicted watch time as the last input (T = 7 instead of 6).
        watch_scale_s: the squash ``s / (s + watch_scale_s)`` of predicted watch seconds.
        autoreset: replace ended sessions by new ones (training) instead of leaving them ended (evaluation).
        feedback_decay: weight of the past in the moving averages of observed feedback in the user state.
        day: the world day whose long-term interests the users have.
    """

    world: str = "bench-v1"
    overrides: list[str] = field(default_factory=list)
    num_sessions: int = 256
    candidates: int = 48
    predictions: str = "oracle_noisy"
    noise_std: float = 1.2
    noise_seed: int = 12345
    include_watch_time: bool = True
    watch_scale_s: float = 30.0
    autoreset: bool = False
    feedback_decay: float = 0.5
    day: int = 0

    def validate(self, page_size: int | None = None) -> "SessionEnvConfig":
        """Raise ``ConfigError`` naming the bad field."""
        checks = [
            ("num_sessions", self.num_sessions,
             isinstance(self.num_sessions, int) and self.num_sessions >= 1),
            ("candidates", self.candidates, isinstance(self.candidates, int) and self.candidates >= 2),
            ("noise_std", self.noise_std, self.noise_std >= 0),
            ("watch_scale_s", self.watch_scale_s, self.watch_scale_s > 0),
            ("feedback_decay", self.feedback_decay, 0 <= self.feedback_decay < 1),
            ("day", self.day, isinstance(self.day, int) and self.day >= 0),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"session env config: {name}={value!r} is out of range")
        if self.predictions not in PREDICTIONS:
            raise ConfigError(f"session env config: predictions={self.predictions!r}; choose one of "
                              f"{', '.join(PREDICTIONS)}")
        if page_size is not None and self.candidates < page_size:
            raise ConfigError(f"session env config: candidates={self.candidates} must be >= the world's "
                              f"sessions.page_size={page_size}")
        return self

    @property
    def num_tasks(self) -> int:
        return len(TASKS) if self.include_watch_time else len(ORACLE_TASKS)


def state_dim(num_tasks: int) -> int:
    """S, the width of the observed user state for T = ``num_tasks`` inputs."""
    return len(ACTIVE_DEGREES) + 3 + len(FEEDBACK) + 2 * num_tasks


def hash_normal(*ids: Tensor, seed: int = 0) -> Tensor:
    """Standard normal numbers that are a fixed function of integer ids (a splitmix-style hash + Box-Muller).

    Args:
        *ids: int64 tensors of one broadcastable shape.
        seed: the hash seed.

    Example:
        >>> a = hash_normal(torch.tensor([1, 2]), torch.tensor([5, 5]), seed=3)
        >>> torch.equal(a, hash_normal(torch.tensor([1, 2]), torch.tensor([5, 5]), seed=3))
        True
    """
    x = torch.full((), (seed * 0x9E3779B97F4A7C15) & _MASK62, dtype=torch.int64)
    for k, t in enumerate(ids):
        x = x ^ ((t.long() + (((k + 1) * 0x632BE59BD9B4E019) & _MASK62)) & _MASK62)
        x = _mix(x)
    u1 = ((x & 0xFFFFFF).double() + 0.5) / 2 ** 24
    u2 = (((x >> 24) & 0xFFFFFF).double() + 0.5) / 2 ** 24
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()


def _mix(x: Tensor) -> Tensor:
    x = (x ^ (x >> 31)) & _MASK62
    x = (x * 0x3C79AC492BA7B653) & _MASK62
    x = (x ^ (x >> 29)) & _MASK62
    x = (x * 0x1C69B3F74AC4AE35) & _MASK62
    return (x ^ (x >> 32)) & _MASK62


def split_users(num_users: int, eval_users: int, seed: int,
                reserved: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Disjoint (train pool, eval users) of population rows by a seeded permutation (``ConfigError`` if too
    many).

    Args:
        num_users: population size.
        eval_users: how many evaluation users to draw.
        seed: seed of the permutation.
        reserved: population rows never drawn as evaluation users (e.g. the validation users that settings are
            selected on); they stay in the training pool.
    """
    blocked = torch.zeros(num_users, dtype=torch.bool)
    if reserved is not None:
        blocked[reserved] = True
    available = num_users - int(blocked.sum())
    if eval_users < 1 or eval_users >= available:
        raise ConfigError(f"eval_users={eval_users} must be in [1, {available}) "
                          f"(the world has {num_users} users, {num_users - available} reserved)")
    perm = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed))
    is_eval = torch.zeros(num_users, dtype=torch.bool)
    is_eval[perm[~blocked[perm]][:eval_users]] = True
    rows = torch.arange(num_users)
    return rows[~is_eval], rows[is_eval]


class SessionEnv(VectorEnv):
    """Vectorised sessions of the simulated world, one request per step (see the module docstring).

    Args:
        config: the env settings.
        world: a built ``World`` to share (default: built from ``config.world`` and ``config.overrides``).
        user_pool: [U'] population rows new sessions draw their users from (default: every user).
        predictor: the trained-ranker predictions of ``predictions="ranker"`` (see the module docstring).
    """

    def __init__(self, config: SessionEnvConfig | None = None, world: World | None = None,
                 user_pool: Tensor | None = None, predictor=None):
        config = config or SessionEnvConfig()
        self.world = world if world is not None else World.from_profile(config.world, list(config.overrides))
        self.cfg = config.validate(self.world.cfg.sessions.page_size)
        if (config.predictions == "ranker") != (predictor is not None):
            raise ConfigError("session env: predictions='ranker' needs predictor= (e.g. CascadeRankerPredictions) "
                              f"and the other modes take none; got predictions={config.predictions!r}")
        if predictor is not None and int(predictor.day) != config.day:
            raise ConfigError(f"session env: day={config.day} but the predictor serves day {predictor.day}; set "
                              f"SessionEnvConfig.day={predictor.day}")
        self.predictor = predictor
        w = self.world
        self.page_size = w.cfg.sessions.page_size
        self.max_pages = w.cfg.sessions.max_pages
        self.num_envs = config.num_sessions
        self.num_tasks = config.num_tasks
        self.state_dim = state_dim(self.num_tasks)
        n_users = w.population.num_users
        self.user_pool = torch.arange(n_users) if user_pool is None else user_pool.long()
        pool = self.user_pool
        if pool.numel() == 0 or int(pool.min()) < 0 or int(pool.max()) >= n_users:
            raise DataError(f"user_pool must hold population rows in [0, {n_users})", column="user_pool")
        b, c, t, s = self.num_envs, config.candidates, self.num_tasks, self.state_dim
        self.single_observation_space = gym.spaces.Dict({
            "pxtr": gym.spaces.Box(0.0, 1.0, (c, t), np.float32),
            "mask": gym.spaces.MultiBinary(c),
            "user_state": gym.spaces.Box(-np.inf, np.inf, (s,), np.float32),
        })
        self.observation_space = gym.spaces.Dict({
            "pxtr": gym.spaces.Box(0.0, 1.0, (b, c, t), np.float32),
            "mask": gym.spaces.MultiBinary((b, c)),
            "user_state": gym.spaces.Box(-np.inf, np.inf, (b, s), np.float32),
        })
        self.single_action_space = gym.spaces.Box(-np.inf, np.inf, (c,), np.float32)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (b, c), np.float32)
        mode = AutoresetMode.SAME_STEP if config.autoreset else AutoresetMode.DISABLED
        self.metadata = {"autoreset_mode": mode}
        self._g = torch.Generator().manual_seed(0)
        self._long = w.long_term_on_day(config.day)
        self._degree_onehot = torch.eye(len(ACTIVE_DEGREES))[w.population.degree]
        self._social = w.population.follow_bias / 0.4
        self._reset_called = False

    # ------------------------------------------------------------------------------------------------ API
    def reset(self, *, seed: int | None = None,
              options: dict | None = None) -> tuple[dict[str, Tensor], dict]:
        """Start B new sessions.

        Args:
            seed: seeds the env's RNG (users, candidates, responses, leaving); same seed + same actions = same
                run.
            options: ``{"users": [B] int64 population rows}`` to choose the users (default: drawn from the
                pool).
        """
        super().reset(seed=seed)
        if seed is not None:
            self._g = torch.Generator().manual_seed(int(seed))
        b, w = self.num_envs, self.world
        users = (options or {}).get("users")
        if users is None:
            users = self._draw_users(b)
        else:
            users = torch.as_tensor(users, dtype=torch.int64)
            if users.shape != (b,):
                raise DataError(f"options['users'] must have shape [{b}], got {list(users.shape)}",
                                column="users")
            if int(users.min()) < 0 or int(users.max()) >= w.population.num_users:
                raise DataError(f"options['users'] out of range [0, {w.population.num_users})",
                                column="users")
        m_win = max(1, w.cfg.sessions.repeat_window)
        c, t = self.cfg.candidates, self.num_tasks
        self.user = users.clone()
        self.sat = torch.zeros(b)
        self.short = torch.zeros(b, self._long.shape[1])
        self.tab = torch.zeros(b, dtype=torch.int64)
        self.recent_tags = torch.full((b, m_win), -1, dtype=torch.int64)
        self.recent_creators = torch.full((b, m_win), -1, dtype=torch.int64)
        self.pages = torch.zeros(b, dtype=torch.int64)
        self.clock = torch.zeros(b, dtype=torch.int64)
        self.total_watch = torch.zeros(b)
        self.feedback = torch.zeros(b, len(FEEDBACK) + 1)
        self.alive = torch.ones(b, dtype=torch.bool)
        self.cand = torch.zeros(b, c, dtype=torch.int64)
        self.mask = torch.zeros(b, c, dtype=torch.bool)
        self.pxtr = torch.zeros(b, c, t)
        self.oracle = {"pxtr": torch.zeros(b, c, len(ORACLE_TASKS)), "play_s": torch.zeros(b, c),
                       "hate": torch.zeros(b, c), "watch_ratio": torch.zeros(b, c)}
        if self.predictor is not None:
            self.predictor.reset()
        self._start_sessions(torch.arange(b))
        self._request(torch.ones(b, dtype=torch.bool))
        self._reset_called = True
        return self._obs(), self._info(reward=torch.zeros(b))

    def step(self, actions: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        """Serve a page to every live session; see the module docstring for the action and the returns."""
        if not self._reset_called:
            raise ConfigError("call reset() before step()")
        b = self.num_envs
        live = self.alive.clone()
        reward = torch.zeros(b)
        terminated = torch.zeros(b, dtype=torch.bool)
        truncated = torch.zeros(b, dtype=torch.bool)
        served = torch.full((b, self.page_size), -1, dtype=torch.int64)
        served_watch = torch.zeros(b, self.page_size)
        if not live.any():
            info = self._info(reward)
            info.update({"served": served, "served_watch_s": served_watch, "episode_mask": terminated.clone(),
                         "episode_watch_s": torch.zeros(b),
                         "episode_pages": torch.zeros(b, dtype=torch.int64)})
            return self._obs(), reward, terminated, truncated, info
        pos = self._served_positions(torch.as_tensor(actions), live)
        items = self.cand.gather(1, pos)
        watch, leave, item_watch = self._serve(items, live)
        served[live], served_watch[live] = pos[live], item_watch[live]
        reward[live] = watch[live]
        self.total_watch[live] += watch[live]
        self.pages[live] += 1
        terminated = live & leave
        truncated = live & ~leave & (self.pages >= self.max_pages)
        ended = terminated | truncated
        info_end = {"served": served, "served_watch_s": served_watch, "episode_mask": ended.clone(),
                    "episode_watch_s": torch.where(ended, self.total_watch, 0.0),
                    "episode_pages": torch.where(ended, self.pages, 0)}
        if self.cfg.autoreset:
            restart = torch.nonzero(ended).squeeze(1)
            if restart.numel():
                self.user[restart] = self._draw_users(restart.numel())
                self._start_sessions(restart)
        else:
            self.alive &= ~ended
        self._request(self.alive.clone())
        info = self._info(reward)
        info.update(info_end)
        return self._obs(), reward, terminated, truncated, info

    @property
    def done(self) -> bool:
        """True when every session has ended (``autoreset=False``)."""
        return not bool(self.alive.any())

    # ------------------------------------------------------------------------------------------- internals
    def _draw_users(self, n: int) -> Tensor:
        return self.user_pool[torch.randint(0, self.user_pool.numel(), (n,), generator=self._g)]

    def _start_sessions(self, rows: Tensor) -> None:
        """Fresh sessions in ``rows`` (the world's start-of-session state: satisfaction, intent, tab)."""
        w, g = self.world, self._g
        u = self.user[rows]
        self.sat[rows] = w.population.initial_satisfaction[u]
        self.short[rows] = w.draw_short_term(u, g)
        self.tab[rows] = w.draw_tabs(rows.numel(), g)
        self.recent_tags[rows] = -1
        self.recent_creators[rows] = -1
        self.pages[rows] = 0
        # event times of the pages reported to a predictor: from 19:00 of the day (no random draw, so the
        # env's random numbers are the same in every prediction mode)
        self.clock[rows] = KUAIRAND_START_MS + self.cfg.day * DAY_MS + SESSION_START_HOUR * 3_600_000
        self.total_watch[rows] = 0.0
        self.feedback[rows] = 0.0
        self.alive[rows] = True

    def _request(self, keep: Tensor) -> None:
        """Draw candidates and predict their tasks (single-item marginals in the current state) for the rows
        in ``keep`` ([B] bool). Every row draws its random numbers, kept or not, so that a session's numbers
        never depend on how many other sessions are still running (common random numbers across policies)."""
        w, g, cfg = self.world, self._g, self.cfg
        u = self.user
        n, c = self.num_envs, cfg.candidates
        lp = w.logging_policy
        half = c // 2
        cand = torch.cat([lp.popular(n, half, g), lp.from_interests(u, c - half, g)], 1)
        sorted_cand, order = cand.sort(dim=1)
        dup_sorted = torch.zeros_like(sorted_cand, dtype=torch.bool)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        rows = torch.nonzero(keep).squeeze(1)
        if rows.numel() == 0:
            return
        u, cand, dup, n = u[rows], cand[rows], dup[rows], rows.numel()
        flat_u = u.repeat_interleave(c)
        state = PageState(user=flat_u, items=cand.reshape(-1, 1), tab=self.tab[rows].repeat_interleave(c),
                          long_term=self._long[flat_u], short_term=self.short[rows].repeat_interleave(c, 0),
                          recent_tags=self.recent_tags[rows].repeat_interleave(c, 0),
                          recent_creators=self.recent_creators[rows].repeat_interleave(c, 0))
        probs = w.responses.page(state)
        marg = w.responses.marginals(probs)
        true = marg["tasks"][:, 0].view(n, c, -1)
        play_s = (marg["play_ms"][:, 0] / 1000.0).view(n, c)
        sigma = w.cfg.responses.watch_sigma
        ratio = torch.exp(probs.watch_mu[:, 0] + sigma ** 2 / 2).clamp(max=1.0).view(n, c)
        self.oracle["pxtr"][rows] = true
        self.oracle["play_s"][rows] = play_s
        self.oracle["hate"][rows] = marg["hate"][:, 0].view(n, c)
        self.oracle["watch_ratio"][rows] = ratio
        pred = true.clamp(1e-6, 1 - 1e-6)
        pred_play = play_s.clamp(min=1e-3)
        if cfg.predictions == "ranker":
            pred, pred_play = self.predictor.predict(u, cand, self.tab[rows])
            pred, pred_play = pred.clamp(1e-6, 1 - 1e-6), pred_play.clamp(min=1e-3)
        elif cfg.predictions == "oracle_noisy" and cfg.noise_std > 0:
            t = true.shape[-1]
            uu = u.view(n, 1, 1).expand(n, c, t + 1)
            ii = cand.view(n, c, 1).expand(n, c, t + 1)
            kk = torch.arange(t + 1).view(1, 1, -1).expand(n, c, t + 1)
            eps = cfg.noise_std * hash_normal(uu, ii, kk, seed=cfg.noise_seed)
            pred = torch.sigmoid(torch.logit(pred) + eps[..., :t])
            pred_play = pred_play * torch.exp(eps[..., t])
        if cfg.include_watch_time:
            pred = torch.cat([pred, (pred_play / (pred_play + cfg.watch_scale_s)).unsqueeze(-1)], -1)
        self.cand[rows] = cand
        self.mask[rows] = ~dup
        self.pxtr[rows] = pred.float()

    def _served_positions(self, actions: Tensor, live: Tensor) -> Tensor:
        """[B, page_size] candidate positions served (rows not ``live`` get a valid placeholder)."""
        b, c, m = self.num_envs, self.cfg.candidates, self.page_size
        if actions.dtype in (torch.int64, torch.int32):
            if actions.shape != (b, m):
                raise DataError(f"integer actions must be candidate positions [{b}, {m}], got "
                                f"{list(actions.shape)}", column="actions")
            pos = actions.long()
            if int(pos[live].min()) < 0 or int(pos[live].max()) >= c:
                raise DataError(f"candidate positions must be in [0, {c})", column="actions")
            return torch.where(live.unsqueeze(1), pos, torch.arange(m).expand(b, m))
        if actions.shape != (b, c):
            raise DataError(f"score actions must have shape [{b}, {c}] (or positions [{b}, {m}]), got "
                            f"{list(actions.shape)}", column="actions")
        scores = actions.float()
        if torch.isnan(scores[live]).any():
            raise DataError("score actions contain NaN", column="actions")
        scores = torch.where(live.unsqueeze(1), scores, 0.0).masked_fill(~self.mask, float("-inf"))
        return scores.topk(m, dim=1).indices

    def _serve(self, items: Tensor, live: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Show ``items`` [B, M]: the world's responses, satisfaction update and leave draw. Every row draws
        its random numbers; only ``live`` rows ([B] bool) change state. Returns page watch seconds [B],
        leave [B] and per-item watch seconds [B, M]."""
        w, g = self.world, self._g
        sc = w.cfg.sessions
        u = self.user
        state = PageState(user=u, items=items, tab=self.tab, long_term=self._long[u], short_term=self.short,
                          recent_tags=self.recent_tags, recent_creators=self.recent_creators)
        probs = w.responses.page(state)
        draw = w.responses.sample(probs, g)
        r = w.reward(draw, probs)
        keep = live.unsqueeze(1)
        self.sat = torch.where(live, w.update_satisfaction(self.sat, r, draw["exam"]), self.sat)
        if self.predictor is not None:
            self.predictor.observe({"user": u[live], "items": items[live], "time": self.clock[live],
                                    "duration": probs.duration_ms[live],
                                    **{k: draw[k][live] for k in ("play_ms", "click", "like", "follow", "comment",
                                                                  "forward", "hate")}})
        self.clock = torch.where(live, self.clock + draw["play_ms"].sum(1).long() + 1500 * items.shape[1],
                                 self.clock)
        # the session window, as World.run_sessions keeps it
        win = sc.repeat_window
        if win:
            tags = w.catalog.primary_tag[items]
            cres = w.catalog.author_index[items]
            self.recent_tags = torch.where(keep, torch.cat([self.recent_tags, tags], 1)[:, -win:],
                                           self.recent_tags)
            self.recent_creators = torch.where(keep, torch.cat([self.recent_creators, cres], 1)[:, -win:],
                                               self.recent_creators)
        if w.cfg.interests.short_term_enabled:
            self.short = torch.where(keep, w.drift_short_term(self.short, u, g), self.short)
        leave = torch.rand(u.numel(), generator=g) < w.leave_hazard(self.sat)
        watch = draw["play_ms"].sum(1) / 1000.0
        long_view = draw["click"] & long_view_rule(draw["play_ms"], probs.duration_ms)
        page_rates = torch.stack([draw["click"], long_view, draw["like"], draw["follow"], draw["comment"],
                                  draw["forward"], draw["hate"]], -1).float().mean(1)
        new = torch.cat([page_rates, (watch / 60.0).unsqueeze(1)], 1)
        d = self.cfg.feedback_decay
        self.feedback = torch.where(keep, d * self.feedback + (1 - d) * new, self.feedback)
        return watch.float(), leave, (draw["play_ms"] / 1000.0).float()

    def _obs(self) -> dict[str, Tensor]:
        mask_f = self.mask.float().unsqueeze(-1)
        mean = (self.pxtr * mask_f).sum(1) / mask_f.sum(1).clamp(min=1)
        mx = self.pxtr.masked_fill(~self.mask.unsqueeze(-1), 0.0).amax(1)
        state = torch.cat([
            self._degree_onehot[self.user], self._social[self.user].unsqueeze(1),
            (self.pages.float() / self.max_pages).unsqueeze(1),
            self.feedback[:, : len(FEEDBACK)] * 4.0, self.feedback[:, len(FEEDBACK):],
            mean * 4.0, mx,
        ], 1)
        return {"pxtr": self.pxtr.clone(), "mask": self.mask.clone(), "user_state": state.float()}

    def _info(self, reward: Tensor) -> dict:
        return {"watch_s": reward, "pages": self.pages.clone(), "alive": self.alive.clone(),
                "oracle": {k: v.clone() for k, v in self.oracle.items()}, "user": self.user.clone()}


# --------------------------------------------------------------------------------------- oracle references


class OracleGreedy:
    """The oracle-greedy references: serve the top page by the world's true single-item value.

    Args:
        env: the env (its world gives the session model's weights and the items' tags and creators).
        objective: ``"watch"`` (expected watch seconds) or ``"satisfaction"`` (expected watch minutes + the
            expected per-impression reward of the session model, with the page filled greedily under the
            repetition cost) — the same two values as ``funnelrec.sim.diagnostics.OracleGreedyPolicy``, on the
            env's candidate set.
        satisfaction_weight: weight of the expected reward in the satisfaction-aware value.

    Example:
        >>> env = SessionEnv(SessionEnvConfig(num_sessions=3, candidates=10))
        >>> obs, info = env.reset(seed=1)
        >>> OracleGreedy(env, "satisfaction")(obs, info).shape
        torch.Size([3, 6])
    """

    def __init__(self, env: SessionEnv, objective: str = "watch", satisfaction_weight: float = 1.0):
        if objective not in ("watch", "satisfaction"):
            raise ConfigError(f"OracleGreedy: objective must be 'watch' or 'satisfaction', got {objective!r}")
        self.env = env
        self.objective = objective
        self.weight = satisfaction_weight
        self._picker = OracleGreedyPolicy(env.world, "satisfaction", satisfaction_weight=satisfaction_weight)

    def value(self, info: dict) -> Tensor:
        """[B, C] the true single-item value of every candidate: expected watch seconds (``"watch"``), or
        expected watch minutes + ``satisfaction_weight`` × the expected per-impression reward
        (``"satisfaction"``). Padded candidates get a value too; mask them."""
        o = info["oracle"]
        if self.objective == "watch":
            return o["play_s"]
        sc = self.env.world.cfg.sessions
        t = o["pxtr"]
        reward = (sc.reward_watch * o["watch_ratio"] * t[..., 0] + sc.reward_like * t[..., 2]
                  + sc.reward_follow * t[..., 3] + sc.reward_comment * t[..., 4]
                  + sc.reward_forward * t[..., 5]
                  - sc.reward_hate * o["hate"])
        return o["play_s"] / 60.0 + self.weight * reward

    def __call__(self, obs: dict[str, Tensor], info: dict) -> Tensor:
        """Scores [B, C] (watch) or candidate positions [B, page_size] (satisfaction)."""
        if self.objective == "watch":
            return self.value(info)
        value = self.value(info).masked_fill(~obs["mask"], float("-inf"))
        cand = self.env.cand
        picked = self._picker.diverse_pick(cand, value.clone())  # [B, M] items, distinct positions
        # back to positions: the first valid candidate holding each picked item
        hit = (cand.unsqueeze(1) == picked.unsqueeze(2)) & obs["mask"].unsqueeze(1)
        return hit.float().argmax(-1)


def evaluate(env: SessionEnv, policy, seed: int, users: Tensor | None = None) -> dict[str, Tensor]:
    """Run one session for each of B users to its end under ``policy(obs, info) -> action``.

    Args:
        env: an env with ``autoreset=False``.
        policy: called once per step on the whole batch (rows of ended sessions are ignored by the env).
        seed: the env seed (the same seed gives every policy the same users and random numbers to start with).
        users: [B] population rows (default: drawn from the env's pool).

    Returns:
        ``watch_s`` [B] total watch seconds of each session and ``pages`` [B] its length in requests.
    """
    if env.cfg.autoreset:
        raise ConfigError("evaluate() needs an env with autoreset=False")
    obs, info = env.reset(seed=seed, options=None if users is None else {"users": users})
    with torch.no_grad():
        while not env.done:
            obs, _, _, _, info = env.step(policy(obs, info))
    return {"watch_s": env.total_watch.clone(), "pages": env.pages.clone()}
