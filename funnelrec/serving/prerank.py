"""Pre-ranking: a light model that cuts ~1,000 retrieved candidates to ~200 before the full ranker.

Industrial pre-rankers trade accuracy for cost: they score every retrieved candidate from *cached* embeddings
instead of running the ranker's feature crosses and sequence modules. Ours reads the retrieval stage's own vectors
— the user vector u [B, D] computed once per request and the item vectors v [I, D] cached for the whole catalogue
— and the items' log training popularity, and scores each candidate with a small MLP over
``[u·v, u ⊙ v, log(1 + pop)]`` with one logit per task (click and long view by default), fused as the sum of
log-probabilities. Cost per candidate: one D-wide elementwise product and a (D + 2) × H × T MLP — no embedding
look-ups beyond the cached vector.

Two ways to train it (retrieval model frozen in both):

* ``distill`` (default; ours, the usual industrial practice of aligning pre-ranking with ranking): on sampled
  training requests, the retrieval stage's candidates are scored by the trained ranker and fusion, and the
  pre-ranker learns to put the teacher's top ``K`` first — a listwise softmax cross-entropy over each request's
  candidates with the teacher's top K as the positives (:func:`distill_preranker`). Its job in the funnel is
  exactly that: keep what the ranker would rank high.
* ``logs``: binary cross-entropy on the logged impressions' labels (:func:`fit_preranker`). On simulated
  closed-loop sessions this keeps far fewer of the ranker's favourites: logged exposures are biased, and the
  candidates a pre-ranker sees at serving time (everything retrieval returns) are not what was logged
  (``docs/results/cascade.md``).

Example:
    >>> import torch
    >>> model = PreRanker(PreRankerConfig(dim=8))
    >>> u, v = torch.randn(2, 8), torch.randn(2, 5, 8)
    >>> model.logits(u, v, torch.zeros(2, 5)).shape
    torch.Size([2, 5, 2])
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from funnelrec.config import check_positive_ints
from funnelrec.errors import ConfigError

__all__ = ["PreRankerConfig", "PreRanker", "fit_preranker", "distill_preranker"]


@dataclass
class PreRankerConfig:
    """Pre-ranker settings.

    Args:
        dim: D, the width of the cached user and item vectors.
        hidden: H, the MLP's hidden width.
        tasks: the task labels it predicts (columns of the ranking labels, in ``task_names()`` order).
    """

    dim: int
    hidden: int = 64
    tasks: tuple[str, ...] = ("is_click", "long_view")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("dim", "hidden"), "pre-ranker config")
        if not self.tasks:
            raise ConfigError("pre-ranker config: tasks must not be empty")
        self.tasks = tuple(self.tasks)


class PreRanker(nn.Module):
    """MLP over cached user/item vectors (see the module doc).

    Args:
        config: :class:`PreRankerConfig`.
    """

    def __init__(self, config: PreRankerConfig):
        super().__init__()
        self.config = config
        d, h = config.dim, config.hidden
        self.mlp = nn.Sequential(nn.Linear(d + 2, h), nn.ReLU(), nn.Linear(h, len(config.tasks)))

    def logits(self, user_vec: Tensor, item_vec: Tensor, log_pop: Tensor) -> Tensor:
        """[B, M, T'] task logits.

        Args:
            user_vec: [B, D] user vectors.
            item_vec: [B, M, D] candidate vectors.
            log_pop: [B, M] log(1 + training count) of each candidate.
        """
        prod = user_vec.unsqueeze(1) * item_vec
        x = torch.cat([prod.sum(-1, keepdim=True), prod, log_pop.unsqueeze(-1)], -1)
        return self.mlp(x)

    def score(self, user_vec: Tensor, item_vec: Tensor, log_pop: Tensor) -> Tensor:
        """[B, M] the fused pre-ranking score: Σ_t log σ(logit_t) (the log of the product of the task
        probabilities)."""
        return F.logsigmoid(self.logits(user_vec, item_vec, log_pop)).sum(-1)


def fit_preranker(model: PreRanker, user_vec: Tensor, item_vec: Tensor, log_pop: Tensor, labels: Tensor,
                  epochs: int = 3, batch_size: int = 2048, lr: float = 3e-3, seed: int = 0,
                  progress: bool = False) -> dict[str, float]:
    """Train on logged impressions (binary cross-entropy per task).

    Args:
        user_vec: [R, D] the user vector of each impression's request (frozen retrieval model).
        item_vec: [R, D] the impression's item vector.
        log_pop: [R] its log popularity.
        labels: [R, T'] 0/1 labels of ``model.config.tasks``.
    Returns:
        ``{"loss": last epoch's mean loss, "seconds": training time}``.
    """
    r = user_vec.shape[0]
    if not (item_vec.shape[0] == log_pop.shape[0] == labels.shape[0] == r) or r == 0:
        raise ConfigError(f"pre-ranker training rows disagree: user {r}, item {item_vec.shape[0]}, "
                          f"popularity {log_pop.shape[0]}, labels {labels.shape[0]} (need the same R > 0)")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    t0 = time.perf_counter()
    mean = float("nan")
    for _ in tqdm(range(epochs), desc="pre-ranker", disable=not progress):
        perm = torch.randperm(r, generator=g)
        total, n = 0.0, 0
        for i in range(0, r, batch_size):
            idx = perm[i: i + batch_size]
            out = model.logits(user_vec[idx], item_vec[idx].unsqueeze(1), log_pop[idx].unsqueeze(1)).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(out, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * idx.numel(), n + idx.numel()
        mean = total / n
    return {"loss": mean, "seconds": time.perf_counter() - t0}


def distill_preranker(model: PreRanker, user_vec: Tensor, cand_items: Tensor, cand_mask: Tensor,
                      teacher: Tensor, item_vectors: Tensor, item_log_pop: Tensor, top_k: int,
                      epochs: int = 3, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      progress: bool = False) -> dict[str, float]:
    """Train the pre-ranker to keep the teacher's top ``top_k`` of each request's candidates.

    Loss per request: −mean over the teacher's top-K candidates of log softmax(student scores over the real
    candidates) (a listwise, scale-free target: the teacher's scores are never regressed).

    Args:
        user_vec: [R, D] user vectors of R requests.
        cand_items: [R, C] candidate item indices (what retrieval returned).
        cand_mask: [R, C] bool, real candidates.
        teacher: [R, C] teacher scores (ranker + fusion); higher is better.
        item_vectors: [I, D] cached item vectors; item_log_pop: [I] log popularity.
        top_k: K, the teacher's top candidates to keep.
    Returns:
        ``{"loss", "seconds", "recall_at_k"}`` — the share of the teacher's top K in the student's top K on the
        training requests after training.
    """
    r, c = cand_items.shape
    if not (user_vec.shape[0] == cand_mask.shape[0] == teacher.shape[0] == r) or r == 0:
        raise ConfigError(f"pre-ranker distillation rows disagree: user {user_vec.shape[0]}, candidates {r}, "
                          f"mask {cand_mask.shape[0]}, teacher {teacher.shape[0]} (need the same R > 0)")
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, c)
    neg = float("-inf")
    top = teacher.masked_fill(~cand_mask, neg).topk(k, dim=1).indices
    positive = torch.zeros(r, c, dtype=torch.bool).scatter(1, top, True) & cand_mask
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    t0 = time.perf_counter()
    mean = float("nan")

    def student(idx: Tensor) -> Tensor:
        items = cand_items[idx]
        return model.score(user_vec[idx], item_vectors[items], item_log_pop[items]).masked_fill(~cand_mask[idx], neg)

    for _ in tqdm(range(epochs), desc="pre-ranker distillation", disable=not progress):
        perm = torch.randperm(r, generator=g)
        total, n = 0.0, 0
        for i in range(0, r, batch_size):
            idx = perm[i: i + batch_size]
            logp = torch.log_softmax(student(idx), dim=1)
            pos = positive[idx]
            loss = -(logp.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp(min=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * idx.numel(), n + idx.numel()
        mean = total / n
    with torch.no_grad():
        kept = torch.zeros(r, c, dtype=torch.bool)
        for i in range(0, r, batch_size):
            idx = torch.arange(i, min(r, i + batch_size))
            kept[idx] = torch.zeros(idx.numel(), c, dtype=torch.bool).scatter(1, student(idx).topk(k, 1).indices,
                                                                              True)
        recall = float(((kept & positive).sum(1).float() / positive.sum(1).clamp(min=1)).mean())
    return {"loss": mean, "seconds": time.perf_counter() - t0, "recall_at_k": recall}
