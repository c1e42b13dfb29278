"""Shared-Bottom multi-task ranker: one MLP tower shared by every task, then a small head per task.

``RankingInputs`` (the shared encoder: user / candidate / context fields, the pooled history, dense values) →
the shared bottom MLP → T task heads + the watch head. The simplest real multi-task model, and the reference the
other baselines (MMoE, PLE, DIN, DCNv2) are compared with at the same size.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> cfg = SharedBottomConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0)
    >>> model = SharedBottom(cfg)
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape   # [B, M, T], [B, M]
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.nn import MLP
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads, check_widths
from funnelrec.ranking.losses import multitask_loss  # noqa: F401  (re-exported for older imports)
from funnelrec.ranking.watch_time import WatchTimeDebiaser


@dataclass
class SharedBottomConfig(RankerConfig):
    """Sizes of ``SharedBottom`` (the common fields are documented on ``RankerConfig``).

    Args:
        bottom: widths of the shared tower.
    """

    bottom: list[int] = field(default_factory=lambda: [256, 128])

    def __post_init__(self) -> None:
        super().__post_init__()
        check_widths("SharedBottomConfig.bottom", self.bottom)


class SharedBottom(MultiTaskRanker):
    """Shared-Bottom multi-task model (see the module docstring).

    Args:
        config: a ``SharedBottomConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: SharedBottomConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        self.bottom = nn.Sequential(MLP(self.inputs.out_dim, c.bottom, dropout=c.dropout), nn.SiLU())
        self.heads = TaskHeads(c.bottom[-1], c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x = self.features(batch).flat  # [B, M, F_in]
        h = self.bottom(x)  # [B, M, H]
        return self.split_heads(self.heads(h))
