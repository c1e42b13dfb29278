"""DIN: target attention over the history for every candidate, then an MLP tower (Zhou et al., KDD'18).

``RankingInputs`` with ``history_mode="target"``: for every candidate, DIN's activation unit scores each of the last
``history_pool`` history events against the candidate's item-id embedding (an MLP over ``[q, k, q − k, q ⊙ k]``),
and the history tokens are the score-weighted sums of the event embeddings (all events, and the events weighted by
their positive feedback), unnormalised as in the paper (``attention_normalize="softmax"`` normalises). The same
history then looks different to every candidate, which mean pooling cannot do. → an MLP tower → T task heads + the
watch head. Every other baseline sees the history through mean pooling (``history_mode="pool"``); the attention is
the one thing DIN adds.

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = DIN(DINConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import MLP
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads, check_widths
from funnelrec.ranking.watch_time import WatchTimeDebiaser


@dataclass
class DINConfig(RankerConfig):
    """Sizes of ``DIN`` (the common fields are documented on ``RankerConfig``; ``history_mode`` is ``"target"``).

    Args:
        tower: widths of the MLP over the features (with the attended history).
    """

    history_mode: str = "target"
    tower: list[int] = field(default_factory=lambda: [224, 128])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history_mode != "target":
            raise ConfigError("DINConfig.history_mode must be 'target' (target attention is what DIN is); for "
                              "mean pooling use the 'shared_bottom' ranker")
        check_widths("DINConfig.tower", self.tower)


class DIN(MultiTaskRanker):
    """Deep Interest Network, multi-task (see the module docstring).

    Args:
        config: a ``DINConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: DINConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        self.tower = nn.Sequential(MLP(self.inputs.out_dim, c.tower, dropout=c.dropout), nn.SiLU())
        self.heads = TaskHeads(c.tower[-1], c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x = self.features(batch).flat  # [B, M, F_in]; the history tokens are attended per candidate
        h = self.tower(x)
        return self.split_heads(self.heads(h))
