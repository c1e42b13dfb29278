"""Training list evaluators on simulated list outcomes: losses, the list dataset and the training loop.

Targets are **realised outcomes**: the value of each shown list drawn from the world's response model
(:meth:`funnelrec.rerank.data.RerankData.outcomes`) — what a log of served lists holds — never the oracle's
expected value.

Losses (FlashEvaluator trains with the first; the paper also mentions MSE):

* ``listwise`` — softmax cross-entropy over the K lists of a request: target q = softmax(r / (τ·s_w)), where r
  are the realised values, s_w the within-request standard deviation of realised values on the training set
  and τ the ``temperature`` (default 5); loss = −Σ_k q_k log softmax(score)_k. Single outcomes are
  heavy-tailed (watch time), and with a small τ the minimiser E[softmax(r/τ)] favours lists that are *risky*
  (likely to be the luckiest) over lists that are good on average; a large τ keeps q near-linear in r, so the
  optimum ranks lists by E[r].
* ``pointwise`` — MSE between each list's score and its standardised value (r − μ) / σ (μ, σ over the training
  set): how a serial evaluator that scores one list at a time is trained.

Early stopping on the validation loss of the model's own objective (validation requests of other users, their
outcomes drawn the same way); the best epoch's weights are kept.

Example:
    >>> scores = torch.zeros(2, 3, requires_grad=True)
    >>> rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    >>> scale = RewardScale.fit(rewards)
    >>> loss = listwise_loss(scores, rewards, scale, temperature=1.0)
    >>> loss.backward()
    >>> bool(scores.grad[0, 0] < 0 and scores.grad[1, 2] < 0)  # the better lists are pushed up
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import RerankRequests

__all__ = ["TrainConfig", "ListData", "RewardScale", "listwise_loss", "pointwise_loss", "evaluator_loss",
           "train_evaluator"]


@dataclass
class TrainConfig:
    """Settings of :func:`train_evaluator`.

    Args:
        epochs: most passes over the training requests.
        batch_size: requests per step (all K lists of each).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        temperature: τ of the listwise target (in units of the within-request std of realised values).
        patience: epochs without a better validation loss before stopping.
        seed: seeds the batch order.
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    temperature: float = 5.0
    patience: int = 1
    seed: int = 0

    def validate(self) -> "TrainConfig":
        """Raise ``ConfigError`` naming the bad field; returns self."""
        checks = [("epochs", self.epochs, isinstance(self.epochs, int) and self.epochs >= 1),
                  ("batch_size", self.batch_size, isinstance(self.batch_size, int) and self.batch_size >= 1),
                  ("lr", self.lr, self.lr > 0), ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                  ("grad_clip", self.grad_clip, self.grad_clip > 0),
                  ("temperature", self.temperature, self.temperature > 0),
                  ("patience", self.patience, isinstance(self.patience, int) and self.patience >= 0)]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"train config: {name}={value!r} is out of range")
        return self


@dataclass
class ListData:
    """Requests with their candidate lists and realised list values.

    Args:
        requests: B requests.
        lists: [B, K, L] int64 pool positions.
        rewards: [B, K] realised values (simulated outcomes).
    """

    requests: RerankRequests
    lists: Tensor
    rewards: Tensor

    def __post_init__(self):
        b = len(self.requests)
        if self.lists.dim() != 3 or self.lists.shape[0] != b:
            raise DataError(f"expected lists [{b}, K, L], got {list(self.lists.shape)}", column="lists")
        if self.rewards.shape != self.lists.shape[:2]:
            raise DataError(f"expected rewards {list(self.lists.shape[:2])}, got {list(self.rewards.shape)}",
                            column="rewards")

    def __len__(self) -> int:
        return int(self.lists.shape[0])

    def select(self, index: Tensor) -> "ListData":
        return ListData(self.requests.select(index), self.lists[index], self.rewards[index])


@dataclass
class RewardScale:
    """Scales of the realised values on the training set: mean μ, std σ, within-request std s_w."""

    mean: float
    std: float
    within_std: float

    @classmethod
    def fit(cls, rewards: Tensor) -> "RewardScale":
        """From [B, K] training rewards."""
        if rewards.dim() != 2 or rewards.numel() < 2:
            raise DataError(f"expected [B, K] rewards with at least 2 values, got {list(rewards.shape)}",
                            column="rewards")
        r = rewards.double()
        within = (r - r.mean(1, keepdim=True)).pow(2).mean().sqrt()
        return cls(mean=float(r.mean()), std=max(float(r.std()), 1e-6), within_std=max(float(within), 1e-6))


def _masked(scores: Tensor, list_mask: Tensor | None) -> Tensor:
    return scores if list_mask is None else scores.masked_fill(~list_mask, float("-inf"))


def listwise_loss(scores: Tensor, rewards: Tensor, scale: RewardScale, temperature: float = 1.0,
                  list_mask: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy over the K lists of each request (see the module docstring).

    Args:
        scores: [B, K] model scores.
        rewards: [B, K] realised values.
        scale: the training-set scales.
        temperature: τ.
        list_mask: [B, K] bool real lists (default all).

    Returns:
        Scalar mean over requests.
    """
    if scores.shape != rewards.shape or scores.dim() != 2:
        raise DataError(f"scores {list(scores.shape)} and rewards {list(rewards.shape)} must both be [B, K]",
                        column="scores")
    target = torch.softmax(_masked(rewards / (temperature * scale.within_std), list_mask), dim=1)
    logp = torch.log_softmax(_masked(scores, list_mask), dim=1)
    return -(target * logp.masked_fill(target == 0, 0.0)).sum(1).mean()


def pointwise_loss(scores: Tensor, rewards: Tensor, scale: RewardScale,
                   list_mask: Tensor | None = None) -> Tensor:
    """MSE between each list's score and its standardised realised value (r − μ) / σ."""
    if scores.shape != rewards.shape:
        raise DataError(f"scores {list(scores.shape)} and rewards {list(rewards.shape)} differ",
                        column="scores")
    err = (scores - (rewards - scale.mean) / scale.std) ** 2
    if list_mask is None:
        return err.mean()
    return (err * list_mask).sum() / list_mask.sum().clamp(min=1)


def evaluator_loss(model: nn.Module, scores: Tensor, rewards: Tensor, scale: RewardScale, temperature: float,
                   list_mask: Tensor | None = None) -> Tensor:
    """The loss named by ``model.cfg.loss``."""
    if model.cfg.loss == "listwise":
        return listwise_loss(scores, rewards, scale, temperature, list_mask)
    return pointwise_loss(scores, rewards, scale, list_mask)


@dataclass
class TrainResult:
    """What :func:`train_evaluator` returns: per-epoch losses, the best epoch and the wall time."""

    curve: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    wall_s: float = 0.0


def _epoch_loss(model, data: ListData, scale: RewardScale, cfg: TrainConfig) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, len(data), cfg.batch_size):
            sub = data.select(torch.arange(lo, min(lo + cfg.batch_size, len(data))))
            scores = model(sub.requests.batch, sub.requests.pool, sub.lists)
            total += float(evaluator_loss(model, scores, sub.rewards, scale, cfg.temperature)) * len(sub)
            n += len(sub)
    return total / max(n, 1)


def train_evaluator(model: nn.Module, train: ListData, valid: ListData, cfg: TrainConfig | None = None,
                    scale: RewardScale | None = None, log=None) -> TrainResult:
    """Train ``model`` (an evaluator with ``cfg.loss``) with AdamW and early stopping on the validation loss.

    Args:
        model: ``IndependentEvaluator`` or ``FlashEvaluator``.
        train, valid: list data (realised outcomes as rewards).
        cfg: the training settings.
        scale: reward scales (default: fitted on ``train.rewards``).
        log: optional ``callable(str)`` for progress lines.

    Returns:
        :class:`TrainResult`; ``model`` holds the best epoch's weights, in eval mode.
    """
    import time

    cfg = (cfg or TrainConfig()).validate()
    if len(train) == 0 or len(valid) == 0:
        raise DataError("training and validation data must be non-empty", column="requests")
    scale = scale or RewardScale.fit(train.rewards)
    start = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    best, best_state, bad = math.inf, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        total, n = 0.0, 0
        for lo in range(0, len(train), cfg.batch_size):
            sub = train.select(perm[lo: lo + cfg.batch_size])
            scores = model(sub.requests.batch, sub.requests.pool, sub.lists)
            loss = evaluator_loss(model, scores, sub.rewards, scale, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += float(loss.detach()) * len(sub)
            n += len(sub)
        v = _epoch_loss(model, valid, scale, cfg)
        result.curve.append({"epoch": epoch, "train_loss": total / n, "valid_loss": v})
        if log:
            log(f"epoch {epoch}: train {total / n:.4f}, valid {v:.4f}")
        if v < best - 1e-6:
            best, best_state, bad, result.best_epoch = v, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            bad += 1
            if bad > cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    result.wall_s = time.perf_counter() - start
    return result
