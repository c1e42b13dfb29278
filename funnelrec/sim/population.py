"""Users of the world: the real KuaiRand-Pure users with latent tastes.

The real table fixes who the users are and how active they are (``user_active_degree``), how social
(``follow_user_num``, ``fans_user_num``) and how old their account is. The world adds:

* long-term interests: ``num_long_term`` tag clusters (drawn ∝ √cluster size) mixed with Dirichlet weights,
  ``u_long = Σ_k w_k · centroid[c_k]``, which drift slowly from day to day;
* one *hidden* interest: a cluster the logging policy does not know about, weak on clicks but strong on
  like/follow — rare in a history, so only long histories reveal it;
* a low-rank creator affinity ``⟨a_user, b_creator⟩``;
* scalars from the real features: activity bias of the click logit, follow propensity (log fans + follows),
  session rate, initial satisfaction.

Example:
    >>> from funnelrec.sim.catalog import Catalog
    >>> cat = Catalog.build(seed=0, latent_dim=8)
    >>> pop = Population.build(num_users=50, catalog=cat, seed=0)
    >>> pop.long_term.shape
    torch.Size([50, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.schema import ACTIVE_DEGREES
from funnelrec.sim.catalog import Catalog, _unit, real_table

#: Click-logit bias per activity degree (more active users click more): an assumption of ours, see docs.
ACTIVITY_CLICK_BIAS = {
    "full_active": 0.25, "high_active": 0.1, "middle_active": 0.0, "low_active": -0.2, "single_low_active": -0.35,
    "2_14_day_new": -0.1, "30day_retention": -0.2, "day_new": -0.15, "UNKNOWN": -0.2,
}
CREATOR_AFFINITY_RANK = 4


@dataclass
class Population:
    """Users ``U`` of a world as aligned tensors.

    Args:
        users: the real user-feature rows of the simulated users (KuaiRand columns).
        user_id: [U] int64 real user ids.
        degree: [U] int64 index into ``ACTIVE_DEGREES``.
        activity_bias: [U] float32 click-logit bias.
        follow_bias: [U] float32 follow-logit bias from the social features.
        interest_clusters: [U, K] int64 long-term interest clusters; ``interest_weights`` [U, K] their mix.
        long_term: [U, D] float32 the day-0 long-term vector.
        hidden_cluster: [U] int64 the hidden interest cluster.
        policy_view: [U, D] float32 the logging policy's noisy view of ``long_term``.
        creator_factor: [U, R] float32 user side of the creator affinity.
        initial_satisfaction: [U] float32.
    """

    users: pl.DataFrame
    user_id: Tensor
    degree: Tensor
    activity_bias: Tensor
    follow_bias: Tensor
    interest_clusters: Tensor
    interest_weights: Tensor
    long_term: Tensor
    hidden_cluster: Tensor
    policy_view: Tensor
    creator_factor: Tensor
    initial_satisfaction: Tensor

    @property
    def num_users(self) -> int:
        return int(self.user_id.shape[0])

    @classmethod
    def build(cls, num_users: int | None, catalog: Catalog, seed: int, num_long_term: int = 3,
              dirichlet_alpha: float = 0.5, heavy_users_only: bool = False, initial_satisfaction: float = 0.5,
              policy_noise: float = 0.5) -> "Population":
        """Pick ``num_users`` real users (seeded; the most active first when ``heavy_users_only``) and draw tastes."""
        table = real_table("users")
        rng = np.random.default_rng(seed)
        order = rng.permutation(table.height)
        if heavy_users_only:
            rank = table["user_active_degree"].replace_strict(
                {d: i for i, d in enumerate(ACTIVE_DEGREES)}, default=len(ACTIVE_DEGREES)).to_numpy()
            order = order[np.argsort(rank[order], kind="stable")]
        if num_users is not None:
            order = np.sort(order[:num_users])
        else:
            order = np.arange(table.height)
        users = table[order]
        n = users.height
        g = torch.Generator().manual_seed(seed + 17)

        degree_names = users["user_active_degree"].fill_null("UNKNOWN")
        degree = torch.from_numpy(degree_names.replace_strict(
            {d: i for i, d in enumerate(ACTIVE_DEGREES)}, default=len(ACTIVE_DEGREES) - 1).to_numpy().astype(np.int64))
        activity_bias = torch.tensor([ACTIVITY_CLICK_BIAS[ACTIVE_DEGREES[i]] for i in degree.tolist()])
        social = np.log1p(users["fans_user_num"].fill_null(0).to_numpy().clip(0)) + \
            0.5 * np.log1p(users["follow_user_num"].fill_null(0).to_numpy().clip(0))
        social = (social - social.mean()) / (social.std() + 1e-6)
        follow_bias = torch.from_numpy(0.4 * social).float()

        sizes = torch.bincount(catalog.primary_tag, minlength=catalog.num_clusters).float()
        cluster_p = sizes.sqrt()
        k = min(num_long_term, int((sizes > 0).sum()))
        clusters = torch.multinomial(cluster_p.expand(n, -1), k, replacement=False, generator=g)
        weights = torch.from_numpy(rng.dirichlet(np.full(k, dirichlet_alpha), size=n)).float()
        weights, idx = weights.sort(dim=1, descending=True)
        clusters = clusters.gather(1, idx)
        long_term = (weights.unsqueeze(-1) * catalog.centroids[clusters]).sum(1)

        # The hidden interest: a cluster outside the long-term ones, drawn ∝ √size too.
        hidden_p = cluster_p.expand(n, -1).clone()
        hidden_p.scatter_(1, clusters, 0.0)
        hidden = torch.multinomial(hidden_p, 1, generator=g).squeeze(1)

        view = long_term + policy_noise * long_term.norm(dim=1, keepdim=True) * _unit(
            torch.randn(n, catalog.latent.shape[1], generator=g))
        creator_factor = torch.randn(n, CREATOR_AFFINITY_RANK, generator=g) / CREATOR_AFFINITY_RANK ** 0.25
        sat = (initial_satisfaction + 0.1 * torch.randn(n, generator=g)).clamp(0.1, 0.9)
        return cls(
            users=users, user_id=torch.from_numpy(users["user_id"].to_numpy().astype(np.int64)), degree=degree,
            activity_bias=activity_bias.float(), follow_bias=follow_bias, interest_clusters=clusters,
            interest_weights=weights, long_term=long_term.float(), hidden_cluster=hidden, policy_view=view.float(),
            creator_factor=creator_factor, initial_satisfaction=sat,
        )

    def sessions_per_day(self, rates: dict[str, float], default: float, scale: float) -> Tensor:
        """[U] float32 mean sessions a day for each user."""
        return torch.tensor([rates.get(ACTIVE_DEGREES[i], default) * scale for i in self.degree.tolist()])

    def long_term_on_day(self, day: int, drift: float, seed: int) -> Tensor:
        """[U, D] the long-term vectors after ``day`` days of a seeded random-walk drift (norm kept)."""
        base = self.long_term
        if drift <= 0 or day <= 0:
            return base
        total = torch.zeros_like(base)
        for d in range(1, day + 1):
            g = torch.Generator().manual_seed(seed * 1_000_003 + d)
            total += torch.randn(base.shape, generator=g)
        moved = base + drift * base.norm(dim=1, keepdim=True) * total / base.shape[1] ** 0.5
        return moved * (base.norm(dim=1, keepdim=True) / moved.norm(dim=1, keepdim=True).clamp(min=1e-6))
