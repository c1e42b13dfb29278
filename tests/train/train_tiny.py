"""A tiny fixed request dataset and a tiny Shared-Bottom ranker for the trainer tests (and the torchrun worker).

Requests have 1–5 real candidates (so a rank's share of a global batch is not proportional to its requests and the
DDP loss weighting is exercised), random features within small vocabularies and Bernoulli labels.
"""

from __future__ import annotations

import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig, multitask_loss

USER_VOCAB = [20, 5]
ITEM_VOCAB = [30, 4]
USER_DENSE, ITEM_DENSE, HIST, MAX_M, TASKS = 2, 3, 6, 5, 6


class TinyRequests:
    """``q`` synthetic requests; ``batch(indices)`` like ``RequestDataset.batch``."""

    def __init__(self, q: int = 42, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        b = RequestBatch.empty(q, HIST, MAX_M, TASKS, user_fields=2, user_dense=USER_DENSE, item_fields=2,
                               item_dense=ITEM_DENSE)
        counts = torch.randint(1, MAX_M + 1, (q,), generator=g)
        b.cand_mask = torch.arange(MAX_M).unsqueeze(0) < counts.unsqueeze(1)
        b.user_id = torch.arange(q, dtype=torch.int64) % 7
        b.user_sparse = torch.stack([torch.randint(1, v, (q,), generator=g) for v in USER_VOCAB], -1)
        b.user_dense = torch.randn(q, USER_DENSE, generator=g)
        b.cand_sparse = torch.stack([torch.randint(1, v, (q, MAX_M), generator=g) for v in ITEM_VOCAB], -1)
        b.cand_items = b.cand_sparse[..., 0].clone()
        b.cand_dense = torch.randn(q, MAX_M, ITEM_DENSE, generator=g)
        b.hist_len = torch.randint(0, HIST + 1, (q,), generator=g)
        hmask = torch.arange(HIST).unsqueeze(0) >= (HIST - b.hist_len).unsqueeze(1)
        b.hist_items = torch.where(hmask, torch.randint(1, ITEM_VOCAB[0], (q, HIST), generator=g), 0)
        b.hist_actions = (torch.rand(q, HIST, 7, generator=g) < 0.3).float() * hmask.unsqueeze(-1)
        b.hist_gap_s = torch.rand(q, HIST, generator=g) * 1000 * hmask
        b.tab = torch.randint(0, 3, (q,), generator=g)
        b.hour = torch.randint(0, 24, (q,), generator=g)
        b.position = torch.arange(MAX_M).expand(q, MAX_M).clone()
        b.duration_s = torch.rand(q, MAX_M, generator=g) * 60 + 5
        b.labels = (torch.rand(q, MAX_M, TASKS, generator=g) < 0.3).float() * b.cand_mask.unsqueeze(-1)
        b.watch_time_s = torch.rand(q, MAX_M, generator=g) * 30 * b.cand_mask
        b.is_rand = torch.zeros(q, MAX_M, dtype=torch.bool)
        self.full = b.validate()
        self.tasks = tuple(f"task{i}" for i in range(TASKS))

    def __len__(self) -> int:
        return self.full.batch_size

    def batch(self, indices) -> RequestBatch:
        return self.full.select(torch.as_tensor(indices, dtype=torch.int64))


class TinyRanker(SharedBottom):
    """``SharedBottom`` with the trainer's ``training_loss`` (its own where it has one, else the multi-task
    loss)."""

    if not hasattr(SharedBottom, "training_loss"):
        def training_loss(self, batch: RequestBatch) -> torch.Tensor:
            return multitask_loss(self(batch), batch)


def tiny_model(seed: int = 0, dropout: float = 0.0) -> TinyRanker:
    torch.manual_seed(seed)
    return TinyRanker(SharedBottomConfig(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=USER_DENSE,
                                         item_dense=ITEM_DENSE, embed_dim=8, bottom=[32, 16], head=8,
                                         history_pool=HIST, dropout=dropout))


def full_loss(model: torch.nn.Module, data: TinyRequests) -> float:
    """The training loss over every request (a deterministic 'validation' metric)."""
    with torch.no_grad():
        return float(model.training_loss(data.batch(range(len(data)))))
