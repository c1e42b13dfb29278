"""Two-tower retrieval (YouTube DNN / Yi et al. 2019): a user tower and an item tower meet in a dot product.

* **User tower**: the user's sparse fields (embedded) and dense features, concatenated with the mean of the
  embedded sparse fields of the items in the user's (positive) history → MLP → D, L2-normalised.
* **Item tower**: the item's sparse fields (embedded) and dense features → MLP → D, L2-normalised. The item
  embedding table is shared with the history pooling of the user tower.
* **Score**: cosine similarity; training logits are cosine / ``temperature``.

Training is a softmax over candidates with **logQ correction** (``funnelrec.retrieval.base.softmax_loss_logq``),
chosen by ``negatives``:

* ``"in_batch"``: the other positives of the batch are the negatives; correction ``log q_j`` with ``q`` the
  training-positive frequency of item j (the rate it shows up in a batch);
* ``"sampled"``: ``num_sampled`` negatives per batch drawn from ``q_s ∝ (count + 1)^sample_alpha`` (shared by
  every row), correction ``log q_s``;
* ``"mixed"`` (mixed negative sampling, Yang et al. 2020): both sets in one softmax, each candidate corrected by
  the distribution it came from (the positive by the in-batch one).

``score_all`` runs the item tower over every item of the corpus in one batched pass ([I, D]) and returns the
user-item cosines [B, I] (``-inf`` at padding index 0).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> cfg = TwoTowerConfig(user_vocab=[10], item_vocab=[6, 3], num_items=6, out_dim=8, hidden=(16,))
    >>> model = TwoTowerRetriever(cfg, item_sparse=torch.tensor([[0, 0], [1, 1], [2, 2], [3, 1], [4, 2], [5, 1]]))
    >>> b = RequestBatch.empty(4, history=3, candidates=1, item_fields=2)
    >>> b.cand_items[:, 0] = torch.tensor([1, 2, 3, 4]); b.cand_sparse[:, 0] = model.item_sparse[b.cand_items[:, 0]]
    >>> model.training_loss(b).shape, model.score_all(b).shape
    (torch.Size([]), torch.Size([4, 6]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.embedding import MLP, FieldEmbedding, masked_mean
from funnelrec.retrieval.base import NEG_INF, Retriever, log_sampling_probability, softmax_loss_logq

__all__ = ["TwoTowerConfig", "TwoTowerRetriever", "NEGATIVES"]

NEGATIVES = ("in_batch", "sampled", "mixed")


@dataclass
class TwoTowerConfig:
    """Two-tower retriever.

    Args:
        user_vocab: rows of each user sparse field (``spec.vocab_sizes("user_sparse")``).
        item_vocab: rows of each item sparse field (field 0 = the item id).
        num_items: I, item indices including padding 0 (``spec.num_items``).
        user_dense: Du.
        item_dense: Di.
        embed_dim: width of every sparse-field embedding.
        hidden: hidden widths of both tower MLPs.
        out_dim: D, the width of the user and item vectors.
        temperature: τ of the training softmax (logits = cosine / τ).
        negatives: ``"in_batch"``, ``"sampled"`` or ``"mixed"`` (see the module doc).
        num_sampled: sampled negatives per batch (``"sampled"`` / ``"mixed"``).
        sample_alpha: exponent of the popularity sampling distribution (1 = popularity, 0 = uniform).
        logq: apply the logQ correction (switch it off for the ablation).
        history_pool: add the mean-pooled history item embeddings to the user tower.
        dropout: dropout in the tower MLPs.
    """

    user_vocab: list[int]
    item_vocab: list[int]
    num_items: int
    user_dense: int = 0
    item_dense: int = 0
    embed_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 32
    temperature: float = 0.05
    negatives: str = "mixed"
    num_sampled: int = 512
    sample_alpha: float = 0.75
    logq: bool = True
    history_pool: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ConfigError(f"two_tower: negatives must be one of {', '.join(NEGATIVES)}, got {self.negatives!r}")
        if not self.user_vocab or not self.item_vocab:
            raise ConfigError("two_tower: user_vocab and item_vocab must be non-empty")
        if self.item_vocab[0] != self.num_items:
            raise ConfigError(f"two_tower: item field 0 must be the item id with num_items={self.num_items} rows, "
                              f"got {self.item_vocab[0]}")
        for name in ("embed_dim", "out_dim", "num_sampled"):
            if getattr(self, name) < 1:
                raise ConfigError(f"two_tower: {name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"two_tower: temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_spec(cls, spec, **overrides) -> "TwoTowerConfig":
        """The config of a fitted ``FeatureSpec``, with keyword overrides."""
        return cls(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                   num_items=spec.num_items, user_dense=spec.num_user_dense, item_dense=spec.num_item_dense,
                   **overrides)


class TwoTowerRetriever(Retriever):
    """User tower · item tower (see the module doc).

    Args:
        config: :class:`TwoTowerConfig`.
        item_sparse: [I, Fi] int64 sparse features of every item index (``RetrievalData.item_sparse_table``).
        item_dense: [I, Di] float32 dense features of every item index (default: none).
        item_popularity: [I] training-positive counts (for logQ and the sampler); None = uniform.
    """

    train_mode = "example"

    def __init__(self, config: TwoTowerConfig, item_sparse: Tensor, item_dense: Tensor | None = None,
                 item_popularity: Tensor | None = None):
        super().__init__()
        c = self.config = config
        i, fi, di = c.num_items, len(c.item_vocab), c.item_dense
        item_dense = torch.zeros(i, 0) if item_dense is None else item_dense
        if tuple(item_sparse.shape) != (i, fi):
            raise DataError(f"item_sparse must be [I, Fi] = [{i}, {fi}], got {list(item_sparse.shape)}",
                            column="item_sparse")
        if tuple(item_dense.shape) != (i, di):
            raise DataError(f"item_dense must be [I, Di] = [{i}, {di}], got {list(item_dense.shape)}",
                            column="item_dense")
        self.register_buffer("item_sparse", item_sparse.to(torch.int64).clone())
        self.register_buffer("item_dense", item_dense.to(torch.float32).clone())
        counts = torch.zeros(i) if item_popularity is None else torch.as_tensor(item_popularity, dtype=torch.float32)
        if counts.shape != (i,):
            raise DataError(f"item_popularity must be [I] = [{i}], got {list(counts.shape)}", column="item_popularity")
        # in-batch candidates follow the positive frequency; sampled ones the flattened distribution
        self.register_buffer("log_q_batch", log_sampling_probability(counts, alpha=1.0))
        self.register_buffer("log_q_sample", log_sampling_probability(counts, alpha=c.sample_alpha))

        self.user_emb = FieldEmbedding(c.user_vocab, c.embed_dim)
        self.item_emb = FieldEmbedding(c.item_vocab, c.embed_dim)
        hist_dim = fi * c.embed_dim if c.history_pool else 0
        self.user_mlp = MLP(len(c.user_vocab) * c.embed_dim + c.user_dense + hist_dim, [*c.hidden, c.out_dim],
                            dropout=c.dropout)
        self.item_mlp = MLP(fi * c.embed_dim + di, [*c.hidden, c.out_dim], dropout=c.dropout)

    # ------------------------------------------------------------------ towers
    def user_vectors(self, batch: RequestBatch) -> Tensor:
        """[B, D] L2-normalised user vectors."""
        parts = [self.user_emb(batch.user_sparse).flatten(1), batch.user_dense]
        if self.config.history_pool:
            hist = self.item_emb(self.item_sparse[batch.hist_items]).flatten(2)  # [B, N, Fi*De]
            parts.append(masked_mean(hist, batch.history_mask()))
        return F.normalize(self.user_mlp(torch.cat(parts, -1)), dim=-1)

    def item_vectors(self, item_sparse: Tensor, item_dense: Tensor) -> Tensor:
        """[..., D] L2-normalised item vectors of items given by their features ([..., Fi] and [..., Di])."""
        x = torch.cat([self.item_emb(item_sparse).flatten(-2), item_dense], -1)
        return F.normalize(self.item_mlp(x), dim=-1)

    def all_item_vectors(self) -> Tensor:
        """[I, D] every item's vector, in one batched pass (row 0 = padding, never retrieved)."""
        return self.item_vectors(self.item_sparse, self.item_dense)

    # ------------------------------------------------------------------ protocol
    def training_loss(self, batch: RequestBatch) -> Tensor:
        """Softmax loss of each request's candidate (``cand_items[:, 0]``, the positive) with logQ correction."""
        c = self.config
        u = self.user_vectors(batch)
        ids = batch.cand_items[:, 0]
        v = self.item_vectors(batch.cand_sparse[:, 0], batch.cand_dense[:, 0])
        lq = self.log_q_batch[ids] if c.logq else None
        if c.negatives == "in_batch":
            return softmax_loss_logq(u, v, ids, v, ids, lq, lq, c.temperature)
        neg_ids = torch.multinomial(self.log_q_sample.exp(), c.num_sampled, replacement=True)
        neg = self.item_vectors(self.item_sparse[neg_ids], self.item_dense[neg_ids])
        if c.negatives == "sampled":
            lqs = self.log_q_sample
            return softmax_loss_logq(u, v, ids, neg, neg_ids, lqs[ids] if c.logq else None,
                                     lqs[neg_ids] if c.logq else None, c.temperature)
        lq_neg = torch.cat([self.log_q_batch[ids], self.log_q_sample[neg_ids]]) if c.logq else None
        return softmax_loss_logq(u, v, ids, torch.cat([v, neg]), torch.cat([ids, neg_ids]), lq, lq_neg,
                                 c.temperature)

    def score_all(self, batch: RequestBatch) -> Tensor:
        """[B, I] cosine of each user vector with every item vector; ``-inf`` at padding index 0."""
        scores = self.user_vectors(batch) @ self.all_item_vectors().t()
        scores[:, 0] = NEG_INF
        return scores
