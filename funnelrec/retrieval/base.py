"""The retriever protocol and the softmax losses with logQ correction shared by the retrievers.

Every retriever is an ``nn.Module`` with

* ``training_loss(batch) -> Tensor`` — a scalar to minimise (``RetrievalData`` batches of ``train_mode``);
* ``score_all(batch) -> [B, I]`` — a score for every item index of the corpus, ``-inf`` at padding index 0;
* ``retrieve(batch, k, exclude=None) -> (item_index [B, k], scores [B, k])`` — the top ``k`` of ``score_all``
  after setting ``exclude`` ([B, I] bool, e.g. the user's history) to ``-inf``.

``train_mode`` names the batch layout its training loss wants (``"example"`` or ``"sequence"``, see
``funnelrec.retrieval.data``); ``trainable`` is False for models without parameters (popularity).

**logQ correction** (Yi et al., RecSys 2019; Bengio & Senécal 2008): a softmax over a *sampled* set of negatives is
biased towards penalising frequently sampled (popular) items. Subtracting ``log q_j`` — the log probability that
item j is drawn as a candidate — from every logit, the positive's included, makes the sampled softmax a consistent
estimate of the full one. In-batch negatives are drawn with the training-positive frequency of each item
(``q_j = count_j / Σ count``); sampled negatives with the sampling distribution itself.

Example:
    >>> import torch
    >>> q = torch.randn(4, 8); items = torch.tensor([1, 2, 3, 2])
    >>> loss = softmax_loss_logq(q, q, items, q, items)  # in-batch: the batch's items are the candidates
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError

__all__ = ["Retriever", "softmax_loss_logq", "log_sampling_probability", "NEG_INF"]

NEG_INF = float("-inf")


def log_sampling_probability(counts: Tensor, alpha: float = 1.0, smoothing: float = 1.0) -> Tensor:
    """[I] log q of a unigram sampling distribution ``q_j ∝ (count_j + smoothing)^alpha`` (``-inf`` at index 0).

    Args:
        counts: [I] float training-positive counts per item index (index 0 = padding).
        alpha: 1 = the popularity distribution itself; 0 = uniform; 0.75 = word2vec's flattening.
        smoothing: pseudo-count added to every real item, so unseen items keep a non-zero probability.
    """
    if counts.dim() != 1 or counts.numel() < 2:
        raise DataError(f"item counts must be [I] with I >= 2, got shape {list(counts.shape)}",
                        column="item_popularity")
    w = (counts.to(torch.float64).clamp(min=0) + smoothing).pow(alpha)
    w[0] = 0.0
    total = w.sum()
    if not total > 0:
        raise DataError("item counts give an empty sampling distribution", column="item_popularity")
    return (w / total).log().to(torch.float32)


def softmax_loss_logq(query: Tensor, pos: Tensor, pos_ids: Tensor, neg: Tensor, neg_ids: Tensor,
                      log_q_pos: Tensor | None = None, log_q_neg: Tensor | None = None,
                      temperature: float = 1.0) -> Tensor:
    """Mean cross-entropy of each query's positive against shared candidates, with logQ correction.

    Row r's logits are ``[⟨query_r, pos_r⟩ / τ − log q(pos_r),  ⟨query_r, neg_j⟩ / τ − log q(neg_j) for every j]``;
    a candidate with the same item id as the row's positive (``neg_ids[j] == pos_ids[r]`` — the row's own item in
    in-batch training, an accidental hit of a sampler) is masked to ``-inf``, so an item is never its own negative.

    Args:
        query: [P, D] query (user / sequence-state) vectors.
        pos: [P, D] embedding of each query's positive item.
        pos_ids: [P] item index of each positive.
        neg: [K, D] candidate (negative) item embeddings, shared by all queries.
        neg_ids: [K] their item indices.
        log_q_pos: [P] log sampling probability of each positive, or None (no correction).
        log_q_neg: [K] log sampling probability of each candidate, or None.
        temperature: τ (logits are divided by it before the correction).

    Returns:
        Scalar loss (mean over the P queries).

    In-batch softmax is ``softmax_loss_logq(u, v, ids, v, ids, lq, lq)``: the batch's own items are the candidates.
    """
    if query.shape != pos.shape or query.dim() != 2:
        raise DataError(f"query and pos must both be [P, D], got {list(query.shape)} and {list(pos.shape)}")
    if neg.dim() != 2 or neg.shape[1] != query.shape[1] or neg_ids.shape != neg.shape[:1]:
        raise DataError(f"neg must be [K, D] with neg_ids [K], got {list(neg.shape)} and {list(neg_ids.shape)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    pos_logit = (query * pos).sum(-1) / temperature  # [P]
    neg_logit = query @ neg.t() / temperature  # [P, K]
    if log_q_pos is not None:
        pos_logit = pos_logit - log_q_pos
    if log_q_neg is not None:
        neg_logit = neg_logit - log_q_neg.unsqueeze(0)
    neg_logit = neg_logit.masked_fill(neg_ids.unsqueeze(0) == pos_ids.unsqueeze(1), NEG_INF)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class Retriever(nn.Module):
    """Base class of the retrievers (see the module doc); subclasses implement ``training_loss`` and
    ``score_all``."""

    #: the ``RetrievalData.batches`` mode the training loss wants.
    train_mode: str = "example"

    @property
    def trainable(self) -> bool:
        """False for models without parameters (nothing to train)."""
        return any(p.requires_grad for p in self.parameters())

    def training_loss(self, batch: RequestBatch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def score_all(self, batch: RequestBatch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The top ``k`` items of each request.

        Args:
            batch: the requests (B rows).
            k: items per request (at most I − 1).
            exclude: optional [B, I] bool mask of items never to return (e.g. ``RetrievalData.exclude_mask``).

        Returns:
            ``(item_index [B, k] int64, scores [B, k] float)``, best first. Excluded items and padding score
            ``-inf``; they appear only when fewer than ``k`` items remain.
        """
        scores = self.score_all(batch)
        b, i = scores.shape
        if not 1 <= k <= i - 1:
            raise ConfigError(f"k must lie in [1, {i - 1}] (the corpus size), got {k}")
        if exclude is not None:
            if tuple(exclude.shape) != (b, i):
                raise DataError(f"exclude must be [B, I] = [{b}, {i}], got {list(exclude.shape)}", column="exclude")
            scores = scores.masked_fill(exclude.to(scores.device, torch.bool), NEG_INF)
        top = scores.topk(k, dim=1)
        return top.indices, top.values

    @staticmethod
    def _mask_padding(scores: Tensor) -> Tensor:
        scores[:, 0] = NEG_INF
        return scores
