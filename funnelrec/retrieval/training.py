"""A small trainer for retrievers: AdamW over ``RetrievalData`` batches, early stopping on a validation metric.

It trains any model of the retriever protocol (``training_loss`` on batches of the model's ``train_mode``) and keeps
the parameters of the best validation epoch. Models without parameters (popularity) are returned untouched.

Example:
    >>> result = fit_retriever(model, data, epochs=10, batch_size=256, lr=1e-3, patience=2)  # doctest: +SKIP
    >>> result.best_epoch, result.best_valid["recall@50"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from funnelrec.errors import ConfigError
from funnelrec.retrieval.evaluate import _device, evaluate_retriever

__all__ = ["FitResult", "fit_retriever"]


@dataclass
class FitResult:
    """What ``fit_retriever`` did.

    Attributes:
        best_epoch: 0-based epoch whose parameters the model holds at the end (-1 when nothing was trained).
        best_valid: validation metrics of that epoch (empty without validation).
        history: one dict per epoch: ``epoch``, ``loss`` (mean training loss), ``seconds``, and the validation
            metrics when evaluated.
        seconds: total wall time.
        steps: optimiser steps taken.
    """

    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def fit_retriever(model, data, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
                  weight_decay: float = 0.0, seed: int = 0, valid_metric: str | None = "recall@50",
                  patience: int | None = None, grad_clip: float | None = 5.0, progress: bool = False,
                  eval_batch_size: int = 1024) -> FitResult:
    """Train ``model`` on ``data``'s train split; keep the parameters of the best validation epoch.

    Args:
        model: a retriever; it trains on ``data.batches("train", ..., mode=model.train_mode)``.
        data: the ``RetrievalData``.
        epochs: at most this many passes over the training batches.
        batch_size: B.
        lr / weight_decay: AdamW settings.
        seed: seeds ``torch`` (initial sampling noise) and the batch shuffles.
        valid_metric: metric of ``evaluate_retriever(model, data, "valid")`` to maximise after every epoch;
            None trains all epochs without validation and keeps the last parameters.
        patience: stop after this many epochs without improvement (None: never early).
        grad_clip: max gradient norm (None: no clipping).
        progress: show a progress bar over epochs.
        eval_batch_size: requests per validation chunk.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    result = FitResult()
    t0 = time.perf_counter()
    if not model.trainable:
        result.seconds = time.perf_counter() - t0
        return result
    torch.manual_seed(seed)
    device = _device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, stale = -math.inf, None, 0
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        model.train()
        te = time.perf_counter()
        total, count = 0.0, 0
        for batch in data.batches("train", batch_size, shuffle=True, seed=seed * 100_003 + epoch,
                                  mode=model.train_mode):
            loss = model.training_loss(batch.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            total += float(loss.detach())
            count += 1
            result.steps += 1
        row: dict[str, float] = {"epoch": float(epoch), "loss": total / max(1, count),
                                 "seconds": time.perf_counter() - te}
        if valid_metric is not None:
            metrics = evaluate_retriever(model, data, "valid", batch_size=eval_batch_size)
            if valid_metric not in metrics:
                raise ConfigError(f"unknown valid_metric {valid_metric!r}; choose one of {', '.join(metrics)}")
            row.update(metrics)
            if metrics[valid_metric] > best:
                best, stale = metrics[valid_metric], 0
                best_state = copy.deepcopy(model.state_dict())
                result.best_epoch, result.best_valid = epoch, metrics
            else:
                stale += 1
        else:
            result.best_epoch = epoch
        result.history.append(row)
        if patience is not None and stale >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
