"""Blocks shared by the list evaluators: feature encoders, the list encoder with a [CLS] token, the head.

Both evaluators (:mod:`funnelrec.rerank.independent`, :mod:`funnelrec.rerank.flash_evaluator`) are made of the
same blocks with the same names, so that a state dict moves between them and their parity can be tested:

* ``items`` (:class:`ItemEncoder`) — one candidate's features → [D]: embeddings of its primary tag, creator
  bucket and duration bucket (:class:`funnelrec.rerank.data.ItemFeatures`) plus a linear map of its T
  predicted probabilities (as logits), its fused score (log) and the fused score standardised over the
  request's pool;
* ``history`` (:class:`HistoryEncoder`) — one logged event → [D]: the same item embeddings plus a linear map
  of its 7 action flags and log time gap;
* ``item_block`` — self-attention among a set of items (Flash: the M pool items; independent: the L items of
  one list), ``history_block`` — cross-attention from items to the user's history (one K/V projection per
  request), ``list_block`` — intra-list self-attention over [CLS] + the L ordered items (+ position
  embeddings), read at [CLS]; each a pre-norm attention + FFN block (:class:`funnelrec.nn.SeqAttentionLayer`);
* ``head`` — MLP([D] → 1), the list score.

The block structure follows the FlashEvaluator paper's description (pool self-attention, cross-attention to
the user's history, intra-list attention with a [CLS] token, cross-list attention); the feature set, widths,
pre-norm RMSNorm blocks and where position embeddings enter (after the item-side blocks, so that an item's
encoding is list-independent) are ours.

Example:
    >>> cfg = EvaluatorConfig(num_tags=5, dim=16, heads=2)
    >>> cfg.validate().dim
    16
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import MLP, SeqAttentionLayer
from funnelrec.rerank.data import RerankPool, check_lists
from funnelrec.rerank.generators import standardized_scores

__all__ = ["EvaluatorConfig", "ItemEncoder", "HistoryEncoder", "ListEncoder", "EvaluatorBase", "LOSSES",
           "attend"]

LOSSES = ("listwise", "pointwise")


@dataclass
class EvaluatorConfig:
    """Settings of a list evaluator.

    Args:
        num_tags: vocabulary of the primary-tag feature (``ItemFeatures.num_tags``).
        creator_buckets: creator hash buckets (``ItemFeatures.creator_buckets``).
        duration_buckets: duration buckets (``ItemFeatures.duration_buckets``).
        num_tasks: T, predicted probabilities per candidate.
        num_actions: A, action flags per history event.
        dim: D.
        heads: attention heads.
        ffn_mult: FFN width = ``ffn_mult · D``.
        max_list_len: the longest list (position embeddings).
        item_attention: self-attention among items (Flash: over the pool; independent: within each list).
        history: cross-attention from the items to the user's history.
        cross_list: cross-list self-attention among the K list embeddings (Flash only).
        dropout: dropout in the blocks.
        loss: ``"listwise"`` (softmax cross-entropy over the K lists) or ``"pointwise"`` (MSE per list).
        seed: seeds the initial weights.
    """

    num_tags: int
    creator_buckets: int = 64
    duration_buckets: int = 8
    num_tasks: int = 7
    num_actions: int = 7
    dim: int = 32
    heads: int = 2
    ffn_mult: int = 2
    max_list_len: int = 16
    item_attention: bool = True
    history: bool = True
    cross_list: bool = True
    dropout: float = 0.0
    loss: str = "listwise"
    seed: int = 0

    def validate(self) -> "EvaluatorConfig":
        """Raise ``ConfigError`` naming the bad field; returns self."""
        ints = {"num_tags": 1, "creator_buckets": 1, "duration_buckets": 1, "num_tasks": 1, "num_actions": 0,
                "dim": 1, "heads": 1, "ffn_mult": 1, "max_list_len": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"evaluator config: {name}={v!r} must be an integer >= {low}")
        if self.dim % self.heads:
            raise ConfigError(f"evaluator config: dim={self.dim} must be divisible by heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"evaluator config: dropout={self.dropout!r} must lie in [0, 1)")
        if self.loss not in LOSSES:
            raise ConfigError(f"evaluator config: loss={self.loss!r}; choose one of {', '.join(LOSSES)}")
        return self

    @classmethod
    def for_features(cls, features, **kwargs) -> "EvaluatorConfig":
        """A config whose vocabularies match an :class:`~funnelrec.rerank.data.ItemFeatures`."""
        return cls(num_tags=features.num_tags, creator_buckets=features.creator_buckets,
                   duration_buckets=features.duration_buckets, **kwargs).validate()


def attend(layer: SeqAttentionLayer, x: Tensor, context: Tensor | None = None,
           key_valid: Tensor | None = None) -> Tensor:
    """Run a pre-norm attention + FFN block with a key-padding mask (or none), not a dense [B, Q, S] mask.

    Args:
        layer: the block (its ``queries`` / ``keys_values`` / ``finish`` steps).
        x: [B, Q, D] queries.
        context: [B, S, D] keys/values (default ``x``: self-attention).
        key_valid: [B, S] bool, True at keys that may be attended to (default: all). A query whose request
            has no valid key gets a zero attention output (as ``funnelrec.nn.masked_attention``).

    Returns:
        [B, Q, D]. The same numbers as ``layer(x, mask, context)`` with ``mask = key_valid[:, None, :]``
        expanded, without building (and converting) the dense mask.

    Example:
        >>> layer = SeqAttentionLayer(8, heads=2)
        >>> x, valid = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [False, True, True, True, True]])
        >>> dense = layer(x, valid.unsqueeze(1).expand(2, 5, 5))
        >>> bool(torch.allclose(attend(layer, x, key_valid=valid), dense, atol=1e-5))
        True
    """
    k, v = layer.keys_values(x if context is None else context)
    q = layer.queries(x)
    p = layer.dropout.p if layer.training else 0.0
    if key_valid is None:
        return layer.finish(x, F.scaled_dot_product_attention(q, k, v, dropout_p=p))
    has = key_valid.any(-1)
    empty = not bool(has.all())
    if empty:
        key_valid = key_valid | ~has.unsqueeze(-1)  # any finite row; zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :], dropout_p=p)
    if empty:
        out = out * has[:, None, None, None].to(out.dtype)
    return layer.finish(x, out)


@contextmanager
def seeded(seed: int):
    """Run a block (module construction) under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _SideEmbedding(nn.Module):
    """Sum of the tag, creator-bucket and duration-bucket embeddings of item indices (index 0 = padding)."""

    def __init__(self, cfg: EvaluatorConfig, table: Tensor):
        super().__init__()
        self.register_buffer("table", table.clone(), persistent=False)
        self.tag = nn.Embedding(cfg.num_tags + 1, cfg.dim, padding_idx=0)
        self.creator = nn.Embedding(cfg.creator_buckets + 1, cfg.dim, padding_idx=0)
        self.duration = nn.Embedding(cfg.duration_buckets + 1, cfg.dim, padding_idx=0)

    def forward(self, items: Tensor) -> Tensor:
        """items [...] int64 → [..., D]."""
        f = self.table[items]
        return self.tag(f[..., 0]) + self.creator(f[..., 1]) + self.duration(f[..., 2])


class ItemEncoder(nn.Module):
    """A candidate's features → [D] (see the module docstring).

    Args:
        cfg: the evaluator config.
        side: the shared side-feature embedding.
    """

    def __init__(self, cfg: EvaluatorConfig, side: _SideEmbedding):
        super().__init__()
        self.side = side
        self.dense = nn.Linear(cfg.num_tasks + 2, cfg.dim)
        self.out = MLP(cfg.dim, [cfg.dim, cfg.dim])
        self.norm = nn.RMSNorm(cfg.dim)

    @staticmethod
    def dense_features(pool: RerankPool) -> Tensor:
        """[B, M, T + 2] logit(pxtr), log1p(fused score), the fused score standardised over the pool."""
        logit = torch.logit(pool.pxtr.float().clamp(1e-4, 1 - 1e-4))
        z = standardized_scores(pool.score.float(), pool.mask).masked_fill(~pool.mask, 0.0)
        log_score = torch.log1p(pool.score.float().clamp(min=0)).unsqueeze(-1)
        return torch.cat([logit, log_score, z.unsqueeze(-1)], -1)

    def forward(self, items: Tensor, dense: Tensor) -> Tensor:
        """items [...] int64, dense [..., T + 2] → [..., D]."""
        x = self.side(items) + self.dense(dense)
        return self.norm(x + self.out(x))


class HistoryEncoder(nn.Module):
    """A logged event → [D]: the item's side embedding + a linear map of [actions, log1p(gap hours)]."""

    def __init__(self, cfg: EvaluatorConfig, side: _SideEmbedding):
        super().__init__()
        self.side = side
        self.dense = nn.Linear(cfg.num_actions + 1, cfg.dim)
        self.norm = nn.RMSNorm(cfg.dim)

    def forward(self, batch: RequestBatch) -> tuple[Tensor, Tensor]:
        """→ events [B, N, D] and validity [B, N] (left-padded history of ``batch``)."""
        valid = batch.history_mask()
        gap = torch.log1p(batch.hist_gap_s.float() / 3600.0).unsqueeze(-1)
        x = self.side(batch.hist_items) + self.dense(torch.cat([batch.hist_actions.float(), gap], -1))
        return self.norm(x) * valid.unsqueeze(-1), valid


class ListEncoder(nn.Module):
    """Ordered item encodings of K lists → one embedding per list: position embeddings, a [CLS] token, one
    intra-list self-attention block, read at [CLS] (computed for the [CLS] query only: the other rows of a
    single block are never read).

    Args:
        cfg: the evaluator config.
    """

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.position = nn.Embedding(cfg.max_list_len, cfg.dim)
        self.cls = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.block = SeqAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout)
        self.max_len = cfg.max_list_len

    def forward(self, x: Tensor) -> Tensor:
        """x [B, K, L, D] item encodings in list order → [B, K, D]."""
        b, k, length, d = x.shape
        if length > self.max_len:
            raise DataError(f"list length {length} exceeds max_list_len={self.max_len}", column="lists")
        x = x + self.position.weight[:length]
        cls = self.cls.expand(b * k, 1, d)
        tokens = torch.cat([cls, x.reshape(b * k, length, d)], 1)
        # One block read at [CLS]: only the [CLS] row of the self-attention is needed, so [CLS] is the only
        # query (the same numbers as running every row and keeping row 0).
        return attend(self.block, cls, context=tokens)[:, 0].view(b, k, d)


class EvaluatorBase(nn.Module):
    """What both evaluators share: the blocks of the module docstring and input checks.

    Subclasses implement ``forward(batch, pool, lists, list_mask=None) -> scores [B, K]``.
    """

    def __init__(self, cfg: EvaluatorConfig, table: Tensor):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        with seeded(cfg.seed):  # initial weights from the config's seed; the global RNG is left alone
            side = _SideEmbedding(cfg, table)
            self.items = ItemEncoder(cfg, side)
            self.history = HistoryEncoder(cfg, side)
            self.item_block = SeqAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout)
            self.history_block = SeqAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout)
            self.lists = ListEncoder(cfg)
            self.head = MLP(cfg.dim, [cfg.dim, 1])

    def _check(self, batch: RequestBatch, pool: RerankPool, lists: Tensor,
               list_mask: Tensor | None) -> Tensor:
        """Validate the inputs; returns the list mask ([B, K] bool, all True by default)."""
        pool.validate()
        check_lists(lists, pool)
        b, k, _ = lists.shape
        if batch.batch_size != b:
            raise DataError(f"batch holds {batch.batch_size} requests, the lists {b}", column="batch")
        if pool.pxtr.shape[-1] != self.cfg.num_tasks:
            raise DataError(f"expected {self.cfg.num_tasks} predicted tasks, got {pool.pxtr.shape[-1]}",
                            column="pool.pxtr")
        if batch.hist_actions.shape[-1] != self.cfg.num_actions:
            raise DataError(f"expected {self.cfg.num_actions} action channels, got "
                            f"{batch.hist_actions.shape[-1]}", column="hist_actions")
        if list_mask is None:
            return torch.ones(b, k, dtype=torch.bool, device=lists.device)
        if list_mask.shape != (b, k) or list_mask.dtype != torch.bool or not bool(list_mask.any(1).all()):
            raise DataError(f"expected bool [{b}, {k}] with at least one real list per request",
                            column="list_mask")
        return list_mask

    def _attend_history(self, x: Tensor, batch: RequestBatch) -> Tensor:
        """x [B, Q, D] items → items after cross-attention to the history (K/V projected once per request)."""
        if not self.cfg.history:
            return x
        h, valid = self.history(batch)
        return attend(self.history_block, x, context=h, key_valid=valid)

    def score_lists(self, list_items: Tensor, list_mask: Tensor) -> Tensor:
        """[B, K, L, D] ordered item encodings → [B, K] scores (no cross-list interaction)."""
        return self.head(self.lists(list_items)).squeeze(-1)
