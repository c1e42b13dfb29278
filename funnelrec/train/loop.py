"""A compact multi-task fit loop over ``RequestDataset``: AdamW, gradient clipping, early stopping on the
*validation* mean AUC, progress bars with throughput.

Example:
    >>> result = fit_multitask(model, train_ds, valid_ds, epochs=3)   # doctest: +SKIP
    >>> result.best_valid["auc_mean"]                                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from funnelrec.data.dataset import RequestDataset
from funnelrec.errors import ConfigError
from funnelrec.metrics import auc
from funnelrec.ranking.shared_bottom import multitask_loss


@dataclass
class FitResult:
    """What a fit produced: the best validation metrics, per-epoch history and training throughput."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_s: float = 0.0


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, ds: RequestDataset, batch_size: int = 2048) -> tuple[np.ndarray, ...]:
    """Predictions over a dataset: (probs [R, T], labels [R, T], log_row [R]) over real candidates."""
    model.eval()
    probs, labels, rows = [], [], []
    for batch in ds.iter_batches(batch_size, shuffle=False):
        p = model.predict(batch)
        m = batch.cand_mask
        probs.append(p[m].numpy())
        labels.append(batch.labels[m].numpy())
        rows.append(batch.extras["log_row"][m].numpy())
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(rows)


def evaluate_multitask(model: torch.nn.Module, ds: RequestDataset, batch_size: int = 2048) -> dict[str, float]:
    """Per-task AUC of ``model`` on ``ds`` and their mean (``auc_mean``)."""
    probs, labels, _ = predict_dataset(model, ds, batch_size)
    out = {f"auc_{t}": auc(probs[:, i], labels[:, i]) for i, t in enumerate(ds.tasks)}
    finite = [v for v in out.values() if np.isfinite(v)]
    out["auc_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def fit_multitask(model: torch.nn.Module, train: RequestDataset, valid: RequestDataset, epochs: int = 3,
                  batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-5, clip: float = 5.0,
                  patience: int = 2, seed: int = 0, progress: bool = True) -> FitResult:
    """Train ``model`` with ``multitask_loss``; keep the weights of the epoch with the best validation mean AUC."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_state, best, best_epoch, bad = None, None, -1, 0
    history: list[dict[str, float]] = []
    seen, spent = 0, 0.0
    for epoch in range(epochs):
        model.train()
        bar = tqdm(train.iter_batches(batch_size, shuffle=True, seed=seed + epoch),
                   total=train.num_batches(batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        start = time.perf_counter()
        total, steps = 0.0, 0
        for batch in bar:
            loss = multitask_loss(model(batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += float(loss.detach())
            steps += 1
            seen += int(batch.cand_mask.sum())
            bar.set_postfix(loss=f"{total / steps:.4f}")
        spent += time.perf_counter() - start
        metrics = evaluate_multitask(model, valid)
        metrics.update(epoch=epoch, train_loss=total / max(1, steps))
        history.append(metrics)
        if best is None or metrics["auc_mean"] > best["auc_mean"]:
            best, best_epoch, bad = metrics, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, best_valid=best or {}, history=history,
                     samples_per_s=seen / max(spent, 1e-9))
