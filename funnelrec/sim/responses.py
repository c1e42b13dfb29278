"""The response model: true probabilities of every feedback for a shown page, and draws from them.

For user u, item i at position k of a page (all terms with a size and a switch in ``WorldConfig``):

    relevance   r = w_long·⟨u_long, v_i⟩ + w_short·⟨u_short, v_i⟩ + ⟨a_u, b_creator(i)⟩ − list penalties
    click|exam  σ(b + b_activity(u) + b_tab + X[tab, cluster(i)] + Y[activity, duration bucket] + s·r + w_q·q_i)
    exam        e_0 = 1,  e_{k+1} = γ·e_k·(1 − λ·σ_click,k)          (cascade; exact marginals in closed form)
    watch|click play = duration · exp(μ + σ·ε),  μ = μ0 + w_r·(r + 0.3 q) − slope·log(duration / 60 s)
    task|click  σ(b_task + 1.2·r_task + boost·[cluster(i) = hidden(u)] (+ follow propensity)), where
                r_task reads its own projection (I + η·R_task)·u_long, so tasks are correlated, not identical
    hate|exam   σ(b_hate − 1.2·r + 0.5·repeats in the session window)

With ``responses.tab_response`` = η_tab > 0 (0 in every frozen profile) the tab also changes how users respond:
u_long is read through the tab's own (I + 0.6·η_tab·R_tab/√d), rescaled to its length; the click logit's
relevance term s·r is multiplied by exp(0.5·η_tab·z_tab); and each conditional task logit gets the tab's offset
0.5·η_tab·z_{tab,task}.

List penalties: saturation (each earlier item of the page with the same primary tag / creator) and similarity
(cosine to the item directly above beyond a threshold). Unclicked impressions play a short, uniform part of the
first 3 s, so ``long_view`` needs a click, as in KuaiRand's single-column UI where a click is a valid play.

The marginals returned by ``marginals`` are exact for the sequential sampler in ``sample``: a click at k stops the
scan with probability λ, so P(click_k) = e_k·σ_k with e_{k+1} = γ·e_k·(1 − λ·σ_k).

Example:
    >>> from funnelrec.sim.world import World
    >>> w = World.from_profile("small")
    >>> probs = w.oracle.page_probabilities(torch.tensor([0, 1]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    >>> probs.shape  # [B, M, T]
    torch.Size([2, 3, 6])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from funnelrec.data.schema import ACTIVE_DEGREES, LONG_VIEW_THRESHOLD_MS, NUM_TABS
from funnelrec.sim.catalog import Catalog
from funnelrec.sim.config import WorldConfig
from funnelrec.sim.population import CREATOR_AFFINITY_RANK, Population

#: Conditional tasks (given a click), in objective-registry order after is_click and long_view.
CONDITIONAL_TASKS = ("is_like", "is_follow", "is_comment", "is_forward")
NOCLICK_PLAY_MS = 3000.0
DURATION_BUCKETS = 5


@dataclass
class PageState:
    """What the world knows about a page being shown.

    Args:
        user: [B] int64 user indices (rows of the ``Population``).
        items: [B, M] int64 item indices, in display order.
        tab: [B] int64.
        long_term: [B, D] the users' long-term vectors on this day.
        short_term: [B, D] the users' current short-term intent.
        recent_tags: [B, W] primary tags of the session's last W impressions (-1 = none).
        recent_creators: [B, W] creators of the session's last W impressions (-1 = none).
    """

    user: Tensor
    items: Tensor
    tab: Tensor
    long_term: Tensor
    short_term: Tensor
    recent_tags: Tensor
    recent_creators: Tensor


@dataclass
class PageProbs:
    """Per-item conditional probabilities of a page (all [B, M])."""

    click: Tensor  # P(click | examined)
    watch_mu: Tensor  # μ of the log watch ratio given a click
    tasks: Tensor  # [B, M, 4] P(like/follow/comment/forward | click)
    hate: Tensor  # P(hate | examined)
    duration_ms: Tensor
    relevance: Tensor
    repeats: Tensor  # session-window repeats of tag or creator


class ResponseModel:
    """Computes true probabilities and draws responses for pages (vectorised over B pages × M items)."""

    def __init__(self, config: WorldConfig, catalog: Catalog, population: Population, seed: int):
        self.cfg = config
        self.catalog = catalog
        self.population = population
        g = torch.Generator().manual_seed(seed + 101)
        d = catalog.latent.shape[1]
        rc = config.responses
        self.tab_bias = 0.3 * torch.randn(NUM_TABS, generator=g) if rc.tab_effect else torch.zeros(NUM_TABS)
        self.tab_cluster = (0.25 * torch.randn(NUM_TABS, catalog.num_clusters, generator=g) if rc.tab_effect
                            else torch.zeros(NUM_TABS, catalog.num_clusters))
        self.activity_duration = (0.3 * torch.randn(len(ACTIVE_DEGREES), DURATION_BUCKETS, generator=g)
                                  if rc.duration_effect else torch.zeros(len(ACTIVE_DEGREES), DURATION_BUCKETS))
        log_dur = catalog.duration_ms.log()
        qs = torch.linspace(0, 1, DURATION_BUCKETS + 1)[1:-1]
        self.duration_edges = torch.quantile(log_dur, qs)
        self.item_duration_bucket = torch.bucketize(log_dur, self.duration_edges)
        eye = torch.eye(d).expand(len(CONDITIONAL_TASKS), d, d)
        self.task_projection = eye + rc.task_projection_noise * torch.randn(
            len(CONDITIONAL_TASKS), d, d, generator=g) / d ** 0.5
        self.creator_factor = torch.randn(catalog.num_creators, CREATOR_AFFINITY_RANK, generator=g) / \
            CREATOR_AFFINITY_RANK ** 0.25
        self.task_bias = torch.tensor([rc.like_bias, rc.follow_bias, rc.comment_bias, rc.forward_bias])
        # a stream of its own, so that tab_response = 0 leaves every other draw (and the frozen worlds) unchanged
        gt = torch.Generator().manual_seed(seed + 211)
        s = rc.tab_response
        self.tab_interest = torch.eye(d) + 0.6 * s * torch.randn(NUM_TABS, d, d, generator=gt) / d ** 0.5
        self.tab_relevance_scale = torch.exp(0.5 * s * torch.randn(NUM_TABS, generator=gt))
        self.tab_task_bias = 0.5 * s * torch.randn(NUM_TABS, len(CONDITIONAL_TASKS), generator=gt)
        if not config.responses.activity_effect:
            self._activity = torch.zeros(population.num_users)
        else:
            self._activity = population.activity_bias

    # ----------------------------------------------------------------- parts
    def _weights(self) -> tuple[float, float, float]:
        ic = self.cfg.interests
        w_long = ic.long_term_weight if ic.long_term_enabled else 0.0
        w_short = ic.short_term_weight if ic.short_term_enabled else 0.0
        return w_long, w_short, ic.creator_affinity_std

    def list_penalty(self, items: Tensor) -> Tensor:
        """[B, M] relevance penalty of each item from the items above it on the same page."""
        lc = self.cfg.lists
        b, m = items.shape
        pen = torch.zeros(b, m)
        if m < 2:
            return pen
        above = torch.ones(m, m, dtype=torch.bool).tril(-1)  # [k, j] True when j is above k
        if lc.saturation_enabled:
            tag = self.catalog.primary_tag[items]
            cre = self.catalog.author_index[items]
            same_tag = (tag.unsqueeze(2) == tag.unsqueeze(1)) & above
            same_cre = (cre.unsqueeze(2) == cre.unsqueeze(1)) & above
            pen += lc.saturation_tag * same_tag.sum(2) + lc.saturation_creator * same_cre.sum(2)
        if lc.similarity_enabled:
            v = self.catalog.latent[items]
            cos = (v[:, 1:] * v[:, :-1]).sum(-1)
            pen[:, 1:] += lc.similarity_penalty * (cos - lc.similarity_threshold).clamp(min=0)
        return pen

    def page(self, state: PageState) -> PageProbs:
        """Conditional probabilities of every response for every item of the pages in ``state``."""
        rc = self.cfg.responses
        cat = self.catalog
        items = state.items
        v = cat.latent[items]  # [B, M, D]
        w_long, w_short, w_creator = self._weights()
        long_term = state.long_term
        if rc.tab_response > 0:
            # the tab turns the interest vector but keeps its length, so the tab changes which items are
            # relevant, not how relevant the best ones are
            turned = torch.einsum("bde,be->bd", self.tab_interest[state.tab], long_term)
            scale = long_term.norm(dim=1, keepdim=True) / turned.norm(dim=1, keepdim=True).clamp(min=1e-12)
            long_term = turned * scale
        rel_long = torch.einsum("bd,bmd->bm", long_term, v)
        rel_short = torch.einsum("bd,bmd->bm", state.short_term, v)
        creator = cat.author_index[items]
        user_f = self.population.creator_factor[state.user]
        aff = w_creator * torch.einsum("br,bmr->bm", user_f, self.creator_factor[creator])
        relevance = w_long * rel_long + w_short * rel_short + aff - self.list_penalty(items)
        quality = cat.quality[items]
        cluster = cat.primary_tag[items]
        degree = self.population.degree[state.user]
        click_relevance = rc.relevance_scale * relevance
        if rc.tab_response > 0:
            click_relevance = click_relevance * self.tab_relevance_scale[state.tab].unsqueeze(1)
        logit = (rc.click_bias + self._activity[state.user].unsqueeze(1) + self.tab_bias[state.tab].unsqueeze(1)
                 + self.tab_cluster[state.tab.unsqueeze(1), cluster]
                 + self.activity_duration[degree.unsqueeze(1), self.item_duration_bucket[items]]
                 + click_relevance + rc.popularity_weight * quality)
        duration = cat.duration_ms[items]
        watch_mu = (rc.watch_log_ratio_bias + rc.watch_relevance_scale * (relevance + 0.3 * quality)
                    - rc.watch_duration_slope * torch.log(duration / 60_000.0))

        # Each conditional task reads its own projection of the long-term vector.
        proj = torch.einsum("tde,be->tbd", self.task_projection, long_term)  # [4, B, D]
        rel_task = w_long * torch.einsum("tbd,bmd->tbm", proj, v) + w_short * rel_short.unsqueeze(0) \
            + aff.unsqueeze(0) + 0.5 * quality.unsqueeze(0)
        task_logit = self.task_bias.view(-1, 1, 1) + 1.2 * rel_task
        if rc.tab_response > 0:
            task_logit = task_logit + self.tab_task_bias[state.tab].T.unsqueeze(-1)
        if self.cfg.interests.hidden_enabled:
            hidden = (cluster == self.population.hidden_cluster[state.user].unsqueeze(1)).float()
            task_logit = task_logit + self.cfg.interests.hidden_like_boost * hidden.unsqueeze(0)
        follow_extra = self.population.follow_bias[state.user].unsqueeze(1) + aff
        task_logit = task_logit + torch.stack([torch.zeros_like(aff), follow_extra, torch.zeros_like(aff),
                                               torch.zeros_like(aff)])
        repeats = self.session_repeats(state)
        hate_logit = rc.hate_bias - 1.2 * relevance + 0.5 * repeats
        return PageProbs(
            click=torch.sigmoid(logit), watch_mu=watch_mu, tasks=torch.sigmoid(task_logit).permute(1, 2, 0),
            hate=torch.sigmoid(hate_logit), duration_ms=duration, relevance=relevance, repeats=repeats,
        )

    def session_repeats(self, state: PageState) -> Tensor:
        """[B, M] how often each item's primary tag or creator appeared in the session window or higher on the page."""
        tag = self.catalog.primary_tag[state.items]
        cre = self.catalog.author_index[state.items]
        rep = (tag.unsqueeze(2) == state.recent_tags.unsqueeze(1)).sum(2) + \
            (cre.unsqueeze(2) == state.recent_creators.unsqueeze(1)).sum(2)
        m = tag.shape[1]
        above = torch.ones(m, m, dtype=torch.bool).tril(-1)
        rep = rep + ((tag.unsqueeze(2) == tag.unsqueeze(1)) & above).sum(2)
        return rep.float()

    # ------------------------------------------------------------ marginals
    def examination(self, click: Tensor) -> Tensor:
        """[B, M] P(item k is examined) under the cascade, from P(click | examined)."""
        lc = self.cfg.lists
        if not lc.cascade_enabled:
            return torch.ones_like(click)
        step = lc.cascade_continue * (1 - lc.cascade_click_stop * click[:, :-1])
        exam = torch.ones_like(click)
        exam[:, 1:] = torch.cumprod(step, dim=1)
        return exam

    def long_view_given_click(self, probs: PageProbs) -> Tensor:
        """[B, M] P(long_view | click): P(duration · exp(μ + σε) ≥ min(duration, 18 s))."""
        sigma = self.cfg.responses.watch_sigma
        need = torch.log(probs.duration_ms.clamp(max=LONG_VIEW_THRESHOLD_MS) / probs.duration_ms)
        return 0.5 * (1 + torch.erf((probs.watch_mu - need) / (sigma * math.sqrt(2))))

    def marginals(self, probs: PageProbs) -> dict[str, Tensor]:
        """Exact marginals per item: the 6 tasks [B, M, 6], P(hate), expected play time (ms)."""
        exam = self.examination(probs.click)
        p_click = exam * probs.click
        p_long = p_click * self.long_view_given_click(probs)
        tasks = p_click.unsqueeze(-1) * probs.tasks
        sigma = self.cfg.responses.watch_sigma
        play_click = probs.duration_ms * torch.exp(probs.watch_mu + sigma ** 2 / 2)
        play_skip = probs.duration_ms.clamp(max=NOCLICK_PLAY_MS) / 2
        expected_play = p_click * play_click + (1 - p_click) * play_skip
        return {
            "tasks": torch.cat([p_click.unsqueeze(-1), p_long.unsqueeze(-1), tasks], dim=-1),
            "hate": exam * probs.hate,
            "play_ms": expected_play,
            "exam": exam,
        }

    # -------------------------------------------------------------- sampling
    def sample(self, probs: PageProbs, g: torch.Generator) -> dict[str, Tensor]:
        """Draw every response of every item, scanning each page top-down (cascade). All outputs [B, M]."""
        b, m = probs.click.shape
        lc = self.cfg.lists
        u = torch.rand(b, m, 8, generator=g)
        click = torch.zeros(b, m, dtype=torch.bool)
        exam = torch.zeros(b, m, dtype=torch.bool)
        looking = torch.ones(b, dtype=torch.bool)
        for k in range(m):
            exam[:, k] = looking
            click[:, k] = looking & (u[:, k, 0] < probs.click[:, k])
            if lc.cascade_enabled:
                go_on = lc.cascade_continue * (1 - lc.cascade_click_stop * click[:, k].float())
                looking = looking & (u[:, k, 1] < go_on)
        sigma = self.cfg.responses.watch_sigma
        normal = torch.randn(b, m, generator=g)
        play_click = probs.duration_ms * torch.exp(probs.watch_mu + sigma * normal)
        play_skip = u[:, :, 2] * probs.duration_ms.clamp(max=NOCLICK_PLAY_MS)
        play = torch.where(click, play_click, play_skip).round()
        tasks = click.unsqueeze(-1) & (u[:, :, 3:7] < probs.tasks)
        hate = exam & (u[:, :, 7] < probs.hate)
        return {"click": click, "exam": exam, "play_ms": play, "like": tasks[..., 0], "follow": tasks[..., 1],
                "comment": tasks[..., 2], "forward": tasks[..., 3], "hate": hate}
