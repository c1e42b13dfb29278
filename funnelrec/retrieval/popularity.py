"""The popularity retriever: the same most-popular items for every user, minus what the user has already seen.

The floor every learned retriever must clear (``m_pop`` of "gap closed"): it knows nothing about the user, so its
distance to a learned model is the personal signal the model found. Popularity = the number of *training*
positives of each item (``RetrievalData.item_popularity()``), so valid/test targets never count.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = PopularityRetriever(PopularityConfig(), item_popularity=torch.tensor([0.0, 5, 1, 9]))
    >>> items, scores = model.retrieve(RequestBatch.empty(2, 3, 1), k=2)
    >>> items.tolist()
    [[3, 1], [3, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval.base import Retriever

__all__ = ["PopularityConfig", "PopularityRetriever"]


@dataclass
class PopularityConfig:
    """Popularity retriever.

    Args:
        log_scale: score ``log1p(count)`` instead of ``count`` (the same ranking; friendlier scores to fuse).
    """

    log_scale: bool = True


class PopularityRetriever(Retriever):
    """Scores every item by its training popularity (the same for every request).

    Args:
        config: :class:`PopularityConfig`.
        item_popularity: [I] float training-positive counts per item index (index 0 = padding).
    """

    train_mode = "example"

    def __init__(self, config: PopularityConfig, item_popularity: Tensor):
        super().__init__()
        if item_popularity is None:
            raise ConfigError("the popularity retriever needs item_popularity ([I] training-positive counts, "
                              "RetrievalData.item_popularity())")
        pop = torch.as_tensor(item_popularity, dtype=torch.float32)
        if pop.dim() != 1 or pop.numel() < 2:
            raise DataError(f"item_popularity must be [I] with I >= 2, got shape {list(pop.shape)}",
                            column="item_popularity")
        self.config = config
        score = pop.clamp(min=0).log1p() if config.log_scale else pop.clone()
        score[0] = float("-inf")
        self.register_buffer("item_score", score)

    def training_loss(self, batch: RequestBatch) -> Tensor:
        """Nothing to learn: a constant 0 (``trainable`` is False, trainers skip the model)."""
        return torch.zeros((), device=self.item_score.device)

    def score_all(self, batch: RequestBatch) -> Tensor:
        """[B, I] the popularity scores, the same row for every request; ``-inf`` at index 0."""
        return self.item_score.unsqueeze(0).expand(batch.batch_size, -1).clone()
