"""The logging policy: the production-like ranker whose exposures fill the logs.

It is deliberately imperfect, as a real logging policy is: it draws candidates by popularity and from the user's
long-term clusters as it (noisily) knows them — it never knows the hidden interest or the short-term intent — and
ranks them by ``w_pop · log popularity + w_rel · (noisy relevance) + Gumbel noise``. A share of slots is replaced by
uniformly random items (``is_rand = 1``), the unbiased slice that evaluation uses.

Any other policy (a trained ranker, a fusion policy) can drive the world's sessions through the same
``select(...)`` signature: see ``World.run_sessions``.

Example:
    >>> from funnelrec.sim.world import World
    >>> w = World.from_profile("small")
    >>> items, is_rand = w.logging_policy.select(torch.arange(4), torch.Generator().manual_seed(0))
    >>> items.shape, is_rand.dtype
    (torch.Size([4, 6]), torch.bool)
"""

from __future__ import annotations

import torch
from torch import Tensor

from funnelrec.sim.catalog import Catalog
from funnelrec.sim.config import LoggingPolicyConfig
from funnelrec.sim.population import Population


class LoggingPolicy:
    """Noisy popularity- and position-biased ranker with a randomly exposed share.

    Args:
        config: the policy's sizes.
        catalog: the items.
        population: the users (the policy reads only ``policy_view`` and ``interest_clusters``).
        page_size: M, items per page.
    """

    def __init__(self, config: LoggingPolicyConfig, catalog: Catalog, population: Population, page_size: int):
        self.cfg = config
        self.catalog = catalog
        self.population = population
        self.page_size = page_size
        self.log_popularity = 2.0 * catalog.quality
        self.members, self.offsets = catalog.cluster_members()
        self.set_available(torch.ones(catalog.num_items, dtype=torch.bool))

    def set_available(self, available: Tensor) -> None:
        """Restrict exposure to ``available`` items ([I] bool; e.g. items uploaded by today)."""
        self.available = available
        weight = torch.exp(self.log_popularity - self.log_popularity.max()) * available.float()
        self.pop_cdf = torch.cumsum(weight.double(), 0)
        self.pop_cdf = self.pop_cdf / self.pop_cdf[-1]
        self.available_ids = torch.nonzero(available).squeeze(1)

    def popular(self, n: int, count: int, g: torch.Generator) -> Tensor:
        """[n, count] items drawn ∝ popularity (inverse CDF: one searchsorted, no multinomial)."""
        u = torch.rand(n, count, generator=g, dtype=torch.float64)
        return torch.searchsorted(self.pop_cdf, u).clamp(max=self.catalog.num_items - 1)

    def from_interests(self, user: Tensor, count: int, g: torch.Generator) -> Tensor:
        """[B, count] items drawn uniformly from clusters drawn by the users' long-term interest weights."""
        b = user.shape[0]
        w = self.population.interest_weights[user]
        cdf = torch.cumsum(w, 1)
        pick = torch.searchsorted(cdf, torch.rand(b, count, generator=g) * cdf[:, -1:]).clamp(max=w.shape[1] - 1)
        cluster = self.population.interest_clusters[user].gather(1, pick)
        start = self.offsets[cluster]
        size = self.offsets[cluster + 1] - start
        slot = (torch.rand(b, count, generator=g) * size).long()
        items = self.members[(start + slot).clamp(max=self.members.shape[0] - 1)]
        fallback = self.popular(b, count, g)
        ok = (size > 0) & self.available[items]
        return torch.where(ok, items, fallback)

    def select(self, user: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Choose a page for each user.

        Args:
            user: [B] int64 user indices.
            g: the RNG.

        Returns:
            items [B, M] int64 in display order, and is_rand [B, M] bool.
        """
        cfg = self.cfg
        b, m = user.shape[0], self.page_size
        cand = torch.cat([self.popular(b, cfg.num_popular, g), self.from_interests(user, cfg.num_interest, g)], 1)
        view = self.population.policy_view[user]
        rel = torch.einsum("bd,bcd->bc", view, self.catalog.latent[cand])
        noise = torch.randn(cand.shape, generator=g)
        gumbel = -torch.log(-torch.log(torch.rand(cand.shape, generator=g).clamp(1e-9, 1 - 1e-9)))
        score = cfg.popularity_weight * self.log_popularity[cand] + cfg.relevance_weight * (
            3.0 * rel + cfg.relevance_noise * noise) + cfg.temperature * gumbel
        # A page never shows the same item twice: duplicates lose to their first copy.
        sorted_cand, order = cand.sort(dim=1)
        dup_sorted = torch.zeros_like(sorted_cand, dtype=torch.bool)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        score = score.masked_fill(dup, float("-inf"))
        top = score.topk(m, dim=1).indices
        items = cand.gather(1, top)
        is_rand = torch.rand(b, m, generator=g) < cfg.random_share
        if is_rand.any():
            pool = self.available_ids
            rand_items = pool[torch.randint(0, pool.shape[0], (b, m), generator=g)]
            items = torch.where(is_rand, rand_items, items)
        return items, is_rand
