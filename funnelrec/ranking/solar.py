"""SOLAR ranker: every candidate of a request attends to the user's lifelong history (thousands of events, no top-k
filtering) through SVD attention, then an MLP tower (Zhang et al., *SOLAR: SVD-Optimized Lifelong Attention for
Recommendation*, arXiv 2603.02561; notes in ``../shared/papers/solar.md``).

Pipeline, per request::

    lifelong history (the last ``history_pool`` events, trimmed to the longest real history of the batch)
        → event tokens X [B, N, dim] = Linear([item-id emb; action flags; gap-bucket emb]) + recency emb
    candidates → queries [B, M, dim] = Linear(candidate fields, display position, item dense, log duration)
    target attention of the M queries over X (``funnelrec.nn.SVDTargetAttention``, mode ``attention``)
        → [B, M, dim]
    [shared RankingInputs features (the last ``short_pool`` events mean-pooled, as every baseline sees them);
     attention output; query ⊙ output] → MLP tower → T task heads + the watch head

``attention`` selects the sequence operator, which is what the benchmark rows compare on the same backbone:
``"svd_compact"`` (SOLAR as we reconstruct it: softmax over R interest tokens of the history, O((N+M)·dim·R)),
``"svd_exact"`` (attention over the rank-R truncation of the history, streamed over N), ``"full"`` (softmax target
attention over every event: the reference SOLAR approximates; with ``history_pool=512`` the "truncated history"
baseline), ``"linear"`` (ELU+1 linear attention) and ``"sim"`` (SIM-style: top-k events per candidate, then softmax).
Which to use: in ``bench ranking`` (2,048-event histories, R = 16) ``svd_exact`` is the accurate one (it wins the
mode selection on valid and beats truncated, SIM-style and DIN attention) and ``svd_compact`` the fast one (~20× SDPA in
``bench svd-attention``, but below all three on AUC); see ``docs/ranking.md``. The event tokens and the per-user
decomposition are candidate-independent, so at serving the decomposition is cached
per user (``SVDTargetAttention.decompose`` / ``HistorySVD.append``) and each request costs O(M·R·dim) with
``svd_compact``, O(M·N·R) with ``svd_exact`` (whose cache keeps the history).

What is the paper's and what is ours: the paper states softmax is kept, the history is compressed to r principal
"interests" in O(N·d·r), candidates are scored against them, histories of ~10k events and thousands of candidates are
served without filtering. The attention formulas are our reconstruction (``funnelrec.nn.svd_attention``); the event
tokenizer (LONGER's ``SequenceTokens``), the candidate query, the MLP tower over [features; output; query ⊙ output]
and the short-term pooled features beside the lifelong attention are ours. The paper's set-wise scoring of a whole
candidate set is represented only by attending all M candidates of a request at once (each candidate's score does
not depend on the other candidates here).

``history_spectrum(batch)`` gives the singular values of each request's learned event tokens X (the matrix SOLAR
decomposes), from which ``energy_ranks`` reads R90/R95/R99 — the check of SOLAR's low-rank premise.

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = Solar(SolarConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0, dim=8, rank=4,
    ...                           history_pool=32, tower=[16]))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.nn import MLP
from funnelrec.nn.svd_attention import MODES, HistorySVD, SVDTargetAttention
from funnelrec.ranking.base import MultiTaskRanker, TaskHeads, check_widths
from funnelrec.ranking.inputs import RankingInputs
from funnelrec.ranking.longer import GlobalTokens, SequenceModelConfig, SequenceTokens, check_int, history_events
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from funnelrec.errors import ConfigError

#: the energy fractions whose ranks ``energy_ranks`` reports by default
ENERGY_FRACTIONS = (0.90, 0.95, 0.99)


@dataclass
class SolarConfig(SequenceModelConfig):
    """Sizes and switches of ``Solar`` (common fields on ``SequenceModelConfig`` / ``RankerConfig``).

    Args:
        history_pool: L, the most recent events attended (the lifelong history; 8192 covers every history of
            ``sim:long``).
        short_pool: events mean-pooled by the shared ``RankingInputs`` (the short-term view every baseline has).
        attention: the sequence operator, one of ``funnelrec.nn.svd_attention.MODES``.
        rank: R of the decomposition (``svd_compact`` / ``svd_exact``; R ≤ dim).
        topk: k events per candidate of ``sim``.
        chunk: events per streamed step of ``svd_exact`` and ``sim``.
        recency_buckets: rows of the recency-position table (older events share the last row; the gap bucket
            carries their age).
        tower: widths of the MLP over [features; attention output; query ⊙ output].
    """

    history_pool: int = 8192
    short_pool: int = 100
    attention: str = "svd_compact"
    rank: int = 16
    topk: int = 100
    chunk: int = 1024
    recency_buckets: int = 256
    tower: list[int] = field(default_factory=lambda: [224, 128])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention not in MODES:
            raise ConfigError(f"SolarConfig.attention must be one of {MODES}, got {self.attention!r}")
        for key in ("short_pool", "rank", "topk", "chunk", "recency_buckets"):
            check_int(f"SolarConfig.{key}", getattr(self, key), 1)
        if self.rank > self.dim:
            raise ConfigError(f"SolarConfig.rank must be <= dim, got rank={self.rank} dim={self.dim}")
        check_widths("SolarConfig.tower", self.tower)


def energy_ranks(singular_values: Tensor, fractions: Sequence[float] = ENERGY_FRACTIONS) -> Tensor:
    """For each row of singular values [B, D] (descending), the smallest r whose top-r energy Σ s_k² reaches each
    fraction of the total: [B, len(fractions)] (int64; 0 for an all-zero row).

    Example:
        >>> energy_ranks(torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), (0.9, 0.99)).tolist()
        [[1, 2], [3, 3]]
    """
    e = singular_values.double().pow(2)
    total = e.sum(-1, keepdim=True)
    share = e.cumsum(-1) / total.clamp_min(1e-300)  # [B, D]
    want = torch.tensor(list(fractions), dtype=share.dtype, device=share.device)
    # the tolerance keeps exact ties (e.g. a flat spectrum reaching 0.99 only at the last value) on the right side
    r = (share.unsqueeze(-2) < want.view(-1, 1) - 1e-12).sum(-1) + 1  # [B, F]
    return torch.where(total > 0, r, torch.zeros_like(r))


class Solar(MultiTaskRanker):
    """Lifelong target attention through SVD attention + an MLP tower (see the module docstring).

    Args:
        config: a ``SolarConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: SolarConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        # the shared features pool only the short-term events; the lifelong history is the attention's
        self.inputs = RankingInputs.from_config(replace(c, history_pool=c.short_pool))
        self.seq_tokens = SequenceTokens(c.embed_dim, c.num_actions, c.dim, c.recency_buckets, c.gap_buckets)
        self.query = nn.Linear(self._item_width(), c.dim)
        self.attention = SVDTargetAttention(c.dim, c.heads, mode=c.attention, rank=c.rank, chunk=c.chunk,
                                            topk=c.topk, train_gram_dtype=torch.float32)
        self.out_norm = nn.RMSNorm(c.dim)
        self.tower = nn.Sequential(MLP(self.inputs.out_dim + 2 * c.dim, c.tower, dropout=c.dropout), nn.SiLU())
        self.heads = TaskHeads(c.tower[-1], c.head, self.num_heads)

    def _item_width(self) -> int:
        """Width of ``GlobalTokens.item_vector``."""
        i = self.inputs
        return i.item_emb.num_fields * i.embed_dim + (i.embed_dim if i.pos_emb is not None else 0) + i.item_dense + 1

    def history_tokens(self, batch: RequestBatch) -> tuple[Tensor, Tensor]:
        """The learned event tokens X [B, N, dim] of the last ``history_pool`` events (N trimmed to the longest real
        history of the batch, at least 1) and their validity [B, N]."""
        c = self.config
        n = max(1, min(c.history_pool, int(batch.hist_len.max()) if batch.hist_len.numel() else 1))
        hist, items, valid = history_events(self.inputs, batch, n, c.num_actions)
        return self.seq_tokens(items, hist.hist_actions, hist.hist_gap_s, valid), valid

    def candidate_queries(self, batch: RequestBatch) -> Tensor:
        """[B, M, dim] the query of every candidate."""
        return self.query(GlobalTokens.item_vector(self.inputs, batch))

    def _score(self, batch: RequestBatch, attend) -> dict[str, Tensor]:
        q = self.candidate_queries(batch)
        a = self.out_norm(attend(q))  # [B, M, dim]
        h = self.tower(torch.cat([self.features(batch).flat, a, q * a], -1))
        return self.split_heads(self.heads(h))

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x, valid = self.history_tokens(batch)
        return self._score(batch, lambda q: self.attention(q, x, valid))

    @torch.no_grad()
    def encode_user(self, batch: RequestBatch) -> HistorySVD:
        """Serving: the per-user decomposition of the event tokens (``svd_compact`` keeps only the D×D Gram and the
        R factors; the other modes keep the tokens too). Grow it with ``cache.append(tokens)`` as events arrive."""
        x, valid = self.history_tokens(batch)
        return self.attention.decompose(x, valid, keep_history=self.config.attention != "svd_compact")

    @torch.no_grad()
    def score_with_cache(self, cache: HistorySVD, batch: RequestBatch) -> dict[str, Tensor]:
        """Serving: ``forward``'s outputs from a cached ``encode_user`` (the history is not read again for
        ``svd_compact``: O(M·R·dim) attention per request)."""
        return self._score(batch, lambda q: self.attention(q, cache=cache))

    @torch.no_grad()
    def history_spectrum(self, batch: RequestBatch, centered: bool = False) -> tuple[Tensor, Tensor]:
        """Singular values [B, dim] (descending) of each request's event-token matrix X (valid rows only) and the
        number of valid events [B]. ``centered``: of X minus its mean event (the mean direction — biases, the
        shared position/gap part — dominates the raw spectrum; SOLAR decomposes the raw X)."""
        x, valid = self.history_tokens(batch)
        w = valid.unsqueeze(-1).to(x.dtype)
        xm = (x * w).double()
        if centered:
            mean = xm.sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1).double()
            xm = (xm - mean) * w.double()
        gram = xm.transpose(-1, -2) @ xm
        s = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
        return s, valid.sum(-1)


__all__ = ["ENERGY_FRACTIONS", "Solar", "SolarConfig", "energy_ranks"]
