"""``RankingInputs``: the one input encoder every ranking baseline uses (same feature spec, same embedding tables).

A fair comparison of rankers needs the same inputs in every model (DESIGN §7), so every baseline builds exactly
this module and differs only in what it does with its output. Per candidate it produces S embedded *field tokens*
``[B, M, S, D]`` and a few dense values ``[B, M, Dd]``:

==========================  =====  =============================================================================
token / value               count  source
==========================  =====  =============================================================================
user sparse fields          Fu     ``user_sparse`` (field 0 = user id), one table per group (``FieldEmbedding``)
candidate sparse fields     Fi     ``cand_sparse`` (field 0 = item id; its rows are shared with the history)
tab, hour                   2      ``tab``, ``hour``
position (optional)         1      ``position`` (``use_position``; serving passes 0 = the top slot)
history                     2      the last ``history_pool`` events' item-id embeddings, pooled (below)
user dense, item dense      Du+Di  ``user_dense``, ``cand_dense`` (values, not tokens)
log duration                1      ``log1p(duration_s) − 4`` (value; the duration D2Q debiases watch time by)
==========================  =====  =============================================================================

History pooling (``history_mode``), the way a model without a sequence part sees the history:

* ``"pool"``: the mean of the event embeddings, and their mean weighted by the event's positive feedback (the sum of
  the first ``positive_actions`` action channels: ``is_click``, ``long_view``, ``is_like``). Same for every candidate.
* ``"target"``: DIN target attention per candidate (``funnelrec.nn.TargetAttention``; the query is the candidate's
  item-id embedding): ``Σ_n a(q, e_n) e_n`` and ``Σ_n a(q, e_n) pos_n e_n``, unnormalised as in DIN unless
  ``attention_normalize="softmax"``.

``features.flat`` = ``[tokens flattened, dense]`` [B, M, F_in] is what MLP-style models read (``out_dim`` = F_in).

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> enc = RankingInputs(user_vocab=[10, 3], item_vocab=[20, 5], user_dense=1, item_dense=2, embed_dim=4)
    >>> f = enc(RequestBatch.empty(2, history=6, candidates=3, user_fields=2, user_dense=1, item_fields=2,
    ...                            item_dense=2))
    >>> f.tokens.shape, f.dense.shape, f.flat.shape     # S = 2 + 2 + 2 + 1 + 2 = 9, Dd = 1 + 2 + 1
    (torch.Size([2, 3, 9, 4]), torch.Size([2, 3, 4]), torch.Size([2, 3, 40]))
    >>> enc.num_tokens, enc.out_dim
    (9, 40)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.data.schema import NUM_TABS
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import FieldEmbedding, TargetAttention, masked_mean

#: Display positions beyond this share the last position embedding.
MAX_POSITIONS = 64
HISTORY_MODES = ("pool", "target")


@dataclass
class RankingFeatures:
    """What ``RankingInputs`` gives a model.

    Args:
        tokens: [B, M, S, D] embedded field tokens (order: see the module docstring).
        dense: [B, M, Dd] dense values.
    """

    tokens: Tensor
    dense: Tensor

    @property
    def flat(self) -> Tensor:
        """[B, M, S·D + Dd] the tokens flattened, then the dense values."""
        return torch.cat([self.tokens.flatten(-2), self.dense], -1)


class RankingInputs(nn.Module):
    """The shared input encoder of every ranker (see the module docstring).

    Args:
        user_vocab: rows of each user sparse field (``FeatureSpec.vocab_sizes("user_sparse")``).
        item_vocab: rows of each item sparse field (field 0 is the item id, shared with the history).
        user_dense: Du.  item_dense: Di.
        embed_dim: D of every embedding.
        history_pool: how many of the most recent history events are read.
        history_mode: ``"pool"`` (mean + positive-weighted mean) or ``"target"`` (DIN target attention).
        use_position: add the display-position token (position bias); serving passes position 0.
        attention_hidden: hidden widths of the activation unit (``"target"`` only).
        attention_normalize: None (DIN: unnormalised) or ``"softmax"`` (``"target"`` only).
        positive_actions: the first this-many history action channels count as positive feedback.
    """

    def __init__(self, user_vocab: Sequence[int], item_vocab: Sequence[int], user_dense: int, item_dense: int,
                 embed_dim: int = 16, history_pool: int = 100, history_mode: str = "pool", use_position: bool = True,
                 attention_hidden: Sequence[int] = (16,), attention_normalize: str | None = None,
                 positive_actions: int = 3):
        super().__init__()
        if history_mode not in HISTORY_MODES:
            raise ConfigError(f"history_mode must be one of {HISTORY_MODES}, got {history_mode!r}")
        if embed_dim < 1 or history_pool < 0 or user_dense < 0 or item_dense < 0 or positive_actions < 0:
            raise ConfigError(f"RankingInputs needs embed_dim >= 1 and non-negative history_pool / dense sizes / "
                              f"positive_actions, got {embed_dim}, {history_pool}, {user_dense}, {item_dense}, "
                              f"{positive_actions}")
        d = embed_dim
        self.embed_dim, self.history_pool, self.history_mode = d, history_pool, history_mode
        self.use_position, self.positive_actions = use_position, positive_actions
        self.user_dense, self.item_dense = user_dense, item_dense
        self.user_emb = FieldEmbedding(list(user_vocab), d)
        self.item_emb = FieldEmbedding(list(item_vocab), d)
        self.tab_emb = nn.Embedding(NUM_TABS, d)
        self.hour_emb = nn.Embedding(24, d)
        self.pos_emb = nn.Embedding(MAX_POSITIONS, d) if use_position else None
        self.attention = (TargetAttention(d, attention_hidden, attention_normalize) if history_mode == "target"
                          else None)

    @classmethod
    def from_config(cls, c) -> "RankingInputs":
        """Build from a ranker config (``funnelrec.ranking.base.RankerConfig``)."""
        return cls(c.user_vocab, c.item_vocab, c.user_dense, c.item_dense, c.embed_dim, c.history_pool,
                   c.history_mode, c.use_position, c.attention_hidden, c.attention_normalize)

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        """S."""
        return self.user_emb.num_fields + self.item_emb.num_fields + 2 + int(self.use_position) + 2

    @property
    def dense_dim(self) -> int:
        """Dd = Du + Di + 1."""
        return self.user_dense + self.item_dense + 1

    @property
    def out_dim(self) -> int:
        """F_in = S·D + Dd, the width of ``features.flat``."""
        return self.num_tokens * self.embed_dim + self.dense_dim

    # ------------------------------------------------------------------ forward
    def history(self, batch: RequestBatch, query: Tensor) -> Tensor:
        """[B, M, 2, D] the two history tokens of every candidate (``query`` [B, M, D]: candidate item ids)."""
        b, m = batch.cand_items.shape
        d = self.embed_dim
        hist = batch.truncate_history(self.history_pool)
        events = self.item_emb.lookup(0, hist.hist_items, column="hist_items")  # [B, N, D]
        mask = hist.history_mask()  # [B, N]
        a = min(self.positive_actions, hist.hist_actions.shape[-1])
        positive = hist.hist_actions[..., :a].sum(-1)  # [B, N]
        if self.attention is None:
            pooled = torch.stack([masked_mean(events, mask), masked_mean(events, mask, positive)], 1)  # [B, 2, D]
            return pooled.unsqueeze(1).expand(b, m, 2, d)
        values = torch.cat([events, events * positive.unsqueeze(-1)], -1)  # [B, N, 2D]
        return self.attention(query, events, mask, values=values).unflatten(-1, (2, d))  # [B, M, 2, D]

    def forward(self, batch: RequestBatch) -> RankingFeatures:
        """Tokens [B, M, S, D] and dense values [B, M, Dd] of every candidate."""
        b, m = batch.cand_items.shape
        d = self.embed_dim
        for name, want in (("user_dense", self.user_dense), ("cand_dense", self.item_dense)):
            if getattr(batch, name).shape[-1] != want:
                raise DataError(f"expected {want} dense features, got {getattr(batch, name).shape[-1]}", column=name)
        user = self.user_emb(batch.user_sparse).unsqueeze(1).expand(b, m, -1, d)  # [B, M, Fu, D]
        item = self.item_emb(batch.cand_sparse)  # [B, M, Fi, D]
        ctx = torch.stack([self.tab_emb(batch.tab.clamp(0, NUM_TABS - 1)),
                           self.hour_emb(batch.hour.clamp(0, 23))], 1).unsqueeze(1).expand(b, m, 2, d)
        parts = [user, item, ctx]
        if self.pos_emb is not None:
            parts.append(self.pos_emb(batch.position.clamp(0, MAX_POSITIONS - 1)).unsqueeze(2))
        parts.append(self.history(batch, item[:, :, 0]))
        dense = torch.cat([batch.user_dense.unsqueeze(1).expand(b, m, -1), batch.cand_dense,
                           (torch.log1p(batch.duration_s.clamp(min=0)) - 4.0).unsqueeze(-1)], -1)
        return RankingFeatures(tokens=torch.cat(parts, 2), dense=dense)
