"""Shared-Bottom multi-task ranker: the simplest real multi-task model over ``RequestBatch``.

One MLP tower shared by all tasks over [user fields, candidate fields, pooled history, context], then one small
head per task and a watch-time head. The history is pooled two ways — the mean of the last ``history_pool`` item
embeddings and the mean weighted by their positive feedback — which is how a model without a sequence part sees
the history. Item-id embeddings are shared between candidates and history.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> cfg = SharedBottomConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0)
    >>> model = SharedBottom(cfg)
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch_log1p"].shape   # [B, M, T], [B, M]
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.data.schema import NUM_TABS
from funnelrec.nn import MLP, FieldEmbedding, masked_mean

MAX_POSITIONS = 64


@dataclass
class SharedBottomConfig:
    """Sizes of ``SharedBottom``.

    Args:
        user_vocab: rows of each user sparse field (``FeatureSpec.vocab_sizes("user_sparse")``).
        item_vocab: rows of each item sparse field; field 0 is the item id, shared with the history.
        user_dense: Du.  item_dense: Di.
        num_tasks: T.
        embed_dim: D of every embedding.
        bottom: widths of the shared tower.
        head: hidden width of each task head.
        history_pool: how many of the most recent history events are pooled.
        use_position: feed the display position (position bias); serving uses position 0.
        dropout: dropout in the tower.
    """

    user_vocab: list[int]
    item_vocab: list[int]
    user_dense: int
    item_dense: int
    num_tasks: int = 6
    embed_dim: int = 16
    bottom: list[int] = field(default_factory=lambda: [256, 128])
    head: int = 32
    history_pool: int = 100
    use_position: bool = True
    dropout: float = 0.0


class SharedBottom(nn.Module):
    """Shared-Bottom multi-task model (see the module docstring).

    Args:
        config: a ``SharedBottomConfig``.
    """

    def __init__(self, config: SharedBottomConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.user_emb = FieldEmbedding(c.user_vocab, d)
        self.item_emb = FieldEmbedding(c.item_vocab, d)
        self.tab_emb = nn.Embedding(NUM_TABS, d)
        self.hour_emb = nn.Embedding(24, d)
        self.pos_emb = nn.Embedding(MAX_POSITIONS, d)
        n_fields = len(c.user_vocab) + len(c.item_vocab) + 2 + 2 + (1 if c.use_position else 0)
        in_dim = n_fields * d + c.user_dense + c.item_dense + 1
        self.bottom = MLP(in_dim, c.bottom, dropout=c.dropout)
        self.bottom_act = nn.SiLU()
        self.heads = nn.ModuleList(MLP(c.bottom[-1], [c.head, 1]) for _ in range(c.num_tasks))
        self.watch_head = MLP(c.bottom[-1], [c.head, 1])

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """Returns ``logits`` [B, M, T] and ``watch_log1p`` [B, M] (predicted log(1 + watch seconds))."""
        c = self.config
        b, m = batch.cand_items.shape
        user = self.user_emb(batch.user_sparse).flatten(1)  # [B, Fu*D]
        item = self.item_emb(batch.cand_sparse).flatten(2)  # [B, M, Fi*D]
        hist = batch.truncate_history(c.history_pool)
        hist_vec = self.item_emb.field_table(0)[hist.hist_items]  # [B, N, D]
        mask = hist.history_mask()
        positive = hist.hist_actions[..., : min(3, hist.hist_actions.shape[-1])].sum(-1) if \
            hist.hist_actions.shape[-1] else torch.zeros_like(hist.hist_gap_s)
        pooled = torch.cat([masked_mean(hist_vec, mask), masked_mean(hist_vec, mask, positive)], -1)  # [B, 2D]
        ctx = torch.cat([self.tab_emb(batch.tab.clamp(0, NUM_TABS - 1)), self.hour_emb(batch.hour.clamp(0, 23))], -1)
        per_request = torch.cat([user, pooled, ctx, batch.user_dense], -1)  # [B, ·]
        parts = [per_request.unsqueeze(1).expand(b, m, -1), item, batch.cand_dense,
                 (torch.log1p(batch.duration_s.clamp(min=0)) - 4.0).unsqueeze(-1)]
        if c.use_position:
            parts.append(self.pos_emb(batch.position.clamp(0, MAX_POSITIONS - 1)))
        h = self.bottom_act(self.bottom(torch.cat(parts, -1)))
        logits = torch.cat([head(h) for head in self.heads], -1)
        return {"logits": logits, "watch_log1p": self.watch_head(h).squeeze(-1)}

    def predict(self, batch: RequestBatch) -> Tensor:
        """[B, M, T] task probabilities (the ``Ranker`` protocol)."""
        return torch.sigmoid(self(batch)["logits"])


def multitask_loss(out: dict[str, Tensor], batch: RequestBatch, watch_weight: float = 0.1) -> Tensor:
    """Mean BCE over tasks and real candidates + ``watch_weight`` × MSE on log(1 + watch seconds)."""
    mask = batch.cand_mask.float()
    bce = nn.functional.binary_cross_entropy_with_logits(out["logits"], batch.labels, reduction="none")
    loss = (bce.mean(-1) * mask).sum() / mask.sum().clamp(min=1)
    if batch.watch_time_s is not None and watch_weight > 0:
        err = (out["watch_log1p"] - torch.log1p(batch.watch_time_s)) ** 2
        loss = loss + watch_weight * (err * mask).sum() / mask.sum().clamp(min=1)
    return loss
