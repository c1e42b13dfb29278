"""MMoE: a multi-gate mixture of experts over the shared inputs (Ma et al., KDD'18).

``RankingInputs`` → E expert MLPs, all reading the same input → T + 1 softmax gates (one per task and one for the
watch head), each mixing the E expert outputs → one tower per gate. Tasks share experts but choose their own
mixture, which softens the seesaw between weakly related tasks (click vs. follow) that a shared bottom suffers.

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = MMoE(MMoEConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import MMoELayer
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads, check_widths
from funnelrec.ranking.watch_time import WatchTimeDebiaser


@dataclass
class MMoEConfig(RankerConfig):
    """Sizes of ``MMoE`` (the common fields are documented on ``RankerConfig``).

    Args:
        num_experts: E.
        expert_dims: widths of each expert MLP (output width H = ``expert_dims[-1]``).
    """

    num_experts: int = 4
    expert_dims: list[int] = field(default_factory=lambda: [64, 64])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"MMoEConfig.num_experts must be an int >= 1, got {self.num_experts!r}")
        check_widths("MMoEConfig.expert_dims", self.expert_dims)


class MMoE(MultiTaskRanker):
    """Multi-gate mixture-of-experts multi-task model (see the module docstring).

    Args:
        config: an ``MMoEConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: MMoEConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        self.mmoe = MMoELayer(self.inputs.out_dim, c.num_experts, c.expert_dims, num_gates=self.num_heads)
        self.heads = TaskHeads(self.mmoe.out_dim, c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x = self.features(batch).flat  # [B, M, F_in]
        h = self.mmoe(x)  # [B, M, T + 1, H]: one expert mixture per task and for the watch head
        return self.split_heads(self.heads(h, grouped=True))
