"""Re-ranking data from the world: pools, requests, simulated list outcomes and the oracle's list value.

A **request** of the re-ranking stage is one user at one moment with a pool of M (~60) candidates, each with T
predicted task probabilities (the ranker's output) and one fused score (the fusion's output). Re-ranking picks
an ordered list of L (= the world's page size, 6) items from the pool.

What is the paper's and what is ours. FlashEvaluator (Feng et al., 2026) is evaluated offline on RecFlow and
online at Kuaishou with a 60-item pool; the pool size, list length and the "user's last 1,000 interactions"
are the paper's. Everything on this page is ours: the pools and predictions come from the fusion work's
session environment (:class:`funnelrec.fusion.env.SessionEnv`, ``predictions="oracle_noisy"``: the world's
true single-item marginals with persistent logit noise sized like a trained ranker's error), the histories are
the user's logged events (:class:`funnelrec.data.timeline.Timelines` over the world's KuaiRand-schema log, all
events strictly before the request, the last ``history_len`` ≤ 1,000), and requests happen at the start of the
day after the log (``request_day = world.cfg.days``) — at a session start, so the session window is empty.

**List value** (:data:`VALUE_WEIGHTS`): the value of a shown list is

    Σ_k  watch seconds_k + 5·long_view_k + 20·like_k + 40·follow_k + 20·comment_k + 20·forward_k

over its L items. Two readings of it, kept strictly apart:

* :meth:`RerankData.outcomes` — **training targets**: the world's *sampled* response to the shown list
  (``ResponseModel.page`` → ``ResponseModel.sample``: cascade scan, clicks, watch time, likes …, all list
  effects in force), one draw per list unless asked otherwise. This is what a log of served lists would hold.
* :meth:`RerankData.oracle_values` — **evaluation only**: the oracle's expected value of the list
  (``Oracle.expected_list_value`` with the same weights), never a label.

The mean of many sampled outcomes equals the oracle's value (``tests/rerank/test_data.py``).

**Fused score** (:func:`fused_score`, what greedy-by-score ranks by): the list value formula applied to one
item's predictions — predicted watch seconds (un-squashing the ranker's watch-time output) + 5·p(long_view) +
20·p(like) + 40·p(follow) + 20·p(comment) + 20·p(forward). With list effects switched off the value of a list
is the sum of its items' values, so greedy-by-score is then the right list for the predictions it has.

**Observable item features** (:class:`ItemFeatures`): primary tag, creator (hashed into buckets) and duration
bucket — functions of the KuaiRand video table columns ``tag``, ``author_id`` and ``video_duration``; no
latent, quality or oracle column reaches a model.

Example:
    >>> from funnelrec.sim import World
    >>> pxtr = torch.tensor([[[0.3, 0.1, 0.01, 0.0, 0.0, 0.0, 0.25]]])     # [B, M, T]; watch 10 s squashed
    >>> round(float(fused_score(pxtr)[0, 0]), 2)                          # 10 + 5·0.1 + 20·0.01
    10.7
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, long_view_rule
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError
from funnelrec.fusion.env import TASKS, SessionEnv, SessionEnvConfig
from funnelrec.sim.responses import PageState

__all__ = ["VALUE_WEIGHTS", "RerankPool", "RerankRequests", "RerankDataConfig", "RerankData", "ItemFeatures",
           "check_lists", "fused_score", "split_request_users", "gather_lists"]

#: Weights of the list value (watch seconds enter with weight 1): task name → seconds-equivalent.
VALUE_WEIGHTS: dict[str, float] = {"long_view": 5.0, "is_like": 20.0, "is_follow": 40.0, "is_comment": 20.0,
                                   "is_forward": 20.0}
#: Sampled-response key of each weighted task (``ResponseModel.sample``).
_DRAW_KEYS = {"is_like": "like", "is_follow": "follow", "is_comment": "comment", "is_forward": "forward"}
_CHUNK_ROWS = 32_768


def fused_score(pxtr: Tensor, watch_scale_s: float = 30.0) -> Tensor:
    """[B, M] the fixed fusion formula: the list-value weights applied to one item's predictions.

    Args:
        pxtr: [B, M, T] predictions in :data:`funnelrec.fusion.env.TASKS` order; T = 7 (the last input is the
            watch time squashed to ``s / (s + watch_scale_s)``) or T = 6 (no watch-time term).
        watch_scale_s: the squash scale of the watch-time input.

    Returns:
        [B, M] predicted item value in seconds-equivalents (higher is better).
    """
    if pxtr.dim() != 3 or pxtr.shape[-1] not in (len(TASKS) - 1, len(TASKS)):
        raise DataError(f"expected pxtr [B, M, {len(TASKS)}] (or 6 tasks), got {list(pxtr.shape)}",
                        column="pxtr")
    value = torch.zeros(pxtr.shape[:2], dtype=pxtr.dtype, device=pxtr.device)
    if pxtr.shape[-1] == len(TASKS):
        x = pxtr[..., -1].clamp(0.0, 1.0 - 1e-6)
        value = value + watch_scale_s * x / (1.0 - x)
    for name, w in VALUE_WEIGHTS.items():
        value = value + w * pxtr[..., TASKS.index(name)]
    return value


def gather_lists(values: Tensor, lists: Tensor) -> Tensor:
    """Gather per-candidate values along lists of pool positions.

    Args:
        values: [B, M] or [B, M, F] per-candidate values.
        lists: [B, K, L] int64 pool positions.

    Returns:
        [B, K, L] or [B, K, L, F].

    Example:
        >>> gather_lists(torch.tensor([[10, 11, 12]]), torch.tensor([[[2, 0], [1, 2]]])).tolist()
        [[[12, 10], [11, 12]]]
    """
    b, k, length = lists.shape
    flat = lists.reshape(b, k * length)
    if values.dim() == 2:
        return values.gather(1, flat).view(b, k, length)
    f = values.shape[-1]
    return values.gather(1, flat.unsqueeze(-1).expand(b, k * length, f)).view(b, k, length, f)


@dataclass
class RerankPool:
    """The re-ranking pool of B requests.

    Args:
        items: [B, M] int64 item indices (``video_id + 1``, the feature-spec convention; 0 = padding).
        mask: [B, M] bool, True at real (non-duplicate, non-padding) candidates.
        pxtr: [B, M, T] float32 predicted task probabilities (task order :data:`funnelrec.fusion.env.TASKS`).
        score: [B, M] float32 fused score (higher is better).
    """

    items: Tensor
    mask: Tensor
    pxtr: Tensor
    score: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.items.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.items.shape[1])

    def validate(self, min_valid: int = 1) -> "RerankPool":
        """Check shapes and dtypes; each request needs ``min_valid`` or more real candidates. Returns self."""
        if self.items.dim() != 2 or self.items.dtype != torch.int64:
            raise DataError(f"expected int64 [B, M], got {self.items.dtype} {list(self.items.shape)}",
                            column="pool.items")
        b, m = self.items.shape
        if self.mask.shape != (b, m) or self.mask.dtype != torch.bool:
            raise DataError(f"expected bool [{b}, {m}], got {self.mask.dtype} {list(self.mask.shape)}",
                            column="pool.mask")
        if self.pxtr.dim() != 3 or self.pxtr.shape[:2] != (b, m):
            raise DataError(f"expected [{b}, {m}, T], got {list(self.pxtr.shape)}", column="pool.pxtr")
        if self.score.shape != (b, m):
            raise DataError(f"expected [{b}, {m}], got {list(self.score.shape)}", column="pool.score")
        if b and int(self.mask.sum(1).min()) < min_valid:
            raise DataError(f"every request needs at least {min_valid} real candidates", column="pool.mask")
        if bool((self.items[self.mask] <= 0).any()):
            raise DataError("real candidates must have item index >= 1 (0 is padding)", column="pool.items")
        return self

    def select(self, index: Tensor) -> "RerankPool":
        """The requests at ``index`` ([B'] int64 or [B] bool)."""
        return RerankPool(self.items[index], self.mask[index], self.pxtr[index], self.score[index])

    def to(self, device) -> "RerankPool":
        return RerankPool(*(t.to(device) for t in (self.items, self.mask, self.pxtr, self.score)))


@dataclass
class RerankRequests:
    """B re-ranking requests: what a model reads (``batch``, ``pool``) and the world-side state of each one.

    Args:
        batch: the ``RequestBatch`` (history: ``hist_items`` / ``hist_actions`` / ``hist_gap_s`` /
            ``hist_len``, left-padded; candidates = the pool; ``tab``).
        pool: the :class:`RerankPool`.
        user: [B] int64 population rows (world side).
        tab: [B] int64 scenario of the request.
        short_term: [B, D] the users' short-term intent (world side: responses and oracle only, never a model
            input).
        day: the request day (long-term interests of that day).
    """

    batch: RequestBatch
    pool: RerankPool
    user: Tensor
    tab: Tensor
    short_term: Tensor
    day: int

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def select(self, index: Tensor) -> "RerankRequests":
        """The requests at ``index``; the history is cut to the longest one kept (left padding only)."""
        batch = self.batch.select(index)
        n = int(batch.hist_len.max()) if batch.batch_size else 0
        batch = batch.truncate_history(max(n, 1))
        return RerankRequests(batch, self.pool.select(index), self.user[index], self.tab[index],
                              self.short_term[index], self.day)


@dataclass
class RerankDataConfig:
    """Sizes of the re-ranking requests.

    Args:
        pool_size: M, candidates per request (the paper's online pool: 60).
        list_len: L, items per list (default: the world's page size).
        history_len: the most recent logged events kept per user (the paper: 1,000).
        noise_std: logit noise of the predictions (``SessionEnvConfig.noise_std``: ~ a trained ranker's
            error).
        noise_seed: seed of that noise (the "ranker").
        watch_scale_s: squash scale of the predicted watch time.
    """

    pool_size: int = 60
    list_len: int | None = None
    history_len: int = 1000
    noise_std: float = 1.2
    noise_seed: int = 12345
    watch_scale_s: float = 30.0

    def validate(self, page_size: int) -> "RerankDataConfig":
        """Raise ``ConfigError`` naming the bad field."""
        length = self.list_len if self.list_len is not None else page_size
        if not isinstance(self.pool_size, int) or self.pool_size < max(2, page_size):
            raise ConfigError(f"rerank data config: pool_size={self.pool_size!r} must be an integer >= 2 and "
                              f">= the world's sessions.page_size={page_size}")
        checks = [("list_len", length, isinstance(length, int) and 1 <= length <= self.pool_size),
                  ("history_len", self.history_len, isinstance(self.history_len, int) and
                   1 <= self.history_len <= 1000),
                  ("noise_std", self.noise_std, self.noise_std >= 0),
                  ("watch_scale_s", self.watch_scale_s, self.watch_scale_s > 0)]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"rerank data config: {name}={value!r} is out of range")
        return self


@dataclass
class ItemFeatures:
    """Observable side features of every item index (row 0 = padding; all indices shifted by 1, 0 = unknown).

    Args:
        table: [I + 1, 3] int64: primary tag + 1, creator bucket + 1, duration bucket + 1.
        num_tags: vocabulary of column 0 (tags + 1).
        creator_buckets: vocabulary of column 1 minus 1.
        duration_buckets: vocabulary of column 2 minus 1.
    """

    table: Tensor
    num_tags: int
    creator_buckets: int
    duration_buckets: int

    @classmethod
    def from_world(cls, world, creator_buckets: int = 64, duration_buckets: int = 8) -> "ItemFeatures":
        """From the world's catalog: its ``tags`` / ``author_index`` / ``duration_ms`` are parsed from the
        KuaiRand video columns ``tag`` / ``author_id`` / ``video_duration`` (no latent or quality column).

        Creators are hashed into ``creator_buckets`` buckets (an equality signal for "same creator" that
        cannot memorise a creator's quality); durations are cut at quantiles of the log duration.
        """
        if creator_buckets < 1 or duration_buckets < 1:
            raise ConfigError(f"creator_buckets={creator_buckets} and duration_buckets={duration_buckets} "
                              f"must be >= 1")
        cat = world.catalog
        tag = cat.primary_tag.clamp(min=0) + 1
        creator = (cat.author_index * 2_654_435_761) % creator_buckets + 1
        log_dur = cat.duration_ms.log()
        edges = torch.quantile(log_dur, torch.linspace(0, 1, duration_buckets + 1)[1:-1])
        dur = torch.bucketize(log_dur, edges) + 1
        table = torch.cat([torch.zeros(1, 3, dtype=torch.int64), torch.stack([tag, creator, dur], 1)])
        return cls(table=table, num_tags=int(cat.num_clusters) + 1, creator_buckets=creator_buckets,
                   duration_buckets=duration_buckets)

    def lookup(self, items: Tensor) -> Tensor:
        """[..., 3] features of ``items`` (item indices, 0 = padding; ``DataError`` when out of range)."""
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.table.shape[0]):
            raise DataError(f"item index out of range [0, {self.table.shape[0]})", column="items")
        return self.table[items]


def split_request_users(num_users: int, valid: int, test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint (train, valid, test) population rows by a seeded permutation (``ConfigError`` if too many)."""
    if valid < 1 or test < 1 or valid + test >= num_users:
        raise ConfigError(f"valid={valid} and test={test} users must be >= 1 and leave training users "
                          f"(the world has {num_users})")
    perm = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed))
    train, valid_u, test_u = perm[valid + test:], perm[:valid], perm[valid: valid + test]
    return train.sort().values, valid_u.sort().values, test_u.sort().values


class RerankData:
    """Draws re-ranking requests from a world and its logged histories, and answers for shown lists.

    Args:
        world: the ``World`` (responses, oracle, logging policy for candidates).
        timelines: the users' logged events (``Timelines.from_log(source.log)``).
        config: sizes.
        request_day: day of the requests (default: the day after the log, ``world.cfg.days``).

    Example:
        >>> from funnelrec.data.sources import load_source  # doctest: +SKIP
        >>> src = load_source("sim:small?num_users=200&days=4", progress=False)  # doctest: +SKIP
        >>> data = RerankData.from_source(src)  # doctest: +SKIP
        >>> req = data.requests(torch.arange(8), seed=0)  # doctest: +SKIP
        >>> req.pool.items.shape  # doctest: +SKIP
        torch.Size([8, 60])
    """

    def __init__(self, world, timelines: Timelines, config: RerankDataConfig | None = None,
                 request_day: int | None = None):
        self.world = world
        self.timelines = timelines
        self.page_size = world.cfg.sessions.page_size
        self.cfg = (config or RerankDataConfig()).validate(self.page_size)
        self.list_len = self.cfg.list_len if self.cfg.list_len is not None else self.page_size
        self.day = world.cfg.days if request_day is None else int(request_day)
        if self.day < 0:
            raise ConfigError(f"request_day must be >= 0, got {self.day}")
        self.request_time_ms = KUAIRAND_START_MS + self.day * DAY_MS
        self.features = ItemFeatures.from_world(world)

    @classmethod
    def from_source(cls, source, config: RerankDataConfig | None = None) -> "RerankData":
        """From a loaded simulated ``Source`` (its world and log)."""
        if getattr(source, "world", None) is None:
            raise DataError(f"{source.name}: re-ranking data needs a simulated world (sim:...)",
                            column="world")
        return cls(source.world, Timelines.from_log(source.log), config)

    def with_world(self, world) -> "RerankData":
        """The same histories and sizes, another world's responses (e.g. list effects switched off)."""
        return RerankData(world, self.timelines, self.cfg, request_day=self.day)

    # ------------------------------------------------------------------------------------------- requests
    def requests(self, users: Tensor, seed: int) -> RerankRequests:
        """One request for each of ``users`` ([B] population rows): pool, predictions, fused score, history.

        Args:
            users: [B] int64 population rows (repeats allowed: each row is its own request).
            seed: seeds the candidate draw, the short-term intents and the tabs (the env's seed).
        """
        users = torch.as_tensor(users, dtype=torch.int64)
        w, cfg = self.world, self.cfg
        if users.dim() != 1 or users.numel() == 0:
            raise DataError(f"expected a non-empty [B] tensor of users, got shape {list(users.shape)}",
                            column="users")
        env_cfg = SessionEnvConfig(world=w.cfg.name, num_sessions=int(users.numel()),
                                   candidates=cfg.pool_size, predictions="oracle_noisy",
                                   noise_std=cfg.noise_std, noise_seed=cfg.noise_seed,
                                   include_watch_time=True, watch_scale_s=cfg.watch_scale_s, day=self.day)
        env = SessionEnv(env_cfg, world=w, user_pool=users.unique())
        obs, _ = env.reset(seed=int(seed), options={"users": users})
        items = env.cand + 1
        pool = RerankPool(items=items, mask=obs["mask"].clone(), pxtr=obs["pxtr"].float(),
                          score=fused_score(obs["pxtr"].float(), cfg.watch_scale_s))
        pool.validate(min_valid=self.list_len)
        user_ids = w.population.user_id[users]
        t = torch.full_like(users, self.request_time_ms)
        hist = self.timelines.history(user_ids, t, max_len=cfg.history_len)
        b, m = items.shape
        batch = RequestBatch(
            user_id=user_ids.long(), request_time_ms=t, user_sparse=torch.zeros(b, 1, dtype=torch.int64),
            user_dense=torch.zeros(b, 0), hist_items=hist.items, hist_actions=hist.actions,
            hist_gap_s=hist.gap_s, hist_len=hist.length, cand_items=items, cand_mask=pool.mask,
            cand_sparse=items.unsqueeze(-1), cand_dense=pool.pxtr, tab=env.tab.clone(),
            hour=torch.zeros(b, dtype=torch.int64), position=torch.arange(m).expand(b, m).clone(),
            duration_s=w.catalog.duration_ms[items - 1] / 1000.0,
        )
        n = max(1, int(hist.length.max()))
        batch = batch.truncate_history(n).validate()
        return RerankRequests(batch=batch, pool=pool, user=users.clone(), tab=env.tab.clone(),
                              short_term=env.short.clone(), day=self.day)

    # ---------------------------------------------------------------------------------------- list values
    def _states(self, req: RerankRequests, lists: Tensor):
        """Yield (row slice, PageState) chunks of the B·K shown lists."""
        self._check_lists(req, lists)
        b, k, length = lists.shape
        items = gather_lists(req.pool.items, lists).reshape(b * k, length) - 1  # world item indices
        rep = torch.arange(b).repeat_interleave(k)
        long_all = self.world.long_term_on_day(req.day)
        none = torch.full((1, 1), -1, dtype=torch.int64)
        for lo in range(0, b * k, _CHUNK_ROWS):
            r = rep[lo: lo + _CHUNK_ROWS]
            u = req.user[r]
            n = r.shape[0]
            yield slice(lo, lo + n), PageState(
                user=u, items=items[lo: lo + n], tab=req.tab[r], long_term=long_all[u],
                short_term=req.short_term[r], recent_tags=none.expand(n, 1),
                recent_creators=none.expand(n, 1))

    def outcomes(self, req: RerankRequests, lists: Tensor, generator: torch.Generator,
                 draws: int = 1) -> Tensor:
        """[B, K] realised value of every list shown to its user once (the mean of ``draws`` showings).

        The world's own response functions, list effects in force: ``ResponseModel.page`` then
        ``ResponseModel.sample`` (cascade scan, clicks, watch time, long view by KuaiRand's rule, likes …),
        scored with :data:`VALUE_WEIGHTS`. These are training targets; the oracle is never read.

        Args:
            req: the requests.
            lists: [B, K, L] int64 pool positions.
            generator: the random stream of the draws.
            draws: how many showings to average (1 = one logged outcome per list).
        """
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ConfigError(f"draws must be a positive integer, got {draws!r}")
        b, k, _ = lists.shape
        out = torch.zeros(b * k)
        resp = self.world.responses
        for rows, state in self._states(req, lists):
            if draws > 1:
                state = PageState(**{f.name: getattr(state, f.name).repeat_interleave(draws, 0)
                                     for f in dataclasses.fields(state)})
            probs = resp.page(state)
            d = resp.sample(probs, generator)
            value = d["play_ms"] / 1000.0
            long_view = d["click"] & long_view_rule(d["play_ms"], probs.duration_ms)
            value = value + VALUE_WEIGHTS["long_view"] * long_view.float()
            for name, key in _DRAW_KEYS.items():
                value = value + VALUE_WEIGHTS[name] * d[key].float()
            out[rows] = value.sum(1).view(-1, draws).mean(1)
        return out.view(b, k)

    def oracle_values(self, req: RerankRequests, lists: Tensor) -> Tensor:
        """[B, K] the oracle's expected value of every list (``Oracle.expected_list_value``, same weights).

        For evaluation only (regret-normalised value, Hit@1); never a training target.
        """
        b, k, _ = lists.shape
        out = torch.zeros(b * k)
        for rows, s in self._states(req, lists):
            out[rows] = self.world.oracle.expected_list_value(s.user, s.items, weights=VALUE_WEIGHTS,
                                                              tab=s.tab, day=req.day, short_term=s.short_term)
        return out.view(b, k)

    def _check_lists(self, req: RerankRequests, lists: Tensor) -> None:
        check_lists(lists, req.pool)


def check_lists(lists: Tensor, pool: RerankPool) -> None:
    """``DataError`` unless ``lists`` is int64 [B, K, L] of real pool positions, no repeats within a list."""
    if not isinstance(lists, Tensor) or lists.dim() != 3 or lists.dtype != torch.int64:
        what = f"{getattr(lists, 'dtype', type(lists).__name__)} {list(getattr(lists, 'shape', []))}"
        raise DataError(f"expected int64 [B, K, L] pool positions, got {what}", column="lists")
    b, k, length = lists.shape
    if b != pool.batch_size:
        raise DataError(f"lists hold {b} requests, the pool {pool.batch_size}", column="lists")
    if k < 1 or length < 1:
        raise DataError(f"need K >= 1 lists of L >= 1 items, got [{b}, {k}, {length}]", column="lists")
    if int(lists.min()) < 0 or int(lists.max()) >= pool.num_candidates:
        raise DataError(f"pool positions must lie in [0, {pool.num_candidates})", column="lists")
    if not bool(gather_lists(pool.mask, lists).all()):
        raise DataError("a list holds a padding or duplicate candidate of the pool", column="lists")
    srt = lists.sort(-1).values
    if length > 1 and bool((srt[..., 1:] == srt[..., :-1]).any()):
        raise DataError("a list holds the same candidate twice", column="lists")
