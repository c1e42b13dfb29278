"""DCNv2: an explicit cross network beside (or below) a deep MLP (Wang et al., WWW'21).

``RankingInputs`` flat features x0 [B, M, F_in] → ``cross_layers`` cross layers
``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l`` (low rank ``W_l = U_l V_l^T`` by default, as F_in is a few hundred) →
``structure="stacked"``: the deep MLP on the cross output; ``"parallel"``: the cross output and the deep MLP of x0
side by side → T task heads + the watch head. The cross layers give bounded-degree feature crosses
(user field × item field × context) that an MLP only approximates.

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = DCNv2(DCNv2Config(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import MLP, CrossNetwork
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads, check_widths
from funnelrec.ranking.watch_time import WatchTimeDebiaser

STRUCTURES = ("stacked", "parallel")


@dataclass
class DCNv2Config(RankerConfig):
    """Sizes of ``DCNv2`` (the common fields are documented on ``RankerConfig``).

    Args:
        cross_layers: L cross layers.
        low_rank: R of the low-rank cross layers; None for full-rank (F_in² weights per layer).
        deep: widths of the deep MLP.
        structure: ``"stacked"`` (cross → deep) or ``"parallel"`` (cross ‖ deep).
    """

    cross_layers: int = 2
    low_rank: int | None = 32
    deep: list[int] = field(default_factory=lambda: [160, 64])
    structure: str = "stacked"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cross_layers, int) or self.cross_layers < 1:
            raise ConfigError(f"DCNv2Config.cross_layers must be an int >= 1, got {self.cross_layers!r}")
        if self.low_rank is not None and (not isinstance(self.low_rank, int) or self.low_rank < 1):
            raise ConfigError(f"DCNv2Config.low_rank must be None or an int >= 1, got {self.low_rank!r}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"DCNv2Config.structure must be one of {STRUCTURES}, got {self.structure!r}")
        check_widths("DCNv2Config.deep", self.deep)


class DCNv2(MultiTaskRanker):
    """Deep & Cross Network v2, multi-task (see the module docstring).

    Args:
        config: a ``DCNv2Config``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: DCNv2Config, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        f_in = self.inputs.out_dim
        self.cross = CrossNetwork(f_in, c.cross_layers, c.low_rank)
        self.deep = nn.Sequential(MLP(f_in, c.deep, dropout=c.dropout), nn.SiLU())
        head_in = c.deep[-1] if c.structure == "stacked" else f_in + c.deep[-1]
        self.heads = TaskHeads(head_in, c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x0 = self.features(batch).flat  # [B, M, F_in]
        if self.config.structure == "stacked":
            h = self.deep(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], -1)
        return self.split_heads(self.heads(h))
