"""The oracle: the world's true probabilities, expected watch time, list values and rankings.

The oracle is the project's "physical limit" yardstick (DESIGN §7): how much of the gap between a popularity-only
model and the oracle a model closes. It answers for any user, any items and any list — not only for logged
impressions (those have their true probabilities stored in ``SimLog.oracle``, row-aligned with the log).

A user's short-term intent is a within-session state; queries without a ``short_term`` use a neutral intent (zero
vector), i.e. the user's expected taste at the start of a fresh session.

Example:
    >>> from funnelrec.sim.world import World
    >>> w = World.from_profile("small")
    >>> top = w.oracle.topk(torch.tensor([0, 1, 2]), k=10)
    >>> top.shape
    torch.Size([3, 10])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from funnelrec.data.schema import NUM_TABS
from funnelrec.errors import DataError
from funnelrec.sim.responses import PageState

if TYPE_CHECKING:
    from funnelrec.sim.world import World

TASKS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")


class Oracle:
    """Ground truth of a ``World``.

    Args:
        world: the world whose ground truth this is.
    """

    def __init__(self, world: "World"):
        self.world = world

    def _state(self, user: Tensor, items: Tensor, tab: Tensor | int, day: int, short_term: Tensor | None) -> PageState:
        w = self.world
        if user.dim() != 1 or items.dim() != 2 or items.shape[0] != user.shape[0]:
            raise DataError(f"expected user [B] and items [B, M], got {list(user.shape)} and {list(items.shape)}",
                            column="items")
        if user.numel() == 0:
            raise DataError("no users given", column="user")
        if int(user.min()) < 0 or int(user.max()) >= w.population.num_users:
            raise DataError(f"user index out of range [0, {w.population.num_users})", column="user")
        if int(items.min()) < 0 or int(items.max()) >= w.catalog.num_items:
            raise DataError(f"item index out of range [0, {w.catalog.num_items})", column="items")
        b = user.shape[0]
        tab_t = tab if isinstance(tab, Tensor) else torch.full((b,), int(tab), dtype=torch.int64)
        if tab_t.shape != (b,) or int(tab_t.min()) < 0 or int(tab_t.max()) >= NUM_TABS:
            raise DataError(f"tab must be [B] (or one int) with values in [0, {NUM_TABS})", column="tab")
        d = w.catalog.latent.shape[1]
        short = short_term if short_term is not None else torch.zeros(b, d)
        none = torch.full((b, 1), -1, dtype=torch.int64)
        return PageState(user=user, items=items, tab=tab_t, long_term=w.long_term_on_day(day)[user],
                         short_term=short, recent_tags=none, recent_creators=none)

    def page_probabilities(self, user: Tensor, items: Tensor, tab: Tensor | int = 1, day: int = 0,
                           short_term: Tensor | None = None) -> Tensor:
        """[B, M, T] true marginal probabilities of the 6 tasks for ``items`` shown as one list in this order.

        Args:
            user: [B] int64 user indices (rows of ``world.population``).
            items: [B, M] int64 item indices (= video ids of the simulated corpus).
            tab: the scenario ([B] or one int).
            day: day index (long-term interests drift).
            short_term: [B, D] short-term intent, default neutral.
        """
        probs = self.world.responses.page(self._state(user, items, tab, day, short_term))
        return self.world.responses.marginals(probs)["tasks"]

    def expected_watch_time(self, user: Tensor, items: Tensor, tab: Tensor | int = 1, day: int = 0,
                            short_term: Tensor | None = None) -> Tensor:
        """[B, M] expected play time in seconds of each item of the list."""
        probs = self.world.responses.page(self._state(user, items, tab, day, short_term))
        return self.world.responses.marginals(probs)["play_ms"] / 1000.0

    def expected_list_value(self, user: Tensor, lists: Tensor, weights: dict[str, float] | None = None,
                            tab: Tensor | int = 1, day: int = 0, short_term: Tensor | None = None) -> Tensor:
        """[B] expected value of each list: Σ_k (watch seconds + Σ_task weight·P(task)) with list effects.

        Args:
            lists: [B, L] item indices in display order.
            weights: task name → weight (default: watch time only).
        """
        probs = self.world.responses.page(self._state(user, lists, tab, day, short_term))
        marg = self.world.responses.marginals(probs)
        value = marg["play_ms"] / 1000.0
        for name, wgt in (weights or {}).items():
            if name == "is_hate":
                value = value + wgt * marg["hate"]
            elif name in TASKS:
                value = value + wgt * marg["tasks"][..., TASKS.index(name)]
            else:
                raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS + ('is_hate',))}",
                                column="weights")
        return value.sum(1)

    def item_scores(self, user: Tensor, items: Tensor | None = None, task: str = "is_click", day: int = 0,
                    tab: int = 1, max_rows: int = 1_000_000) -> Tensor:
        """[B, I'] single-item (top position, no list effects) true probability of ``task`` for every item."""
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}", column="task")
        w = self.world
        items = torch.arange(w.catalog.num_items) if items is None else items
        out = []
        chunk = max(1, max_rows // max(1, user.shape[0]))  # bounds memory at ~max_rows × D floats
        for lo in range(0, items.shape[0], chunk):
            part = items[lo: lo + chunk]
            grid = part.expand(user.shape[0], -1).reshape(-1, 1)
            uu = user.repeat_interleave(part.shape[0])
            p = self.page_probabilities(uu, grid, tab=tab, day=day)[:, 0, TASKS.index(task)]
            out.append(p.view(user.shape[0], -1))
        return torch.cat(out, 1)

    def topk(self, user: Tensor, k: int, task: str = "is_click", day: int = 0, exclude: Tensor | None = None) -> Tensor:
        """[B, k] the oracle's full-corpus top-k items by true single-item probability of ``task``.

        Args:
            exclude: optional [B, I] bool mask of items to leave out (e.g. the user's history).
        """
        scores = self.item_scores(user, task=task, day=day)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return scores.topk(k, dim=1).indices

    def user_index(self, user_ids: Tensor) -> Tensor:
        """Map real KuaiRand user ids to population row indices (DataError for ids not in this world)."""
        ids = self.world.population.user_id
        pos = torch.searchsorted(ids, user_ids).clamp(max=ids.shape[0] - 1)
        bad = ids[pos] != user_ids
        if bad.any():
            raise DataError(f"user id {int(user_ids[bad][0])} is not in this world", column="user_id")
        return pos
