"""PLE: progressive layered extraction with task-specific and shared experts (Tang et al., RecSys'20).

``RankingInputs`` → ``num_levels`` extraction layers (CGC blocks). Each task (the T tasks and the watch head) owns
``task_experts`` experts, and ``shared_experts`` experts are common. In every level, task t's gate mixes its own
experts and the shared ones; below the last level a shared gate mixes all experts into the shared representation
that the next level's shared experts read, while task t's next experts read task t's mixture. The last level's
mixtures feed one tower per task. Task-owned experts keep what one task needs from being overwritten by another
(the seesaw MMoE still shows between sparse tasks like follow and dense ones like click).

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = PLE(PLEConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0, num_levels=2))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import ExtractionLayer
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads, check_widths
from funnelrec.ranking.watch_time import WatchTimeDebiaser


@dataclass
class PLEConfig(RankerConfig):
    """Sizes of ``PLE`` (the common fields are documented on ``RankerConfig``).

    Args:
        num_levels: extraction layers (1 = CGC).
        task_experts: experts owned by each task (and by the watch head).
        shared_experts: experts shared by all tasks.
        expert_dims: widths of each expert MLP (output width H = ``expert_dims[-1]``), the same at every level.
    """

    num_levels: int = 2
    task_experts: int = 1
    shared_experts: int = 2
    expert_dims: list[int] = field(default_factory=lambda: [32])

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, low in (("num_levels", 1), ("task_experts", 0), ("shared_experts", 0)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise ConfigError(f"PLEConfig.{key} must be an int >= {low}, got {getattr(self, key)!r}")
        if self.task_experts + self.shared_experts < 1:
            raise ConfigError("PLEConfig needs task_experts + shared_experts >= 1")
        check_widths("PLEConfig.expert_dims", self.expert_dims)


class PLE(MultiTaskRanker):
    """Progressive-layered-extraction multi-task model (see the module docstring).

    Args:
        config: a ``PLEConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: PLEConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        widths = [self.inputs.out_dim] + [c.expert_dims[-1]] * (c.num_levels - 1)
        self.levels = nn.ModuleList(
            ExtractionLayer(w, self.num_heads, c.task_experts, c.shared_experts, c.expert_dims,
                            shared_out=level < c.num_levels - 1)
            for level, w in enumerate(widths))
        self.heads = TaskHeads(c.expert_dims[-1], c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        h = self.features(batch).flat  # [B, M, F_in]: the first level's experts and gates all read it
        for level, layer in enumerate(self.levels):
            h = layer(h, grouped=level > 0)  # [B, M, T + 2, H] (T + 1 task slots + shared), last level [B, M, T + 1, H]
        return self.split_heads(self.heads(h, grouped=True))
