"""Diagnostics of the world: does each effect leave the trace a model could exploit?

* ``history_advantage`` — how much a *long* history helps over a short one for a simple, fixed scorer that reads
  only the history (the user's tag-cluster profile of positive feedback). Long-term interests are what long
  histories reveal; with them switched off (``interests.long_term_enabled=false``) the advantage must vanish.
* ``OracleGreedyPolicy`` — drives the world's sessions by the oracle's single-item values with a chosen objective;
  a watch-time-greedy policy and a satisfaction-aware one show the long-term trade-off of the session model.

Example:
    >>> from funnelrec.sim import World
    >>> sim = World.from_profile("small").simulate(days=3, progress=False)
    >>> adv = history_advantage(sim, short=10, long=200)
    >>> sorted(adv)[:2]
    ['auc_long', 'auc_short']
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS
from funnelrec.data.timeline import Timelines
from funnelrec.metrics import gauc
from funnelrec.sim.world import SimLog, World


def history_profile_scores(sim: SimLog, rows: np.ndarray, history: int, timelines: Timelines | None = None,
                           task: int = 0, smoothing: float = 5.0, before_day: bool = True) -> np.ndarray:
    """Score log ``rows`` by the user's personal rate lift on the candidate's primary tag.

    From the last ``history`` events before each request: the user's rate of ``task`` (action channel, 0 = click)
    on impressions of that tag, relative to what an average-taste user with the same overall rate would show on that
    tag (smoothed with ``smoothing`` pseudo-impressions). Rates, not counts, so that how often the logging policy
    *showed* a tag does not pass for taste. With ``before_day`` the history ends at the start of the request's day
    (Beijing midnight), so today's session intent is not in it: what is left is what persists across days.
    [len(rows)] float.
    """
    log = sim.log
    timelines = timelines or Timelines.from_log(log)
    users = torch.from_numpy(log["user_id"].to_numpy()[rows])
    times = torch.from_numpy(log["time_ms"].to_numpy()[rows])
    if before_day:
        times = KUAIRAND_START_MS + (times - KUAIRAND_START_MS) // DAY_MS * DAY_MS
    hist = timelines.history(users, times, history)
    tags = _primary_tags(sim.videos)
    num_tags = int(tags.max()) + 2
    hist_items, hist_actions = hist[0], hist[1]
    valid = hist_items > 0
    hist_tag = torch.where(valid, tags[(hist_items - 1).clamp(min=0)], num_tags - 1)
    shown = torch.zeros(users.shape[0], num_tags).scatter_add_(1, hist_tag, valid.float())[:, :-1]
    hits = torch.zeros(users.shape[0], num_tags).scatter_add_(1, hist_tag, hist_actions[..., task] * valid)[:, :-1]
    tag_rate = (hits.sum(0) + 1.0) / (shown.sum(0) + 2.0)  # the population's rate per tag
    all_rate = (hits.sum() + 1.0) / (shown.sum() + 2.0)
    user_rate = (hits.sum(1, keepdim=True) + smoothing * all_rate) / (shown.sum(1, keepdim=True) + smoothing)
    # What this user would do on each tag with average taste: their own overall rate × the tag's relative rate.
    expected = user_rate * tag_rate / all_rate
    personal = (hits + smoothing * expected) / (shown + smoothing)
    lift = personal / expected
    cand_tag = tags[torch.from_numpy(log["video_id"].to_numpy()[rows])]
    return lift.gather(1, cand_tag.unsqueeze(1)).squeeze(1).numpy()


def last_day_mask(log: pl.DataFrame) -> np.ndarray:
    """[R] bool: rows of the last full simulated day (sessions that run past its midnight count to it)."""
    counts = log.group_by("date").len().sort("date")
    full = counts.filter(pl.col("len") >= 0.5 * counts["len"].median())["date"]
    return (log["date"] >= full.max()).to_numpy()


def _primary_tags(videos: pl.DataFrame) -> Tensor:
    first = videos["tag"].fill_null("-1").str.split(",").list.first()
    codes = first.cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    out = torch.zeros(int(videos["video_id"].max()) + 1, dtype=torch.int64)
    out[torch.tensor(videos["video_id"].to_numpy())] = torch.from_numpy(codes)
    return out


def history_advantage(sim: SimLog, short: int = 10, long: int = 300, task: str = "is_click",
                      max_rows: int = 200_000, seed: int = 0) -> dict[str, float]:
    """User-grouped AUC of the history-profile scorer with short and long histories (both ending at the start of
    the day) on the last day's impressions.

    Returns ``auc_short``, ``auc_long`` and ``advantage`` = auc_long − auc_short.
    """
    log = sim.log
    rows = np.flatnonzero(last_day_mask(log))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    timelines = Timelines.from_log(log)
    y = log[task].to_numpy()[rows]
    channel = ACTION_COLUMNS.index(task)
    users = log["user_id"].to_numpy()[rows]
    # Within-user AUC (GAUC): how active a user is overall is not taste, and must not count as the history's merit.
    a_short = gauc(history_profile_scores(sim, rows, short, timelines, task=channel), y, users)
    a_long = gauc(history_profile_scores(sim, rows, long, timelines, task=channel), y, users)
    return {"auc_short": a_short, "auc_long": a_long, "advantage": a_long - a_short}


class OracleGreedyPolicy:
    """Shows each user the top-M of a candidate set by the oracle's single-item value of ``objective``.

    Args:
        world: the world (its oracle scores the candidates; candidates come from its logging policy's samplers).
        objective: ``"watch"`` (expected watch seconds, greedy) or ``"satisfaction"`` (expected watch minutes +
            ``satisfaction_weight`` × the expected per-impression reward r of the session model — watch ratio,
            like, follow, comment, forward, minus hate — filled with the session model's repetition cost in mind).
        candidates: candidates drawn per request (half by popularity, half from the user's interests).
    """

    def __init__(self, world: World, objective: str = "watch", candidates: int = 48, satisfaction_weight: float = 1.0):
        if objective not in ("watch", "satisfaction"):
            raise ValueError(f"objective must be 'watch' or 'satisfaction', got {objective!r}")
        self.world = world
        self.objective = objective
        self.candidates = candidates
        self.satisfaction_weight = satisfaction_weight
        self.page_size = world.cfg.sessions.page_size
        self.day = 0

    def set_available(self, available: Tensor) -> None:
        self.world.logging_policy.set_available(available)

    def select(self, user: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        w = self.world
        lp = w.logging_policy
        half = self.candidates // 2
        cand = torch.cat([lp.popular(user.shape[0], half, g), lp.from_interests(user, self.candidates - half, g)], 1)
        b, c = cand.shape
        flat_user = user.repeat_interleave(c)
        probs = w.responses.page(w.oracle._state(flat_user, cand.reshape(-1, 1), 1, 0, None))
        marg = w.responses.marginals(probs)
        if self.objective == "watch":
            value = marg["play_ms"][:, 0]
        else:
            sc = w.cfg.sessions
            sigma = w.cfg.responses.watch_sigma
            ratio = torch.exp(probs.watch_mu + sigma ** 2 / 2).clamp(max=1.0)
            t = marg["tasks"][:, 0]
            reward = (sc.reward_watch * ratio[:, 0] * t[:, 0] + sc.reward_like * t[:, 2] + sc.reward_follow * t[:, 3]
                      + sc.reward_comment * t[:, 4] + sc.reward_forward * t[:, 5] - sc.reward_hate * marg["hate"][:, 0])
            value = marg["play_ms"][:, 0] / 60_000.0 + self.satisfaction_weight * reward
        value = value.view(b, c)
        # never the same item twice on a page
        sorted_cand, order = cand.sort(dim=1)
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup_sorted = torch.zeros_like(dup)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup.scatter_(1, order, dup_sorted)
        value = value.masked_fill(dup, float("-inf"))
        if self.objective == "watch":
            top = value.topk(self.page_size, dim=1).indices
            return cand.gather(1, top), torch.zeros(b, self.page_size, dtype=torch.bool)
        return self.diverse_pick(cand, value), torch.zeros(b, self.page_size, dtype=torch.bool)

    def diverse_pick(self, cand: Tensor, value: Tensor) -> Tensor:
        """Greedy page filling that charges each candidate the session model's repetition cost of the items
        already on the page (same primary tag or creator): what a satisfaction-aware policy knows."""
        w = self.world
        cost = w.cfg.sessions.reward_repeat
        tags, creators = w.catalog.primary_tag[cand], w.catalog.author_index[cand]
        penalty = torch.zeros_like(value)
        picked = torch.zeros(cand.shape[0], self.page_size, dtype=torch.int64)
        rows = torch.arange(cand.shape[0])
        for k in range(self.page_size):
            j = (value - penalty).argmax(dim=1)
            picked[:, k] = cand[rows, j]
            value[rows, j] = float("-inf")
            penalty += cost * ((tags == tags[rows, j].unsqueeze(1)).float()
                               + (creators == creators[rows, j].unsqueeze(1)).float())
        return picked


def session_watch_time(sim: SimLog) -> dict[str, float]:
    """Mean total watch seconds and mean impressions per session of a simulated log."""
    per = pl.DataFrame({"session": sim.oracle["session_id"], "play": sim.log["play_time_ms"]}).group_by(
        "session").agg(pl.col("play").sum() / 1000, pl.len().alias("n"))
    return {"watch_s_per_session": float(per["play"].mean()), "impressions_per_session": float(per["n"].mean())}
